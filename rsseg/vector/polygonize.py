"""Blockwise polygonisation of a building mask, in integer pixel coordinates.

A mask is polygonised block by block with :func:`rasterio.features.shapes` (4-connectivity, as GDAL and
rasterio default to), in the pixel coordinates of the whole raster, where every vertex is an integer and
unions are exact. A building cut by block borders leaves one piece in each block it crosses; only pieces
that touch an inner block border can have such neighbours, and :func:`merge_pieces` joins pieces that share
a border segment of positive length (4-connected pixels across the border), so the result equals
polygonising the whole raster at once: the same polygons, with the same holes. Pieces that meet only at a
corner stay apart, as they do under 4-connectivity. Everything here works on arrays already in memory;
reading blocks of a raster and running them in parallel is :mod:`rsseg.vector.blockwise`'s job.
"""

from __future__ import annotations

import numpy as np
import shapely
from rasterio import Affine
from rasterio.features import shapes
from rasterio.windows import Window, subdivide

from rsseg.errors import ConfigError, RasterError
from rsseg.metrics import components

__all__ = ["block_windows", "building_pixels", "merge_pieces", "on_inner_border", "polygonize_pixels"]

#: Values a building mask may hold: 0 for background, 1 or 255 for buildings (one of the two per raster).
MASK_VALUES = frozenset({0, 1, 255})


def block_windows(width: int, height: int, block: int) -> list[Window]:
    """Windows of ``block`` x ``block`` pixels covering a ``width`` x ``height`` raster, row by row.

    Window ``(i, j)`` starts at column ``j * block`` and row ``i * block``; the last column and row of
    windows are narrower where ``block`` does not divide the size, so every pixel is in exactly one window.
    """
    if block < 1:
        raise ConfigError(f"block size {block}: expected a positive number of pixels (e.g. 2048)")
    return subdivide(Window(0, 0, width, height), block, block)


def _describe(window: Window) -> str:
    return f"window col {window.col_off}, row {window.row_off}, {window.width}x{window.height} px"


def _bad_values(values: np.ndarray, nodata: float | None, window: Window, source: str) -> RasterError:
    valid = values == values  # False on NaN
    if nodata is not None:
        valid &= values != nodata
    found = np.unique(values[valid])
    wrong = [v for v in found.tolist() if v not in MASK_VALUES]
    shown = ", ".join(f"{v:g}" for v in wrong[:8]) + (", ..." if len(wrong) > 8 else "")
    return RasterError(f"{source}: {_describe(window)} holds pixel values {shown} (nodata {nodata}); a "
                       "building mask holds 0/1 or 0/255. Threshold a probability raster first, or pass it "
                       "as --prob next to its mask")


def building_pixels(values: np.ndarray, nodata: float | None, window: Window,
                    source: str = "mask") -> tuple[np.ndarray, frozenset[int]]:
    """Check a block of mask values and return its building pixels and the building values it holds.

    Args:
        values: the block, any numeric dtype.
        nodata: the raster's nodata value (pixels holding it are neither checked nor buildings), or None.
        window: where the block lies (named in error messages).
        source: the raster's name, for error messages.

    Returns:
        A boolean array, True on building pixels (1 or 255), and which of 1 and 255 occur, so the caller
        can check that the whole raster keeps to one convention (0/1 or 0/255).

    Raises:
        RasterError: the block holds values other than 0, 1 and 255, or both 1 and 255.
    """
    if values.dtype == np.uint8 and (nodata is None or nodata in (0, 255) or 2 <= nodata <= 254):
        # Fast path for the usual masks, in a few whole-array passes: 0/1 masks are booleans already.
        top = int(values.max()) if values.size else 0
        if top <= 1:
            return values.view(bool), frozenset({1} & {top})
        outside = (values - np.uint8(2)) < 253  # 2..254
        if nodata is not None and 2 <= nodata <= 254:
            outside &= values != nodata
        if outside.any():
            raise _bad_values(values, nodata, window, source)
        has_255 = nodata != 255 and top == 255
        present = frozenset(({255} if has_255 else set()) | ({1} if (values == 1).any() else set()))
        building = (values != 0) if has_255 else (values == 1)
        if has_255 and nodata is not None and nodata != 0:
            building &= values != nodata
    else:
        valid = values == values  # False on NaN
        if nodata is not None:
            valid &= values != nodata
        present = frozenset(np.unique(values[valid]).tolist())
        if present - MASK_VALUES:
            raise _bad_values(values, nodata, window, source)
        present = frozenset(int(v) for v in present - {0})
        building = (values != 0) & valid
    if {1, 255} <= present:
        raise RasterError(f"{source}: {_describe(window)} holds both 1 and 255; a building mask uses one "
                          "convention, 0/1 or 0/255")
    return building, present


def polygonize_pixels(building: np.ndarray, col_off: int = 0, row_off: int = 0) -> np.ndarray:
    """Polygons of the 4-connected building regions of a block, in pixel coordinates of the raster.

    Vertex ``(x, y)`` is the corner between columns ``x - 1`` and ``x`` and rows ``y - 1`` and ``y`` of the
    whole raster (the block's own corners shifted by ``col_off``, ``row_off``), so all vertices are integers.
    Holes are kept. The polygons are built in bulk (one ragged array), not one by one.
    """
    pixels = building.view(np.uint8)
    found = shapes(pixels, mask=building, connectivity=4, transform=Affine.translation(col_off, row_off))
    rings: list = []
    ring_counts: list[int] = []
    for geometry, _ in found:
        polygon = geometry["coordinates"]
        ring_counts.append(len(polygon))
        rings.extend(polygon)
    if not rings:
        return np.empty(0, dtype=object)
    ring_sizes = np.fromiter((len(ring) for ring in rings), np.int64, len(rings))
    coords = np.fromiter((value for ring in rings for point in ring for value in point), np.float64,
                         2 * int(ring_sizes.sum())).reshape(-1, 2)
    ring_offsets = np.concatenate([[0], np.cumsum(ring_sizes)])
    polygon_offsets = np.concatenate([[0], np.cumsum(ring_counts)])
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, polygon_offsets))


def on_inner_border(polygons: np.ndarray, window: Window, width: int, height: int) -> np.ndarray:
    """Which polygons of a block touch one of its borders that is not the raster's outer edge.

    Only those can continue in a neighbouring block; the others are whole buildings.
    """
    left, top, right, bottom = shapely.bounds(polygons).T
    col0, row0 = window.col_off, window.row_off
    col1, row1 = col0 + window.width, row0 + window.height
    return (((left == col0) & (col0 > 0)) | ((right == col1) & (col1 < width))
            | ((top == row0) & (row0 > 0)) | ((bottom == row1) & (row1 < height)))


def merge_pieces(pieces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Join pieces of buildings cut by block borders.

    Pieces sharing a border segment of positive length (DE-9IM boundary/boundary dimension 1) belong to
    one 4-connected region and are unioned, transitively; pieces touching only at a corner are not. The
    union is exact in integer pixel coordinates, and collinear vertices left on the seams are removed.

    Args:
        pieces: polygons in pixel coordinates, from different blocks.

    Returns:
        The merged polygons, and for each piece the index of the polygon it went into (to add up
        per-piece sums such as probability totals with :func:`numpy.bincount`).
    """
    if len(pieces) == 0:
        return pieces, np.empty(0, np.int64)
    first, second = shapely.STRtree(pieces).query(pieces, predicate="intersects")
    keep = first < second
    first, second = first[keep], second[keep]
    shared = shapely.relate_pattern(pieces[first], pieces[second], "****1****")
    group = components(len(pieces), first[shared], second[shared])
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.diff(group[order], prepend=-1))
    merged = pieces[order[starts]]
    joined = np.flatnonzero(np.diff(np.append(starts, len(order))) > 1)
    members = np.split(order, starts[1:])
    unions = np.array([shapely.union_all(pieces[members[k]]) for k in joined], dtype=object)
    merged[joined] = shapely.simplify(unions, 0.0)  # drops the collinear vertices left on the seams
    return merged, group
