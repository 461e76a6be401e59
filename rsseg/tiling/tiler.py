"""Cut a large scene into georeferenced chips (and label chips) on Dask, with an index datasets read.

The scene is never read whole. The grid's columns are split into a few bands (:data:`BANDS_PER_THREAD` per
Dask worker thread, each at most :data:`STRIP_MAX_PX` pixels wide); a band is one task, which opens its own
dataset handle and reads its strips (runs of windows along one grid row) one at a time, top to bottom
(:mod:`rsseg.tiling.chips`). Memory therefore depends on the window size, not on the scene size. This module
validates the inputs, prepares the labels, runs the tasks on Dask and writes the index.

Output layout (``OUT_DIR``, written atomically)::

    images/r0003_c0012.tif    source dtype, selected bands, source CRS, the window's exact transform
    labels/r0003_c0012.tif    uint8: 0 background, 1 building, 255 ignore (source nodata or padding)
    index.csv                 one row per chip, columns INDEX_COLUMNS, paths relative to OUT_DIR
    index.json                scene, crs, size, overlap, bands, dtype, nodata, labels and counts

A pixel is nodata when every selected band equals the scene's nodata value (GDAL's dataset-mask rule),
when the scene's per-dataset or alpha mask says so, or when it lies beyond the edge of a scene smaller
than one window (padding, filled with the nodata value or 0).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from distributed import Client, Future, as_completed
from rasterio.enums import MaskFlags
from rasterio.windows import Window
from tqdm import tqdm

from rsseg.errors import ConfigError, RasterError
from rsseg.fileio import atomic_dir, raster_env
from rsseg.pipeline.cluster import dask_client, threads_by_host
from rsseg.tiling.burn import Edges
from rsseg.tiling.chips import ChipJob, chip_block, label_block, strip_window, window_bounds
from rsseg.tiling.footprints import Footprints, check_label_raster, load_footprints
from rsseg.tiling.grid import Tile, TileGrid, grid_offsets

__all__ = ["INDEX_COLUMNS", "BANDS_PER_THREAD", "STRIP_MAX_PX", "Tile", "TileGrid", "grid_offsets", "write_chips"]

log = logging.getLogger(__name__)

#: Columns of ``index.csv`` (pinned: :class:`rsseg.training.datasets.ChipDataset` reads them).
INDEX_COLUMNS = ("image", "label", "col_off", "row_off", "width", "height",
                 "minx", "miny", "maxx", "maxy", "building_frac", "nodata_frac")

#: Widest strip one task reads at once, in pixels: bounds a worker's memory (8192 x 512 x 3 bands = 12 MB).
STRIP_MAX_PX = 8192
#: Tasks (column bands) per worker thread: enough to balance the load, few boundaries decoded twice.
BANDS_PER_THREAD = 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


@contextlib.contextmanager
def _quiet_gdal() -> Iterator[None]:
    """Keep rasterio from logging a GDAL error it also raises (the CLI shows INFO logs on stderr)."""
    logger = logging.getLogger("rasterio._env")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _scene_info(scene: Path, bands: list[int] | None, allow_no_crs: bool) -> dict[str, Any]:
    """Validate the scene and the band selection; return what the index and the tasks need."""
    try:
        with _quiet_gdal():
            src_cm = rasterio.open(scene)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"{scene}: not a raster that GDAL can read ({_one_line(exc)})") from None
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
        return dict(width=src.width, height=src.height, crs=src.crs, transform=src.transform,
                    bounds=tuple(src.bounds), bands=chosen, dtype=dtypes.pop(), nodata=src.nodata,
                    mask_band=src.nodata is None and (MaskFlags.per_dataset in flags or MaskFlags.alpha in flags))


def _crs_string(crs: rasterio.crs.CRS | None) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _tasks(grid: TileGrid, threads: int) -> list[tuple[tuple[Tile, ...], ...]]:
    """Split the grid into bands of grid columns, each a task that walks its strips from top to bottom.

    Neighbouring windows share source blocks; within a task GDAL's block cache decodes the rows two
    strips share once, so blocks are decoded twice only along a boundary between bands. Bands therefore
    span the whole height (no boundary across rows) and are as few as balance allows: two per worker
    thread, or more where a strip would be wider than STRIP_MAX_PX.
    """
    stride = grid.size - grid.overlap
    per_strip = max(1, (STRIP_MAX_PX - grid.size) // stride + 1)
    n_bands = min(grid.n_cols, max(-(-grid.n_cols // per_strip), BANDS_PER_THREAD * threads))
    return [tuple(tuple(grid.tile(i, int(j)) for j in cols) for i in range(grid.n_rows))
            for cols in np.array_split(np.arange(grid.n_cols), n_bands)]


def _label_source(labels: Path | None, info: dict[str, Any]) -> dict | None:
    """``path`` and ``kind`` of the labels: a label raster (checked against the scene's grid) or footprints."""
    if labels is None:
        return None
    try:
        with _quiet_gdal():
            lab_cm = rasterio.open(labels)
    except rasterio.errors.RasterioIOError:  # not a raster: footprints (read by load_footprints)
        return {"path": str(Path(labels).resolve()), "kind": "vector"}
    with lab_cm as lab_src:
        check_label_raster(lab_src, info)
    return {"path": str(Path(labels).resolve()), "kind": "raster"}


def _all_valid(info: dict[str, Any], grid: TileGrid) -> bool:
    """Whether every pixel of every window is valid: no nodata value, no mask, no padding."""
    return info["nodata"] is None and not info["mask_band"] and min(info["width"], info["height"]) >= grid.size


def write_chips(scene: str | os.PathLike[str], out_dir: str | os.PathLike[str], size: int = 512,
                overlap: int = 64, labels: str | os.PathLike[str] | None = None,
                bands: list[int] | None = None, max_nodata: float = 0.5, allow_no_crs: bool = False,
                scheduler: str | Client | None = None, *, overwrite: bool = False,
                compress: str | None = None, n_workers: int | None = None) -> Path:
    """Cut ``scene`` into ``size`` x ``size`` chips overlapping by ``overlap`` pixels, on Dask.

    Args:
        scene: a raster GDAL can read (GeoTIFF), any dtype, 1-N bands.
        out_dir: output folder; must not exist unless ``overwrite``. Written atomically.
        size: chip width and height in pixels.
        overlap: pixels shared by neighbouring chips (stride ``size - overlap``).
        labels: building footprints (GeoJSON, GeoPackage, Shapefile; any CRS) or a label raster on the
            scene's grid (0 background, its nodata value ignore, anything else building).
        bands: 1-based band indexes to keep (default: all).
        max_nodata: skip chips whose nodata fraction exceeds this (chips all nodata are always skipped).
        allow_no_crs: tile a scene that has no CRS (chips then have none either).
        scheduler: a :class:`distributed.Client`, a scheduler address, or None (the current client, or a
            LocalCluster). Workers must see ``out_dir``'s file system.
        overwrite: replace an existing ``out_dir`` once the new one is complete.
        compress: GDAL compression for the chips (e.g. ``"deflate"``); None writes them uncompressed,
            which is fastest to write and to read in training.
        n_workers: workers of a LocalCluster started here (default: the number of CPUs).

    Returns:
        The path of ``OUT_DIR/index.csv``.

    Raises:
        RasterError: unreadable scene, no CRS, unknown bands, a label raster on another grid.
        VectorError: unreadable footprints, or footprints that do not overlap the scene.
        ConfigError: size, overlap or max_nodata out of range.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    scene, out_dir = Path(scene), Path(out_dir)
    if not 0.0 <= max_nodata <= 1.0:
        raise ConfigError(f"max_nodata={max_nodata}: expected a fraction between 0 and 1")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; remove it, choose another folder or pass --overwrite")
    with raster_env():
        info = _scene_info(scene, bands, allow_no_crs)
        try:
            grid = TileGrid(info["width"], info["height"], size, overlap)
        except ValueError as exc:
            raise ConfigError(f"{scene}: {exc}") from None
        label_meta = _label_source(Path(labels) if labels else None, info)
    label_raster = label_meta["path"] if label_meta and label_meta["kind"] == "raster" else None
    vector = label_meta is not None and label_meta["kind"] == "vector"
    # Labels apart (a scene without nodata): the image tasks start first and the footprints are read while
    # they run. Otherwise the footprints are read before anything starts and burned by the image tasks.
    apart = vector and _all_valid(info, grid)
    footprints = load_footprints(labels, info["crs"], info["bounds"]) if vector and not apart else None
    rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    counts = {"windows": len(grid), "chips": 0, "skipped_all_nodata": 0, "skipped_max_nodata": 0}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        if label_meta:
            (tmp / "labels").mkdir()
        with dask_client(scheduler, n_workers) as client:
            threads = threads_by_host(client)
            job = ChipJob(scene=str(scene.resolve()), out_dir=str(tmp.resolve()), size=size, bands=info["bands"],
                          nodata=info["nodata"], mask_band=info["mask_band"], max_nodata=max_nodata,
                          label_raster=label_raster, compress=compress, threads_by_host=threads)
            tasks = _tasks(grid, sum(threads.values()) or 1)
            futures: list[Future] = []
            label_futures: set[Future] = set()
            try:
                futures += [client.submit(chip_block, job, t, _edges(footprints, t, info), pure=False) for t in tasks]
                if apart:
                    footprints = load_footprints(labels, info["crs"], info["bounds"])
                    label_futures = {client.submit(label_block, job, t, _edges(footprints, t, info), pure=False)
                                     for t in tasks}
                    futures += label_futures
                for future in tqdm(as_completed(futures), total=len(futures), desc=f"tiling {scene.name}",
                                   unit="task", disable=None):
                    if future in label_futures:
                        label_rows.extend(future.result())
                        continue
                    task_rows, task_counts = future.result()
                    rows.extend(task_rows)
                    for key, value in task_counts.items():
                        counts[key] += value
            except BaseException:
                client.cancel(futures)  # stop writing into the temporary folder before it is removed
                raise
        if apart:
            by_window = {(r["row_off"], r["col_off"]): r for r in label_rows}
            for row in rows:
                found = by_window[row["row_off"], row["col_off"]]
                row["label"], row["building_frac"] = found["label"], found["building_frac"]
        rows.sort(key=lambda r: (r["row_off"], r["col_off"]))
        counts["chips"] = len(rows)
        if footprints is not None:
            counts.update(footprints.counts)
        _write_index(tmp, rows, info, job, label_meta, counts, grid)
    log.info("%s: %d chips from %d windows under %s (%s)", scene, len(rows), len(grid), out_dir, counts)
    return out_dir / "index.csv"


def _edges(footprints: Footprints | None, strips: tuple[tuple[Tile, ...], ...], info: dict[str, Any]) -> Edges | None:
    """The edges of the footprints that intersect a task's windows (None without footprints)."""
    return None if footprints is None else footprints.edges(_bounds(strips, info), info["transform"])


def _bounds(strips: tuple[tuple[Tile, ...], ...], info: dict[str, Any]) -> tuple[float, float, float, float]:
    first, last = strip_window(strips[0]), strip_window(strips[-1])
    block = Window(first.col_off, first.row_off, first.width, last.row_off + last.height - first.row_off)
    return window_bounds(info["transform"], block)


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN: a NaN nodata value is written as the string "nan"."""
    return "nan" if value is not None and math.isnan(value) else value


def _write_index(tmp: Path, rows: list[dict], info: dict[str, Any], job: ChipJob, label_meta: dict | None,
                 counts: dict[str, int], grid: TileGrid) -> None:
    with open(tmp / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(scene=job.scene, crs=_crs_string(info["crs"]), width=info["width"], height=info["height"],
                transform=list(info["transform"])[:6], size=grid.size, overlap=grid.overlap,
                n_rows=grid.n_rows, n_cols=grid.n_cols, bands=list(info["bands"]), dtype=info["dtype"],
                nodata=_json_number(info["nodata"]), max_nodata=job.max_nodata, compress=job.compress,
                labels=label_meta, counts=counts)
    (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
