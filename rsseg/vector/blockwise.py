"""Building masks to map polygons: blockwise on Dask, cleaned, attributed and written for GIS.

The mask GeoTIFF is read in windows (``block`` x ``block`` pixels), one Dask task per window. A task
checks the window's values (0/1 or 0/255, nodata ignored), polygonises its buildings in integer pixel
coordinates (:mod:`rsseg.vector.polygonize`), sums the probability raster under each polygon, and finishes
every building that does not touch an inner window border (:mod:`rsseg.vector.cleaning`): it maps it to the
raster's CRS, computes its ground area, drops it if smaller than ``min_area``, simplifies and
regularises it, reprojects it to the output CRS and repairs it if needed. Pieces of buildings cut by
window borders come back in pixel coordinates; the client joins them exactly and finishes them the same
way. The result is the same set of polygons as polygonising the whole raster at once, with memory
bounded by the window size. :mod:`rsseg.vector.files` writes the result (GeoJSON features formatted on
the workers too).

Areas and tolerances are in metres whatever the CRS (:mod:`rsseg.vector.cleaning`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from distributed import Client, as_completed
from rasterio import Affine
from rasterio.errors import RasterioIOError
from rasterio.features import rasterize
from rasterio.windows import Window
from tqdm.auto import tqdm

from rsseg.errors import ConfigError, RasterError
from rsseg.fileio import raster_env
from rsseg.pipeline.cluster import dask_client
from rsseg.vector.cleaning import Buildings, Cleaning, finish, make_cleaning
from rsseg.vector.files import output_driver, write_vectors
from rsseg.vector.polygonize import block_windows, building_pixels, merge_pieces, on_inner_border, polygonize_pixels

__all__ = ["vectorize", "vectorize_to_file"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class _Block:
    """One Dask task: a window of the mask (and of the probability raster, if any)."""

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
    pieces: np.ndarray  # pixel polygons touching an inner window border
    piece_sum: np.ndarray
    piece_count: np.ndarray

    def __reduce__(self) -> tuple:
        """Pickle the pieces as one WKB array (see :meth:`Buildings.__reduce__`)."""
        return _result_from_wkb, (self.values, self.buildings, shapely.to_wkb(self.pieces), self.piece_sum,
                                  self.piece_count)


def _result_from_wkb(values: frozenset[int], buildings: Buildings, pieces: np.ndarray, *sums: np.ndarray
                     ) -> _BlockResult:
    return _BlockResult(values, buildings, shapely.from_wkb(pieces), *sums)


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
    """Polygonise one window and finish the buildings wholly inside it (a Dask task)."""
    with raster_env(), rasterio.open(block.mask) as src:
        values = src.read(block.band, window=block.window)
        nodata = src.nodatavals[block.band - 1]
    building, present = building_pixels(values, nodata, block.window, block.mask)
    pixels = polygonize_pixels(building, block.window.col_off, block.window.row_off)
    if block.prob and len(pixels):
        with raster_env():
            prob_sum, prob_count = _prob_sums(block, pixels)
    else:
        prob_sum = prob_count = np.zeros(len(pixels))
    edge = on_inner_border(pixels, block.window, block.width, block.height)
    inside = ~edge
    return _BlockResult(present, finish(pixels[inside], prob_sum[inside], prob_count[inside], block.cleaning),
                        pixels[edge], prob_sum[edge], prob_count[edge])


@contextlib.contextmanager
def _workers(scheduler: object, n_blocks: int) -> Iterator[Client | None]:
    """The Dask client to run ``n_blocks`` block tasks on, or None to run them in this process.

    None for ``scheduler="sync"``, and for a single window when no scheduler is named; else
    :func:`rsseg.pipeline.cluster.dask_client`.
    """
    if scheduler == "sync" or (scheduler is None and n_blocks == 1):
        yield None
        return
    with dask_client(scheduler) as client:
        yield client


def _run(blocks: list[_Block], client: Client | None) -> list[_BlockResult]:
    """Run the block tasks on ``client``, or in this process if it is None."""
    progress = {"total": len(blocks), "desc": "vectorize", "unit": "block", "disable": None}
    if client is None:
        return [_run_block(block) for block in tqdm(blocks, **progress)]
    futures = client.map(_run_block, blocks, pure=False)
    order = {future.key: i for i, future in enumerate(futures)}
    results: list = [None] * len(blocks)
    try:
        for future, result in tqdm(as_completed(futures, with_results=True), **progress):
            results[order[future.key]] = result
    except BaseException:
        client.cancel(futures)
        raise
    return results


def _open(path: Path) -> rasterio.DatasetReader:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise RasterError(f"{path}: not a raster GDAL can read ({exc})") from None


def _check_inputs(src: rasterio.DatasetReader, path: Path, band: int, prob: Path | None) -> None:
    if src.crs is None:
        raise RasterError(f"{path}: no CRS; polygons need a georeferenced mask (set one with "
                          "`rio edit-info --crs EPSG:XXXX` or `gdal_edit.py -a_srs`)")
    if not 1 <= band <= src.count:
        raise RasterError(f"{path}: no band {band}; the raster has bands 1 to {src.count}")
    if prob is None:
        return
    with _open(Path(prob)) as psrc:
        if (psrc.width, psrc.height) != (src.width, src.height) or not psrc.transform.almost_equals(
                src.transform):
            raise RasterError(f"{prob}: probability raster on another grid ({psrc.width}x{psrc.height}, "
                              f"{tuple(psrc.transform)[:6]}) than the mask {path} ({src.width}x{src.height}, "
                              f"{tuple(src.transform)[:6]})")
        if psrc.dtypes[0] not in ("uint8", "float32", "float64"):
            raise RasterError(f"{prob}: probabilities of type {psrc.dtypes[0]}; expected uint8 (0-255) or "
                              "float32 (0-1)")


def _rsseg_tags(src: rasterio.DatasetReader, band: int) -> dict[str, str]:
    """The mask's rsseg tags: the ``rsseg`` namespace, or ``rsseg_KEY`` / ``rsseg:KEY`` items.

    GDAL reads an item named ``rsseg:KEY`` as ``rsseg=KEY=VALUE`` (``:`` separates names from values in
    GDAL metadata), so that form is recognised too.
    """
    found = dict(src.tags(ns="rsseg"))
    for tags in (src.tags(), src.tags(band)):
        for key, value in tags.items():
            if key == "rsseg" and "=" in value:
                key, _, value = f"rsseg:{value}".partition("=")
            if key.startswith(("rsseg:", "rsseg_")):
                found[key[6:]] = value
    return found


def _provenance(src: rasterio.DatasetReader, path: Path, band: int, **options: object) -> dict[str, str]:
    """Where the polygons come from: the mask, its CRS, its rsseg tags, and the options used.

    Inference tags its rasters with the checkpoint hash, threshold, TTA and source image.
    """
    info = {"mask": str(path.resolve()), "mask_crs": src.crs.to_string(), "band": str(band),
            "code_version": version("rsseg")}
    info.update(_rsseg_tags(src, band))
    info.update({key: str(value) for key, value in options.items() if value is not None})
    return info


def vectorize(mask_raster: str | Path, min_area: float = 0.0, simplify: float = 0.0, *,
              prob: str | Path | None = None, regularize: bool = False, band: int = 1, block: int = 2048,
              scheduler: object = None, crs: str | None = None) -> gpd.GeoDataFrame:
    """Polygons of the buildings in a mask GeoTIFF.

    Args:
        mask_raster: a GeoTIFF whose ``band`` holds 0 for background and 1 (or 255) for buildings; pixels
            equal to its nodata value count as background.
        min_area: drop buildings smaller than this many square metres (measured on the ground).
        simplify: topology-preserving simplification tolerance in metres (0: keep pixel outlines).
        prob: a probability raster on the same grid (uint8 0-255 or float 0-1); adds ``mean_prob``.
        regularize: square up outlines along each building's dominant orientation
            (:mod:`rsseg.vector.regularize`); areas stay within 10% or the outline is left as is.
        band: the band of ``mask_raster`` holding the mask.
        block: window size in pixels; each window is one Dask task.
        scheduler: a :class:`distributed.Client`, a scheduler address, None for the current client or a
            LocalCluster (a single window runs in this process), or ``"sync"`` to run here, serially.
        crs: CRS of the output polygons (default: the mask's).

    Returns:
        One row per building, ordered by position (top to bottom, then left to right), with ``id``
        (1..n), ``area_m2`` and, when ``prob`` is given, ``mean_prob``; ``attrs["provenance"]`` records
        the mask, its CRS, its ``rsseg`` tags (checkpoint hash, threshold, ...) and the options.

    Raises:
        RasterError: the mask is not a raster, has no CRS, lacks ``band``, or holds values other than
            0/1 or 0/255; the probability raster is on another grid.
    """
    blocks, provenance = _plan(Path(mask_raster), min_area, simplify, prob, regularize, band, block, crs)
    with _workers(scheduler, len(blocks)) as client:
        return _assemble(blocks, _run(blocks, client), provenance)


def _plan(path: Path, min_area: float, simplify: float, prob: str | Path | None, regularize: bool, band: int,
          block: int, crs: str | None) -> tuple[list[_Block], dict[str, str]]:
    """Check the inputs; the mask's block tasks and provenance (arguments as for :func:`vectorize`)."""
    if min_area < 0 or simplify < 0 or block < 1:
        raise ConfigError(f"min_area ({min_area} m2), simplify ({simplify} m) and block ({block} px) must "
                          "not be negative (block at least 1)")
    with raster_env(), _open(path) as src:
        _check_inputs(src, path, band, Path(prob) if prob else None)
        cleaning = make_cleaning(src.crs.to_string(), src.transform, src.width, src.height, crs, min_area,
                                 simplify, regularize)
        provenance = _provenance(src, path, band=band, min_area_m2=min_area, simplify_m=simplify,
                                 regularize=regularize, prob=prob and str(Path(prob).resolve()))
        blocks = [_Block(str(path), band, window, src.width, src.height, cleaning, prob and str(prob))
                  for window in block_windows(src.width, src.height, block)]
    return blocks, provenance


def _assemble(blocks: list[_Block], results: list[_BlockResult], provenance: dict[str, str]
              ) -> gpd.GeoDataFrame:
    """Join the pieces cut by window borders, finish them, and order all buildings into a GeoDataFrame."""
    path, cleaning = blocks[0].mask, blocks[0].cleaning
    present = frozenset().union(*(r.values for r in results))
    if {1, 255} <= present:
        raise RasterError(f"{path}: some windows mark buildings with 1, others with 255; a building mask "
                          "uses one convention, 0/1 or 0/255")
    log.info("%s: mask convention 0/%d", path, 255 if 255 in present else 1)
    merged, group = merge_pieces(np.concatenate([r.pieces for r in results]))
    sums = [np.bincount(group, np.concatenate([getattr(r, name) for r in results]), len(merged))
            for name in ("piece_sum", "piece_count")]
    found = Buildings.concat([r.buildings for r in results] + [finish(merged, *sums, cleaning)])
    order = np.lexsort((found.left, found.top))
    columns = {"id": np.arange(1, len(order) + 1), "area_m2": found.area_m2[order]}
    if blocks[0].prob:
        columns["mean_prob"] = found.mean_prob[order]
    gdf = gpd.GeoDataFrame(columns, geometry=found.geometry[order], crs=cleaning.out_crs)
    gdf.attrs["provenance"] = provenance
    log.info("%s: %d buildings (%d of them cut by window borders)", path, len(gdf), len(merged))
    return gdf


def vectorize_to_file(mask: str | Path, out: str | Path, min_area: float = 0.0, simplify: float = 0.0,
                      prob: str | Path | None = None, regularize: bool = False, band: int = 1,
                      block: int = 2048, scheduler: object = None) -> int:
    """:func:`vectorize` ``mask`` and :func:`write_vectors` the result to ``out``; return the building count.

    GeoJSON output is computed in EPSG:4326 directly (reprojection happens in the block tasks), and its
    features are formatted on the Dask workers that ran the blocks, if there are several.
    """
    out = Path(out)
    crs = "EPSG:4326" if output_driver(out) == "GeoJSON" else None
    blocks, provenance = _plan(Path(mask), min_area, simplify, prob, regularize, band, block, crs)
    with _workers(scheduler, len(blocks)) as client:
        gdf = _assemble(blocks, _run(blocks, client), provenance)
        write_vectors(gdf, out, client=client)
    return len(gdf)
