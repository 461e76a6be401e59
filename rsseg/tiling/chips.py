"""Cut a large scene into georeferenced chips (and label chips), with an index datasets read.

The scene is never read whole. The window grid is split into blocks of work (:mod:`rsseg.tiling.blocks`):
a few strips of windows of the same grid columns, each strip at most :data:`STRIP_MAX_PX` pixels wide and
each block at most :data:`STRIPS_PER_BLOCK` grid rows tall. Blocks run in this process, one after another,
or on any ``concurrent.futures.Executor`` (a Dask client's ``get_executor()``: the CLI and the pipeline
pass one); memory depends on the window size, not on the scene size. This module validates the inputs,
reads the footprints, runs the blocks through :func:`rsseg.parallel.map_blocks` and writes the index.

Output layout (``OUT_DIR``, written atomically)::

    images/r0003_c0012.tif    source dtype, selected bands, source CRS, the window's exact transform
    labels/r0003_c0012.tif    uint8: 0 background, 1 building, 255 ignore (source nodata, padding or the
                              label raster's ignore value)
    index.csv                 one row per chip, columns INDEX_COLUMNS, paths relative to OUT_DIR
    index.json                scene, crs, size, overlap, bands, dtype, nodata, labels, counts and band_stats
                              (per band: mean, std, p01, p99 of the scene's valid pixels; rsseg.tiling.stats)

A pixel is nodata when every selected band equals the scene's nodata value (GDAL's dataset-mask rule),
when the scene's per-dataset or alpha mask says so, or when it lies beyond the edge of a scene smaller
than one window (padding, filled with the nodata value or 0).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.enums import MaskFlags
from rasterio.windows import union

from rsseg.errors import ConfigError, RasterError
from rsseg.fileio import atomic_dir, display_name, source_name
from rsseg.options import resolve
from rsseg.parallel import map_blocks
from rsseg.tiling.blocks import ChipBlock, ChipJob, sorted_bounds, strip_window, write_block
from rsseg.tiling.footprints import Footprints, load_footprints
from rsseg.tiling.grid import Tile, TileGrid
from rsseg.tiling.labels import LabelRaster, open_label_raster
from rsseg.tiling.options import TileOptions
from rsseg.tiling.stats import BandStats

__all__ = ["INDEX_COLUMNS", "STRIPS_PER_BLOCK", "STRIP_MAX_PX", "TileOptions", "write_chips"]

log = logging.getLogger(__name__)

#: Columns of ``index.csv`` (pinned: :class:`rsseg.training.datasets.ChipDataset` reads them).
INDEX_COLUMNS = ("image", "label", "col_off", "row_off", "width", "height",
                 "minx", "miny", "maxx", "maxy", "building_frac", "nodata_frac")

#: Widest strip a block reads at once, in pixels: bounds a worker's memory (8192 x 1024 x 3 bands = 25 MB).
STRIP_MAX_PX = 8192
#: Grid rows per block: enough that the rows decoded twice (where blocks meet) are few, enough blocks to
#: share a large scene among workers.
STRIPS_PER_BLOCK = 16


def _scene_info(scene: str, bands: list[int] | None, allow_no_crs: bool) -> dict[str, Any]:
    """Validate the scene and the band selection; return what the index and the blocks need."""
    try:
        src_cm = rasterio.open(scene)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"{scene}: not a raster that GDAL can read ({' '.join(str(exc).split())})") from exc
    with src_cm as src:
        if src.crs is None and not allow_no_crs:
            raise RasterError(f"{scene}: has no CRS; chips would lose their georeferencing "
                              "(pass --allow-no-crs / allow_no_crs=True to tile it anyway)")
        chosen = tuple(bands) if bands else tuple(range(1, src.count + 1))
        unknown = [b for b in chosen if not 1 <= b <= src.count]
        if unknown:
            raise RasterError(f"{scene}: unknown band(s) {unknown}; the scene has {src.count} band(s), "
                              f"numbered 1-{src.count}")
        dtypes = {src.dtypes[b - 1] for b in chosen}
        if len(dtypes) > 1:
            raise RasterError(f"{scene}: bands {list(chosen)} mix dtypes {sorted(dtypes)}; select bands "
                              "of one dtype")
        flags = src.mask_flag_enums[chosen[0] - 1]
        return dict(path=source_name(scene), width=src.width, height=src.height, crs=src.crs, transform=src.transform,
                    bounds=tuple(src.bounds), bands=chosen, dtype=dtypes.pop(), nodata=src.nodata,
                    descriptions=tuple(src.descriptions[b - 1] for b in chosen),
                    mask_band=src.nodata is None and (MaskFlags.per_dataset in flags or MaskFlags.alpha in flags))


def _crs_string(crs: rasterio.crs.CRS | None) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _blocks(grid: TileGrid) -> list[tuple[tuple[Tile, ...], ...]]:
    """Split the grid into blocks: strips of at most STRIP_MAX_PX of the same columns, STRIPS_PER_BLOCK rows.

    Within a block the rows two strips share are decoded once, so blocks are tall and as wide as memory
    allows; blocks decode the rows or columns they share with a neighbour twice.
    """
    stride = grid.size - grid.overlap
    per_strip = max(1, (STRIP_MAX_PX - grid.size) // stride + 1)
    n_ranges = -(-grid.n_cols // per_strip)
    n_groups = -(-grid.n_rows // STRIPS_PER_BLOCK)
    return [tuple(tuple(grid.tile(int(i), int(j)) for j in cols) for i in rows)
            for rows in np.array_split(np.arange(grid.n_rows), n_groups)
            for cols in np.array_split(np.arange(grid.n_cols), n_ranges)]


def _label_source(labels: str | None, info: dict[str, Any], label_ignore: float | None
                  ) -> tuple[dict | None, LabelRaster | None, Footprints | None]:
    """What ``index.json`` says of the labels, and the label raster or the footprints (or neither)."""
    if labels is None:
        if label_ignore is not None:
            raise ConfigError(f"label_ignore={label_ignore}: applies to a label raster; pass one with --labels")
        return None, None, None
    try:
        rasterio.open(labels).close()
    except rasterio.errors.RasterioIOError as exc:  # not a raster: footprints (read by load_footprints)
        if label_ignore is not None:
            raise ConfigError(f"label_ignore={label_ignore}: applies to a label raster, and {labels} is not one "
                              "(footprints have no ignore value)") from exc
        footprints = load_footprints(labels, info["crs"], info["bounds"])
        return {"path": source_name(labels), "kind": "vector"}, None, footprints
    raster = open_label_raster(source_name(labels), info, label_ignore)
    meta = {"path": raster.path, "kind": "raster", "building": raster.rule,
            "ignore": _json_number(raster.ignore)}
    return meta, raster, None


def _block_footprints(footprints: Footprints | None, strips: tuple[tuple[Tile, ...], ...],
                      info: dict[str, Any]) -> np.ndarray | None:
    """The footprints that intersect a block's windows, as WKB (None without footprints)."""
    if footprints is None:
        return None
    block = union(strip_window(strips[0]), strip_window(strips[-1]))
    return shapely.to_wkb(footprints.within(sorted_bounds(block, info["transform"])))


def _owned(grid: TileGrid, strips: tuple[tuple[Tile, ...], ...]) -> tuple[int, tuple[int, ...]]:
    """The pixels a block counts in the band statistics (:attr:`ChipBlock.owned`).

    Up to the next column range's first window and each strip up to the next grid row, so each pixel of the
    scene counts once, however the windows overlap.
    """

    def end(offsets: tuple[int, ...], i: int, length: int) -> int:
        return offsets[i + 1] if i + 1 < len(offsets) else length

    return (end(grid.col_offsets, strips[0][-1].col, grid.width),
            tuple(end(grid.row_offsets, strip[0].row, grid.height) for strip in strips))


def _run_blocks(blocks: list[ChipBlock], executor: cf.Executor | None, desc: str,
                counts: dict[str, int]) -> tuple[list[dict[str, Any]], BandStats]:
    """Run the blocks; return their index rows (in grid order) and merged band statistics; update ``counts``."""
    rows: list[dict[str, Any]] = []
    stats = BandStats.empty(len(blocks[0].job.bands), blocks[0].job.dtype)
    for _, (block_rows, block_counts, block_stats) in map_blocks(write_block, blocks, executor, desc=desc):
        rows.extend(block_rows)
        stats += block_stats
        for key, value in block_counts.items():
            counts[key] += value
    rows.sort(key=lambda r: (r["row_off"], r["col_off"]))
    counts["chips"] = len(rows)
    return rows, stats


def write_chips(scene: str | os.PathLike[str], out_dir: str | os.PathLike[str], options: TileOptions | None = None,
                *, labels: str | os.PathLike[str] | None = None, executor: cf.Executor | None = None,
                **values: Any) -> Path:
    """Cut ``scene`` into ``size`` x ``size`` chips overlapping by ``overlap`` pixels.

    Args:
        scene: a raster GDAL can read (GeoTIFF), any dtype, 1-N bands; a local path or a remote name
            (``/vsicurl/https://...``, ``s3://...``, ``gs://...``, ``/vsis3/...``; :mod:`rsseg.fileio`).
        out_dir: output folder; must not exist unless ``overwrite``. Written atomically.
        options: a :class:`TileOptions`; None: the defaults.
        labels: building footprints (GeoJSON, GeoPackage, Shapefile; any CRS; local or remote) or a label
            raster on the scene's grid, read as a class map (:mod:`rsseg.tiling.labels`: 0 background, > 0 building,
            or any band > 127 for a 3-band mask; ``label_ignore`` or its nodata value unless 0: ignore).
        executor: where the blocks run (e.g. a Dask client's ``get_executor()``; its workers must see
            ``out_dir``'s file system); None runs them in this process.
        **values: :class:`TileOptions` fields by name, overriding ``options``.

    Returns:
        The path of ``OUT_DIR/index.csv``.

    Raises:
        RasterError: unreadable scene, no CRS, unknown bands, a label raster on another grid.
        VectorError: unreadable footprints, or footprints that do not overlap the scene.
        ConfigError: size, overlap or max_nodata out of range, an unknown option.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    opts = resolve(TileOptions, options, values)
    scene, out_dir = os.fspath(scene), Path(out_dir)  # a remote scene keeps its name (rsseg.fileio)
    if out_dir.exists() and not opts.overwrite:
        raise FileExistsError(f"{out_dir} exists; remove it, choose another folder or pass --overwrite")
    info = _scene_info(scene, opts.bands, opts.allow_no_crs)
    try:
        grid = TileGrid(info["width"], info["height"], opts.size, opts.overlap)
    except ConfigError as exc:
        raise ConfigError(f"{scene}: {exc}") from exc
    label_meta, label_raster, footprints = _label_source(os.fspath(labels) if labels else None, info,
                                                         opts.label_ignore)
    counts = {"windows": len(grid), "chips": 0, "skipped_all_nodata": 0, "skipped_max_nodata": 0}
    with atomic_dir(out_dir, overwrite=opts.overwrite) as tmp:
        (tmp / "images").mkdir()
        if label_meta:
            (tmp / "labels").mkdir()
        job = ChipJob(scene=info["path"], out_dir=str(tmp.resolve()), size=opts.size, bands=info["bands"],
                      dtype=info["dtype"], nodata=info["nodata"], mask_band=info["mask_band"],
                      max_nodata=opts.max_nodata, crs=info["crs"], transform=info["transform"],
                      width=info["width"], height=info["height"], compress=opts.compress,
                      label_raster=label_raster)
        blocks = [ChipBlock(job, strips, _block_footprints(footprints, strips, info), _owned(grid, strips))
                  for strips in _blocks(grid)]
        rows, stats = _run_blocks(blocks, executor, f"tiling {display_name(scene)}", counts)
        if footprints is not None:
            counts.update(footprints.counts)
        info["band_stats"] = stats.summary(info["bands"], info["descriptions"])
        _write_index(tmp, rows, info, opts, label_meta, counts, grid)
    log.info("%s: %d chips from %d windows under %s (%s)", scene, len(rows), len(grid), out_dir, counts)
    return out_dir / "index.csv"


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN: a NaN nodata value is written as the string "nan"."""
    return "nan" if value is not None and math.isnan(value) else value


def _write_index(tmp: Path, rows: list[dict], info: dict[str, Any], opts: TileOptions, label_meta: dict | None,
                 counts: dict[str, int], grid: TileGrid) -> None:
    with open(tmp / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(scene=info["path"], crs=_crs_string(info["crs"]),
                width=info["width"], height=info["height"], transform=list(info["transform"])[:6],
                size=grid.size, overlap=grid.overlap, n_rows=grid.n_rows, n_cols=grid.n_cols,
                bands=list(info["bands"]), dtype=info["dtype"], nodata=_json_number(info["nodata"]),
                max_nodata=opts.max_nodata, compress=opts.compress, labels=label_meta, counts=counts,
                band_stats=info["band_stats"])
    (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
