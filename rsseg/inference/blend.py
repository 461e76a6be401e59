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

**Strip accumulator.** Weighted sums and weights are kept (on the model's device) only for the raster rows
that are still open: windows arrive in row-major order, and once grid row ``i`` is complete, every raster
row above grid row ``i + 1``'s first row is final and is flushed, so the rows still open all lie within
``size`` rows of grid row ``i + 1``'s top. The strip therefore holds ``size`` rows x the raster width of
float32 sums and weights (8 bytes per pixel), whatever the scene's height; memory grows with the scene's
*width* only (a 100,000 px wide scene: 0.4 GB with 512 px windows).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from rsseg.errors import ConfigError
from rsseg.tiling.grid import Tile, TileGrid

__all__ = ["StripAccumulator", "axis_weights", "edge_margin", "window_weights"]


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


class StripAccumulator:
    """Weighted sums of window predictions for the strip of rows still open; yields rows as they complete.

    On CPU the strip is numpy arrays (each update is one small single-threaded operation: no OpenMP
    barrier per window); on CUDA it is tensors on the device, so predictions never leave the GPU.

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
        self.sums, self.weights = self._zeros(), self._zeros()
        self._next = 0  # index, in iteration order, of the next expected window
        self._weight_cache: dict[tuple[bool, bool, bool, bool], np.ndarray | torch.Tensor] = {}

    def _zeros(self) -> np.ndarray | torch.Tensor:
        shape = (self.rows, self.grid.width)
        if self._cpu:
            return np.zeros(shape, dtype=np.float32)
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _weights(self, window: Tile) -> np.ndarray | torch.Tensor:
        g = self.grid
        key = (window.row_off > 0, window.row_off + g.size < g.height,
               window.col_off > 0, window.col_off + g.size < g.width)
        if key not in self._weight_cache:
            weights = window_weights(g, window)
            self._weight_cache[key] = weights if self._cpu else torch.from_numpy(weights).to(self.device)
        return self._weight_cache[key]

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
        weights = self._weights(window)[:h, :w]
        values = (prob.numpy() if self._cpu else prob)[:h, :w]
        self.sums[r0 : r0 + h, c0 : c0 + w] += values * weights
        self.weights[r0 : r0 + h, c0 : c0 + w] += weights
        if window.col < g.n_cols - 1:
            return None
        end = g.row_offsets[window.row + 1] if window.row + 1 < g.n_rows else g.height
        return self._flush(end - self.start)

    def _flush(self, k: int) -> tuple[int, np.ndarray | torch.Tensor]:
        """Blend the strip's first ``k`` rows, then move the open rows up by ``k``."""
        first = self.start
        done = self.sums[:k] / self.weights[:k]
        keep = self.rows - k
        for strip in (self.sums, self.weights):
            rest = strip[k:]
            if keep > k and not self._cpu:
                rest = rest.clone()  # torch refuses overlapping copies (numpy buffers them itself)
            strip[:keep] = rest
            strip[keep:] = 0
        self.start += k
        return first, done
