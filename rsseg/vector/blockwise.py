"""Building masks to map polygons, block by block: the vector stage's parallel part.

Each ``block`` x ``block`` window of the mask is one unit of parallel work (:func:`rsseg.parallel.map_blocks`):
it checks its values and polygonises its buildings in integer pixel coordinates (:mod:`rsseg.vector.polygonize`),
sums the probability raster under each, and finishes the buildings off its inner borders
(:mod:`rsseg.vector.cleaning`). The caller joins the pieces cut by block borders exactly and finishes them
the same way: the same polygons as polygonising the whole raster at once, with memory bounded by the block.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio import Affine
from rasterio.errors import RasterioIOError
from rasterio.features import rasterize
from rasterio.windows import Window

from rsseg.errors import RasterError
from rsseg.fileio import display_name, file_sha256, is_remote
from rsseg.options import resolve
from rsseg.parallel import map_blocks
from rsseg.vector.cleaning import Buildings, Cleaning, finish, make_cleaning
from rsseg.vector.files import check_output, write_vectors
from rsseg.vector.options import VectorizeOptions
from rsseg.vector.polygonize import block_windows, building_pixels, merge_pieces, on_inner_border, polygonize_pixels

__all__ = ["AREA_DECIMALS", "PROB_DECIMALS", "block_count", "vectorize", "vectorize_to_file"]

#: ``area_m2`` is rounded to 0.01 m2 and ``mean_prob`` to 0.001: no 17-digit floats in the attribute tables.
AREA_DECIMALS, PROB_DECIMALS = 2, 3

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Block:
    """One block: a window of the mask (and of the probability raster, if any)."""

    mask: str
    band: int
    window: Window
    width: int
    height: int
    cleaning: Cleaning
    prob: str | None


@dataclass(frozen=True, slots=True)
class _BlockResult:
    values: frozenset[int]
    buildings: Buildings
    pieces: np.ndarray  # WKB of the pixel polygons touching an inner block border (one array: cheap to pickle)
    piece_sum: np.ndarray
    piece_count: np.ndarray


def _prob_sums(block: _Block, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of valid probability pixels under each pixel polygon of a block.

    Valid means not masked in the raster's dataset mask (nodata value, NaN nodata or mask band).
    """
    window = block.window
    with rasterio.open(block.prob) as src:
        prob = src.read(1, window=window)
        inside = src.read_masks(1, window=window) > 0
    labels = rasterize(zip(pixels, range(1, len(pixels) + 1), strict=True), out_shape=prob.shape,
                       transform=Affine.translation(window.col_off, window.row_off), dtype="int32")
    inside &= labels > 0
    if prob.dtype.kind == "f":
        inside &= np.isfinite(prob)
    label = labels[inside]
    values = prob[inside] / (255.0 if prob.dtype == np.uint8 else 1.0)
    n = len(pixels) + 1
    return (np.bincount(label, weights=values, minlength=n)[1:],
            np.bincount(label, minlength=n)[1:].astype(float))


def _run_block(block: _Block) -> _BlockResult:
    """Polygonise one block and finish the buildings wholly inside it (the per-block function)."""
    with rasterio.open(block.mask) as src:
        values = src.read(block.band, window=block.window)
        nodata = src.nodatavals[block.band - 1]
    building, present = building_pixels(values, nodata, block.window, block.mask)
    pixels = polygonize_pixels(building, block.window.col_off, block.window.row_off)
    if block.prob and len(pixels):
        prob_sum, prob_count = _prob_sums(block, pixels)
    else:
        prob_sum = prob_count = np.zeros(len(pixels))
    edge = on_inner_border(pixels, block.window, block.width, block.height)
    inside = ~edge
    return _BlockResult(present, finish(pixels[inside], prob_sum[inside], prob_count[inside], block.cleaning),
                        shapely.to_wkb(pixels[edge]), prob_sum[edge], prob_count[edge])


def _open(path: str | Path) -> rasterio.DatasetReader:
    """``path`` opened; a remote name (``/vsicurl/https://...``, ``s3://...``) as given, GDAL reports a missing one."""
    if not is_remote(path) and not Path(path).exists():
        raise RasterError(f"{path}: no such file; expected a building mask GeoTIFF")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise RasterError(f"{path}: not a raster GDAL can read ({exc}); expected a GeoTIFF mask") from exc


def _check_inputs(src: rasterio.DatasetReader, path: str | Path, band: int, prob: str | Path | None) -> None:
    if src.crs is None:
        raise RasterError(f"{path}: no CRS; polygons need a georeferenced mask (set one with "
                          "`rio edit-info --crs EPSG:XXXX` or `gdal_edit.py -a_srs`)")
    if not 1 <= band <= src.count:
        raise RasterError(f"{path}: no band {band}; the raster has bands 1 to {src.count}")
    if prob is None:
        return
    with _open(prob) as psrc:
        if (psrc.width, psrc.height) != (src.width, src.height) or not psrc.transform.almost_equals(
                src.transform):
            raise RasterError(f"{prob}: probability raster on another grid ({psrc.width}x{psrc.height}, "
                              f"{tuple(psrc.transform)[:6]}) than the mask {path} ({src.width}x{src.height}, "
                              f"{tuple(src.transform)[:6]})")
        if psrc.dtypes[0] not in ("uint8", "float32", "float64"):
            raise RasterError(f"{prob}: probabilities of type {psrc.dtypes[0]}; expected uint8 (0-255) or "
                              "float32 (0-1)")


def _local_or_remote(name: str | Path) -> str | Path:
    """A local name as a ``Path``, a remote one kept as given (``Path`` turns ``s3://b/k`` into ``s3:/b/k``)."""
    return name if is_remote(name) else Path(name)


def _file_name(value: str) -> str:
    """A local absolute path reduced to its file name (``/vsicurl/``, URLs and other values kept)."""
    return Path(value).name if Path(value).is_absolute() and not value.startswith("/vsi") else value


def _provenance(src: rasterio.DatasetReader, path: str | Path, band: int, prob: str | Path | None, **options: object
                ) -> dict[str, str]:
    """Where the polygons come from: the mask (file name and SHA-256), its CRS, its ``rsseg`` tags, the options.

    Inference tags its rasters (GDAL metadata domain ``rsseg``) with the checkpoint hash, threshold, TTA
    and source image. No absolute local path is recorded: paths in the tags are reduced to file names.
    """
    info = {"mask": display_name(path), "mask_crs": src.crs.to_string(), "band": str(band),
            "code_version": version("rsseg")}
    if not is_remote(path):  # (a remote mask is not downloaded whole to hash it)
        info["mask_sha256"] = file_sha256(path)
    info.update({key: _file_name(value) for key, value in src.tags(ns="rsseg").items()})
    if prob is not None:
        info["prob"] = display_name(prob)
        if not is_remote(prob):
            info["prob_sha256"] = file_sha256(prob)
    info.update({key: str(value) for key, value in options.items() if value is not None})
    return info


def vectorize(mask_raster: str | Path, options: VectorizeOptions | None = None, *, prob: str | Path | None = None,
              crs: str | None = None, executor: Executor | None = None, **values: Any) -> gpd.GeoDataFrame:
    """Polygons of the buildings in a mask GeoTIFF.

    Args:
        mask_raster: a GeoTIFF (local, or remote as ``/vsicurl/https://...``, ``s3://...``, kept as given)
            whose ``band`` holds 0 for background and 1 (or 255) for buildings; pixels equal to its nodata
            value count as background.
        options: :class:`VectorizeOptions` (``min_area`` in m2, ``simplify`` in metres, ``regularize``,
            ``band``, ``block`` in pixels).
        prob: a probability raster on the same grid (uint8 0-255 or float 0-1); adds ``mean_prob``.
        crs: CRS of the output polygons (default: the mask's).
        executor: where the blocks run (a ``concurrent.futures.Executor``, e.g. a Dask client's
            ``get_executor()``); None runs them in this process.
        **values: options by name, overriding ``options`` (``vectorize(m, min_area=20)``).

    Returns:
        One row per building, ordered by position (top to bottom, then left to right), with ``id``
        (1..n), ``area_m2`` (rounded to 0.01) and, when ``prob`` is given, ``mean_prob`` (rounded to
        0.001); ``attrs["provenance"]`` records the mask's (and probability raster's) file name and
        SHA-256, its CRS, its ``rsseg`` tags (checkpoint hash, threshold, ...) and the options.

    Raises:
        ConfigError: an unknown option or a negative size.
        RasterError: the mask is not a raster, has no CRS, lacks ``band``, or holds values other than
            0/1 or 0/255; the probability raster is on another grid.
    """
    opts = resolve(VectorizeOptions, options, values)
    blocks, provenance = _plan(_local_or_remote(mask_raster), opts, prob, crs)
    results = sorted(map_blocks(_run_block, blocks, executor, desc="vectorize"), key=lambda done: done[0])
    return _assemble(blocks, [result for _, result in results], provenance)


def vectorize_to_file(mask: str | Path, out: str | Path, options: VectorizeOptions | None = None, *,
                      prob: str | Path | None = None, executor: Executor | None = None, **values: Any) -> int:
    """:func:`vectorize` ``mask`` and :func:`write_vectors` the result to ``out``; return the building count.

    GeoJSON output is computed in EPSG:4326 directly (reprojection happens in the blocks).

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is not set (checked before any work).
        VectorError: ``out`` has an unsupported extension (checked before any work).
    """
    opts = resolve(VectorizeOptions, options, values)
    crs = "EPSG:4326" if check_output(out, opts.overwrite) == "GeoJSON" else None
    gdf = vectorize(mask, opts, prob=prob, crs=crs, executor=executor)
    write_vectors(gdf, out, overwrite=opts.overwrite)
    return len(gdf)


def block_count(mask: str | Path, options: VectorizeOptions | None = None, **values: Any) -> int:
    """How many blocks :func:`vectorize` splits ``mask`` into (1: nothing to gain from other processes)."""
    opts = resolve(VectorizeOptions, options, values)
    with _open(_local_or_remote(mask)) as src:
        return len(block_windows(src.width, src.height, opts.block))


def _plan(path: str | Path, opts: VectorizeOptions, prob: str | Path | None, crs: str | None
          ) -> tuple[list[_Block], dict[str, str]]:
    """Check the inputs; the mask's blocks and provenance (arguments as for :func:`vectorize`)."""
    with _open(path) as src:
        prob = _local_or_remote(prob) if prob else None
        _check_inputs(src, path, opts.band, prob)
        cleaning = make_cleaning(src.crs.to_string(), src.transform, src.width, src.height, crs, opts.min_area,
                                 opts.simplify, opts.regularize)
        provenance = _provenance(src, path, opts.band, prob, min_area_m2=opts.min_area,
                                 simplify_m=opts.simplify, regularize=opts.regularize)
        blocks = [_Block(str(path), opts.band, window, src.width, src.height, cleaning, prob and str(prob))
                  for window in block_windows(src.width, src.height, opts.block)]
    return blocks, provenance


def _assemble(blocks: list[_Block], results: list[_BlockResult], provenance: dict[str, str]
              ) -> gpd.GeoDataFrame:
    """Join the pieces cut by block borders, finish them, and order all buildings into a GeoDataFrame."""
    path, cleaning = blocks[0].mask, blocks[0].cleaning
    present = frozenset().union(*(r.values for r in results))
    if {1, 255} <= present:
        raise RasterError(f"{path}: some blocks mark buildings with 1, others with 255; a building mask "
                          "uses one convention, 0/1 or 0/255")
    log.info("%s: mask convention 0/%d", path, 255 if 255 in present else 1)
    merged, group = merge_pieces(shapely.from_wkb(np.concatenate([r.pieces for r in results])))
    sums = [np.bincount(group, np.concatenate([getattr(r, name) for r in results]), len(merged))
            for name in ("piece_sum", "piece_count")]
    found = Buildings.concat([r.buildings for r in results] + [finish(merged, *sums, cleaning)])
    order = np.lexsort((found.left, found.top))
    columns = {"id": np.arange(1, len(order) + 1), "area_m2": np.round(found.area_m2[order], AREA_DECIMALS)}
    if blocks[0].prob:
        columns["mean_prob"] = np.round(found.mean_prob[order], PROB_DECIMALS)
    gdf = gpd.GeoDataFrame(columns, geometry=found.geometry[order], crs=cleaning.out_crs)
    gdf.attrs["provenance"] = provenance
    log.info("%s: %d buildings (%d of them cut by block borders)", path, len(gdf), len(merged))
    return gdf
