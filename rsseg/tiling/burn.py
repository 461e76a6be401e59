"""Burn polygons into a raster window with numpy: the pixels GDAL's rasterizer sets, without OGR.

``rasterio.features.rasterize`` spends most of its time turning GeoJSON into OGR geometries one by one
while holding the GIL. Here the polygons become arrays of edges once (:func:`polygon_edges`), and
:func:`burn` fills a window from them in a few vectorised steps, with no Python loop over polygons, rows or
edges.

The result equals ``rasterize(geoms, out_shape=out.shape, transform=transform @ Affine.translation(col_off,
row_off), fill=0, default_value=value, all_touched=False)`` pixel for pixel, ties included, because the
arithmetic is GDAL's (``GDALdllImageFilledPolygon`` in ``alg/llrasterize.cpp``):

* every ring, holes included, is first turned clockwise in georeferenced coordinates (the orientation as
  OGR's ``isClockwise`` judges it), which decides the horizontal-edge rule below;
* points go to pixel space through the inverse of the *window's* geotransform as ``GDALInvGeoTransform``
  computes it, applied as ``inv[0] + X * inv[1] + Y * inv[2]``;
* the scan line of row ``r`` is ``y = r + 0.5``; an edge with lower end ``y1`` and upper end ``y2`` crosses
  it when ``y1 <= y < y2``, at ``x = (y - y1) * (x2 - x1) / (y2 - y1) + x1``, rounded to the column
  ``floor(x + 0.5)``;
* the crossings of one polygon on one row, sorted, pair up as ``[a, b)`` column ranges (even-odd, so holes
  stay empty);
* a horizontal edge lying exactly on a scan line and running right to left in pixel space also burns
  ``[floor(x_end + 0.5), floor(x_start + 0.5))``; other horizontal edges add nothing.

These rules were checked against rasterio 1.4 with GDAL 3.10 (tests/test_burn.py compares the two on
random polygons, many with vertices on pixel corners and centres).

A MultiPolygon is burned part by part (rasterio splits it), so overlapping parts form a union. Pixels are
only ever set to ``value``: overlapping polygons form a union and the rest of ``out`` is left as it was.

How: the (edge, row) crossings of the window's rows are generated with ``np.repeat``, their columns
computed, sorted by (polygon, row, column) in one stable sort and paired into spans; the spans are written
as 64-bit words (whole words by one scatter, the partial words at their ends by read-modify-write).
``benchmarks/bench_burn.py`` compares it with rasterio on 512 x 5000 strips of ~150 buildings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine

__all__ = ["Edges", "burn", "polygon_edges"]

log = logging.getLogger(__name__)

_POLYGON, _MULTIPOLYGON = 3, 6
# Pixels are filled as little-endian 64-bit words, so byte k of word w is flat pixel 8w + k on any machine.
_WORD = np.dtype("<u8")
# _BYTES[9 * lo + hi]: a word whose bytes lo .. hi - 1 are 0xFF (0 <= lo, hi <= 8).
_LOW, _HIGH = np.divmod(np.arange(81), 9)
_BYTES = ((np.arange(8) >= _LOW[:, None]) & (np.arange(8) < _HIGH[:, None])).astype(np.uint8)
_BYTES = (_BYTES * np.uint8(0xFF)).view(_WORD).ravel()


@dataclass(frozen=True, slots=True)
class Edges:
    """Polygon edges in a raster's pixel space, one array entry per edge.

    Pixel ``(r, c)`` spans ``[c, c + 1) x [r, r + 1)``: x is the column, y the row. From
    :func:`polygon_edges`, every ring runs clockwise in georeferenced coordinates, as GDAL burns it (its
    rule for horizontal edges depends on the direction), and each polygon's edges are contiguous with
    ascending ids: :func:`burn` is correct for any order, and fastest for that one. Plain arrays: pickles
    small and fast (about 72 bytes per edge with ``geo``).

    Attributes:
        x0: x of each edge's start (float64).
        y0: y of each edge's start.
        x1: x of each edge's end.
        y1: y of each edge's end.
        polygon: int64, the polygon each edge belongs to; the rings of one polygon fill together (even-odd).
        geo: (4, n) float64 georeferenced ``X0, Y0, X1, Y1`` of each edge, or None. When given,
            :func:`burn` maps them through the window's own geotransform, bit for bit as GDAL does;
            without them it shifts ``x0..y1`` by the window offset (identical except when a crossing
            falls within rounding error of a pixel centre).
        transform: the raster's affine transform (georeferenced = transform * pixel), with ``geo``.
    """

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    polygon: np.ndarray
    geo: np.ndarray | None = None
    transform: Affine | None = None

    def __len__(self) -> int:
        return len(self.x0)

    def take(self, index: np.ndarray) -> Edges:
        """The edges at ``index`` (integer positions or a boolean mask), in their order."""
        return Edges(self.x0[index], self.y0[index], self.x1[index], self.y1[index], self.polygon[index],
                     None if self.geo is None else self.geo[:, index], self.transform)

    def select(self, row_start: int, row_stop: int) -> Edges:
        """The edges that can cross the pixel-centre lines of rows ``row_start .. row_stop - 1``.

        Kept: ``min(y0, y1) <= row_stop`` and ``max(y0, y1) >= row_start`` (half a row of slack on each
        side, so rounding in :func:`burn`'s window transform cannot lose an edge). Edges left or right of
        any window are kept: they decide which side of them is inside.
        """
        lo, hi = np.minimum(self.y0, self.y1), np.maximum(self.y0, self.y1)
        return self.take(np.flatnonzero((lo <= row_stop) & (hi >= row_start)))


def _inverse(transform: Affine) -> tuple[float, float, float, float, float, float]:
    """``GDALInvGeoTransform`` of ``transform``, in GDAL order (c, a, b, f, d, e), with its arithmetic."""
    c, a, b, f, d, e = transform.to_gdal()
    if b == 0.0 and d == 0.0 and a != 0.0 and e != 0.0:
        return -c / a, 1.0 / a, 0.0, -f / e, 0.0, 1.0 / e
    det = a * e - b * d
    if abs(det) <= 1e-10 * max(abs(a), abs(b), abs(d), abs(e)) ** 2:
        raise ValueError(f"transform {tuple(transform)[:6]} is not invertible (determinant {det})")
    inv = 1.0 / det
    return (b * f - c * e) * inv, e * inv, -b * inv, (-a * f + c * d) * inv, -d * inv, a * inv


def _to_pixels(transform: Affine, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of georeferenced points, as GDAL's geotransform transformer computes them.

    ``inv[0] + X * inv[1] + Y * inv[2]`` (and likewise for rows); a zero term only adds a signed zero,
    which changes no finite value, so north-up transforms skip it.
    """
    c, a, b, f, d, e = _inverse(transform)
    col = c + xs * a if b == 0.0 else c + xs * a + ys * b
    row = f + ys * e if d == 0.0 else f + xs * d + ys * e
    return col, row


def _clockwise(coords: np.ndarray, ring: np.ndarray, n_rings: int) -> np.ndarray:
    """Whether each closed ring is clockwise, decided as OGR's ``OGRSimpleCurve::isClockwise`` does.

    The turn at the lowest (then rightmost) vertex decides; where that vertex repeats or a neighbour is
    within 1e-5 of it, or the turn is straight, the sign of the shoelace sum does.
    """
    if n_rings == 0:
        return np.zeros(0, bool)
    x, y = coords[:, 0], coords[:, 1]
    count = np.bincount(ring, minlength=n_rings)
    first = np.cumsum(count) - count
    closing = np.cumsum(count) - 1
    candidate = np.ones(len(x), bool)
    candidate[closing] = False
    cand = np.flatnonzero(candidate)
    order = cand[np.lexsort((cand, -x[cand], y[cand], ring[cand]))]
    head = np.r_[True, ring[order[1:]] != ring[order[:-1]]]
    v = order[head]
    nxt_in_order = order[np.minimum(np.flatnonzero(head) + 1, len(order) - 1)]
    repeated = (ring[nxt_in_order] == ring[v]) & (nxt_in_order != v) & (x[nxt_in_order] == x[v]) & (
        y[nxt_in_order] == y[v])
    prev = np.where(v > first, v - 1, closing - 1)
    follow = np.where(v + 1 < closing, v + 1, first)
    near = repeated.copy()
    for other in (prev, follow):
        near |= (np.abs(x[other] - x[v]) < 1e-5) & (np.abs(y[other] - y[v]) < 1e-5)
    dx0, dy0, dx1, dy1 = x[prev] - x[v], y[prev] - y[v], x[follow] - x[v], y[follow] - y[v]
    cross = dx1 * dy0 - dx0 * dy1
    # Shoelace fallback over all points, neighbours taken cyclically over the closed sequence.
    idx = np.arange(len(x))
    after = np.where(idx == closing[ring], first[ring], idx + 1)
    before = np.where(idx == first[ring], closing[ring], idx - 1)
    area = np.add.reduceat(x * (y[after] - y[before]), first)
    return np.where(near | (cross == 0), area < 0, cross < 0)


def polygon_edges(geoms: np.ndarray | Sequence[shapely.Geometry], transform: Affine) -> Edges:
    """The edges of Polygon/MultiPolygon geometries (holes included) in the pixel space of ``transform``.

    Each part of a MultiPolygon is its own polygon (as rasterio burns them); ``polygon`` numbers the parts
    in order. Empty geometries contribute nothing.

    Raises:
        ValueError: a geometry that is neither a Polygon nor a MultiPolygon (nor empty), or a
            non-invertible transform.
    """
    geoms = np.asarray(geoms, dtype=object).ravel()
    if len(geoms) == 0:
        geoms = np.empty(0, dtype=object)
    types = shapely.get_type_id(geoms)
    bad = ~np.isin(types, (_POLYGON, _MULTIPOLYGON)) & ~shapely.is_empty(geoms)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        kind = "None" if geoms[i] is None else geoms[i].geom_type
        raise ValueError(f"geometry {i} is a {kind}; only Polygon and MultiPolygon can be burned")
    parts = shapely.get_parts(geoms[types >= 0])
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    if not np.isfinite(coords).all():
        raise ValueError("geometries with NaN or infinite coordinates cannot be burned")
    start = np.flatnonzero(ring[1:] == ring[:-1])
    gx0, gy0, gx1, gy1 = coords[start, 0], coords[start, 1], coords[start + 1, 0], coords[start + 1, 1]
    # GDAL burns every ring (holes too) clockwise: turn the others round (edges swap their ends).
    turn = ~_clockwise(coords, ring, len(rings))[ring[start]]
    gx0, gx1 = np.where(turn, gx1, gx0), np.where(turn, gx0, gx1)
    gy0, gy1 = np.where(turn, gy1, gy0), np.where(turn, gy0, gy1)
    x0, y0 = _to_pixels(transform, gx0, gy0)
    x1, y1 = _to_pixels(transform, gx1, gy1)
    return Edges(x0, y0, x1, y1, ring_part[ring[start]].astype(np.int64),
                 np.stack([gx0, gy0, gx1, gy1]), transform)


def _window_coords(edges: Edges, row_off: int, col_off: int) -> tuple[np.ndarray, ...]:
    """Edge end points in the window's pixel space (GDAL's arithmetic when georeferenced points are known)."""
    if edges.geo is None or edges.transform is None:
        return edges.x0 - col_off, edges.y0 - row_off, edges.x1 - col_off, edges.y1 - row_off
    window = edges.transform @ Affine.translation(col_off, row_off)  # same floats as chips.window_transform
    x0, y0 = _to_pixels(window, edges.geo[0], edges.geo[1])
    x1, y1 = _to_pixels(window, edges.geo[2], edges.geo[3])
    return x0, y0, x1, y1


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each start s and count n (counts >= 0)."""
    total = int(counts.sum())
    out = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    out += np.arange(total)
    return out


def _spans(xa, ya, xb, yb, polygon: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat ``[start, end)`` pixel ranges of the window to set (may overlap; empty ones dropped)."""
    up = ya < yb
    ylo, yhi = np.where(up, ya, yb), np.where(up, yb, ya)
    xlo, xhi = np.where(up, xa, xb), np.where(up, xb, xa)
    # Rows r with ylo <= r + 0.5 < yhi, inside the window (y - 0.5 is exact for these magnitudes).
    first = np.clip(np.ceil(ylo - 0.5), 0, height).astype(np.int64)
    counts = np.maximum(np.clip(np.ceil(yhi - 0.5), 0, height).astype(np.int64) - first, 0)
    # The (polygon, row) of each crossing as one integer (a run per edge), the key's high bits below.
    col_bits, row_bits = int(width).bit_length(), int(height - 1).bit_length()
    if len(polygon) and (polygon.min() < 0 or polygon.max() >= 2 ** (62 - col_bits - row_bits)):
        polygon = np.unique(polygon, return_inverse=True)[1]
    group = _ranges((polygon << row_bits) + first, counts)
    # GDAL's expression, in its order, for every (edge, row) crossing.
    x = (group & ((1 << row_bits) - 1)) + 0.5
    x -= np.repeat(ylo, counts)
    x *= np.repeat(xhi - xlo, counts)
    x /= np.repeat(yhi - ylo, counts)
    x += np.repeat(xlo, counts)
    # Columns clipped to [0, width]: the order and the clipped [a, b) ranges stay the same.
    x += 0.5
    col = np.clip(np.floor(x, out=x), 0, width, out=x).astype(np.int64)
    # Sorted by (polygon, row, column). Crossings come edge by edge, rows ascending, polygons ascending: a
    # few sorted runs per polygon, which the stable sort (timsort) merges cheaply.
    key = np.sort((group << col_bits) | col, kind="stable")
    if len(key) % 2:
        raise ValueError("an odd number of edges cross a row of one polygon: its rings are not closed")
    pairs = key.reshape(-1, 2)
    group = pairs >> col_bits
    if not np.array_equal(group[:, 0], group[:, 1]):
        raise ValueError("an odd number of edges cross a row of one polygon: its rings are not closed")
    cols = pairs & ((1 << col_bits) - 1)
    base = (group[:, 0] & ((1 << row_bits) - 1)) * width
    starts, ends = base + cols[:, 0], base + cols[:, 1]

    # GDAL's bottom horizontal edges: exactly on a scan line, running right to left.
    r = ya - 0.5
    flat = (ya == yb) & (xa > xb) & (r >= 0) & (r < height) & (r == np.floor(r))
    if flat.any():
        hbase = r[flat].astype(np.int64) * width
        h0 = np.clip(np.floor(xb[flat] + 0.5), 0, width).astype(np.int64)
        h1 = np.clip(np.floor(xa[flat] + 0.5), 0, width).astype(np.int64)
        starts, ends = np.concatenate([starts, hbase + h0]), np.concatenate([ends, hbase + h1])
    keep = starts < ends
    return (starts, ends) if keep.all() else (starts[keep], ends[keep])


def _fill(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, value: int) -> None:
    """Set ``flat[s:e] = value`` for every non-empty range; ``flat`` is uint8, its length a multiple of 8."""
    words = flat.view(_WORD)
    fill = np.uint64(0x0101010101010101 * value)
    first, last = (starts + 7) >> 3, ends >> 3  # the whole words of each range: [first, last)
    words[_ranges(first, np.maximum(last - first, 0))] = fill
    # The first and the last word w of each range get its bytes [max(s - 8w, 0), min(e - 8w, 8)).
    head, tail = starts >> 3, (ends - 1) >> 3
    which = np.concatenate([head, tail])
    code = np.concatenate([9 * (starts & 7) + np.minimum(ends - (head << 3), 8),
                           9 * np.maximum(starts - (tail << 3), 0) + ((ends - 1) & 7) + 1])
    mask = _BYTES[code]
    bits = (_BYTES & fill)[code]
    # Read-modify-write; where several ranges share a word only the last write lands, so the others
    # (checked afterwards) go again, reading what landed: at most as many rounds as ranges share a word.
    while len(which):
        words[which] = (words[which] & ~mask) | bits
        again = np.flatnonzero((words[which] & mask) != bits)
        which, mask, bits = which[again], mask[again], bits[again]


def burn(edges: Edges, out: np.ndarray, row_off: int = 0, col_off: int = 0, value: int = 1) -> np.ndarray:
    """Set ``out[r, c] = value`` where the centre of pixel ``(row_off + r, col_off + c)`` is inside a polygon.

    GDAL's rule with ``all_touched=False``; see the module docstring. Other pixels are left untouched.

    Args:
        edges: from :func:`polygon_edges` (all of them, or :meth:`Edges.select` of the window's rows).
        out: 2-D uint8 (height, width), the window whose pixel (0, 0) is ``(row_off, col_off)``.
        row_off: the window's first row in the edges' pixel space.
        col_off: the window's first column.
        value: the value to burn, 0-255.

    Returns:
        ``out``.

    Raises:
        ValueError: ``out`` is not a 2-D uint8 array, ``value`` does not fit in uint8, or edges built by
            hand leave a polygon's rings open (an odd number of crossings on a row).
    """
    if out.ndim != 2 or out.dtype != np.uint8:
        raise ValueError(f"out must be a 2-D uint8 array, got {out.ndim}-D {out.dtype}")
    if not 0 <= value <= 255:
        raise ValueError(f"value {value} does not fit in uint8 (0-255)")
    height, width = out.shape
    if len(edges) == 0 or out.size == 0:
        return out
    xa, ya, xb, yb = _window_coords(edges, row_off, col_off)
    starts, ends = _spans(xa, ya, xb, yb, edges.polygon, height, width)
    if len(starts) == 0:
        return out
    size = out.size
    if out.flags.c_contiguous and size % 8 == 0 and out.ctypes.data % 8 == 0:
        _fill(out.reshape(-1), starts, ends, value)
    else:
        buffer = np.empty(-(-size // 8) * 8, np.uint8)
        buffer[:size] = out.reshape(-1)
        _fill(buffer, starts, ends, value)
        out[...] = buffer[:size].reshape(out.shape)
    return out
