"""Seamless blending of overlapping window predictions, in a strip of rows that streams down the raster.

**Weight window.** Along each axis a window of ``size`` pixels gets the weight ``w(t)`` of a pixel at
distance ``t`` (0 = the edge pixel) from each side that faces a neighbouring window, with
``m = overlap // 4``::

    w(t) = 0                               for t < m          (edge zone: predictions there saw padding)
    w(t) = (t - m + 1) / (overlap - m + 1) for m <= t < overlap (linear taper inside the overlap)
    w(t) = 1                               for t >= overlap   (interior)

Sides that touch the raster edge are not tapered (weight 1 up to the edge), and the 2-D weight is the
outer product of the two axes' weights. **No pixel gets zero total weight**: along an axis, window ``i``
has positive weight on ``[o_i + m, o_i + size - m)`` (extended to the raster edge on outer sides) and
consecutive windows are at most ``size - overlap`` apart, so these intervals overlap as ``overlap >= 2m``;
the last window, shifted inward, is even closer to its neighbour. A window's prediction is therefore
never used within ``m`` pixels of an inner edge: a fully convolutional model whose receptive field is
narrower than ``overlap / 2`` pixels gives exactly its whole-image prediction, without seams.

**Strip accumulator.** The 2-D weights are outer products and the windows a product of offsets per axis, so a
pixel's total weight is the product of the two axes' totals: each window's axis weights are divided by their
axis's total once (:func:`axis_shares`), and the blended value is the plain sum of ``prediction x share``
(no running weight sums, no division per pixel). Sums are kept (on the model's device) only for the raster
rows that are still open: windows arrive in row-major order, and once grid row ``i`` is complete, every raster
row above grid row ``i + 1``'s first row is final and is flushed, so the rows still open all lie within
``size`` rows of grid row ``i + 1``'s top. The strip therefore holds ``size`` rows x the raster width of
float32 sums (4 bytes per pixel), whatever the scene's height; memory grows with the scene's *width* only
(a 100,000 px wide scene: 0.2 GB with 512 px windows).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from rsseg.errors import ConfigError
from rsseg.tiling.grid import Tile, TileGrid, grid_offsets

__all__ = ["StripAccumulator", "axis_shares", "axis_weights", "edge_margin", "window_weights"]


def edge_margin(overlap: int) -> int:
    """Pixels along an inner window edge whose predictions get zero weight: ``overlap // 4``."""
    return overlap // 4


@functools.lru_cache(maxsize=64)
def axis_weights(size: int, overlap: int, taper_start: bool, taper_end: bool) -> np.ndarray:
    """Weights along one axis of a window (see the module docstring); read-only float32 ``(size,)``.

    Args:
        size: window length in pixels.
        overlap: pixels shared with the neighbouring window.
        taper_start: the window has a neighbour before it on this axis (not at the raster edge).
        taper_end: the window has a neighbour after it on this axis.
    """
    t = np.arange(size, dtype=np.float64)
    m = edge_margin(overlap)
    ramp = np.clip((t - m + 1) / (overlap - m + 1), 0.0, 1.0)
    weights = np.ones(size)
    if taper_start:
        weights = np.minimum(weights, ramp)
    if taper_end:
        weights = np.minimum(weights, ramp[::-1])
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    return weights


def window_weights(grid: TileGrid, window: Tile) -> np.ndarray:
    """The 2-D weight window of ``window`` in ``grid``: ``(size, size)`` float32, no taper at raster edges."""
    size, overlap = grid.size, grid.overlap
    rows = axis_weights(size, overlap, window.row_off > 0, window.row_off + size < grid.height)
    cols = axis_weights(size, overlap, window.col_off > 0, window.col_off + size < grid.width)
    return np.outer(rows, cols)


def axis_shares(length: int, size: int, overlap: int) -> list[np.ndarray]:
    """Per window along an axis of ``length`` pixels, its :func:`axis_weights` divided by the axis's total weight.

    ``(size,)`` float32 each, in :func:`~rsseg.tiling.grid.grid_offsets` order; at every pixel of the axis the
    shares of the windows covering it add up to 1 (beyond ``length``, where a window is padding, they are 1).
    """
    offsets = grid_offsets(length, size, overlap)
    weights = [axis_weights(size, overlap, off > 0, off + size < length).astype(np.float64) for off in offsets]
    total = np.zeros(max(length, size))
    for off, w in zip(offsets, weights, strict=True):
        total[off : off + size] += w
    return [(w / total[off : off + size]).astype(np.float32) for off, w in zip(offsets, weights, strict=True)]


def _classes(arrays: list[np.ndarray]) -> list[int]:
    """An id per array, equal for equal arrays (a grid's inner windows share theirs)."""
    ids: dict[bytes, int] = {}
    return [ids.setdefault(a.tobytes(), len(ids)) for a in arrays]


class StripAccumulator:
    """Sums of window predictions x their shares of the blend for the strip of open rows; yields complete rows.

    On CPU the strip is a numpy array (each update is one small single-threaded operation: no OpenMP
    barrier per window); on CUDA it is a tensor on the device, so predictions never leave the GPU.

    Args:
        grid: the grid whose windows are added, in its (row-major) iteration order.
        device: where the sums live (the model's device).
    """

    def __init__(self, grid: TileGrid, device: torch.device) -> None:
        self.grid = grid
        self.device = device
        self.rows = min(grid.size, grid.height)
        self.start = 0  # raster row of the strip's first row
        self._cpu = device.type == "cpu"
        self.sums = np.zeros((self.rows, grid.width), dtype=np.float32) if self._cpu else \
            torch.zeros((self.rows, grid.width), dtype=torch.float32, device=device)
        self._next = 0  # index, in iteration order, of the next expected window
        self._row_shares = axis_shares(grid.height, grid.size, grid.overlap)
        self._col_shares = axis_shares(grid.width, grid.size, grid.overlap)
        self._row_class, self._col_class = _classes(self._row_shares), _classes(self._col_shares)
        self._share_cache: dict[tuple[int, int], np.ndarray | torch.Tensor] = {}

    def _shares(self, window: Tile) -> np.ndarray | torch.Tensor:
        """The 2-D shares of ``window``, cached per class of its row and column (a few per grid)."""
        key = (self._row_class[window.row], self._col_class[window.col])
        if key not in self._share_cache:
            shares = np.outer(self._row_shares[window.row], self._col_shares[window.col])
            self._share_cache[key] = shares if self._cpu else torch.from_numpy(shares).to(self.device)
        return self._share_cache[key]

    def add(self, window: Tile, prob: torch.Tensor) -> tuple[int, np.ndarray | torch.Tensor] | None:
        """Add one window's prediction ``(size, size)``; return ``(first_row, rows)`` of newly final rows.

        ``rows`` holds the blended probabilities of raster rows ``first_row ..`` over the full width:
        a float32 numpy array on CPU, a tensor on the device otherwise.

        Raises:
            ConfigError: windows out of the grid's iteration order (which the strip relies on).
        """
        g = self.grid
        expected = divmod(self._next, g.n_cols)
        if (window.row, window.col) != expected:
            raise ConfigError(f"window ({window.row}, {window.col}) out of order; expected {expected} (add windows in "
                              "the grid's row-major order)")
        self._next += 1
        h, w = min(g.size, g.height - window.row_off), min(g.size, g.width - window.col_off)
        r0, c0 = window.row_off - self.start, window.col_off
        values = (prob.numpy() if self._cpu else prob)[:h, :w]
        self.sums[r0 : r0 + h, c0 : c0 + w] += values * self._shares(window)[:h, :w]
        if window.col < g.n_cols - 1:
            return None
        end = g.row_offsets[window.row + 1] if window.row + 1 < g.n_rows else g.height
        return self._flush(end - self.start)

    def _flush(self, k: int) -> tuple[int, np.ndarray | torch.Tensor]:
        """Hand out the strip's first ``k`` rows, then move the open rows up by ``k``."""
        first = self.start
        done = self.sums[:k].copy() if self._cpu else self.sums[:k].clone()
        keep = self.rows - k
        rest = self.sums[k:]
        if keep > k and not self._cpu:
            rest = rest.clone()  # torch refuses overlapping copies (numpy buffers them itself)
        self.sums[:keep] = rest
        self.sums[keep:] = 0
        self.start += k
        return first, done
