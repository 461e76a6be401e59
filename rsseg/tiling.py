"""Cut a large scene into georeferenced chips (and label chips) on Dask, with an index datasets read.

The scene is never read whole: each Dask task opens its own dataset handle and reads one strip (a run of
windows along one grid row, at most :data:`STRIP_MAX_PX` pixels wide) with one windowed read, then
writes that strip's chips. Memory therefore depends on the window size, not on the scene size.

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
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from distributed import Client, as_completed
from rasterio.enums import MaskFlags
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.windows import Window
from tqdm import tqdm

from rsseg.cluster import dask_client
from rsseg.errors import ConfigError, RasterError
from rsseg.fileio import atomic_dir, raster_env
from rsseg.footprints import Footprints, check_label_raster, load_footprints
from rsseg.grid import Tile, TileGrid, grid_offsets

__all__ = ["INDEX_COLUMNS", "STRIP_MAX_PX", "Tile", "TileGrid", "grid_offsets", "write_chips"]

log = logging.getLogger(__name__)

#: Columns of ``index.csv`` (pinned: :class:`rsseg.datasets.ChipDataset` reads them).
INDEX_COLUMNS = ("image", "label", "col_off", "row_off", "width", "height",
                 "minx", "miny", "maxx", "maxy", "building_frac", "nodata_frac")

#: Widest strip one task reads at once, in pixels: bounds a worker's memory (8192 x 512 x 3 bands = 12 MB).
STRIP_MAX_PX = 8192
#: Rows of the scene one task covers (strip after strip), in pixels: sets the number of tasks.
TASK_ROWS_PX = 2048


@dataclass(frozen=True, slots=True)
class _ChipJob:
    """What every task needs besides its windows (pickled to the workers)."""

    scene: str
    out_dir: str
    size: int
    bands: tuple[int, ...]
    nodata: float | None
    mask_band: bool
    max_nodata: float
    label_raster: str | None
    compress: str | None


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


def _window_transform(transform: Affine, window: Window) -> Affine:
    """The transform of ``window``: its pixel (0, 0) maps to the window's corner.

    Same as :meth:`rasterio.io.DatasetReader.window_transform`, which still uses affine's deprecated ``*``.
    """
    return transform @ Affine.translation(window.col_off, window.row_off)


def _window_bounds(transform: Affine, window: Window) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of ``window`` (like :func:`rasterio.windows.bounds`, without ``*``)."""
    cols = (window.col_off, window.col_off + window.width)
    rows = (window.row_off, window.row_off + window.height)
    xs, ys = zip(*(transform @ (c, r) for c in cols for r in rows), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _crs_string(crs: rasterio.crs.CRS | None) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _tasks(grid: TileGrid) -> list[tuple[tuple[Tile, ...], ...]]:
    """Split the grid into blocks of strips: each strip at most STRIP_MAX_PX wide, TASK_ROWS_PX tall per block.

    A task reads its strips one after the other through one dataset handle, so the rows that neighbouring
    strips share come from GDAL's block cache instead of being decoded twice.
    """
    stride = grid.size - grid.overlap
    per_strip = max(1, (STRIP_MAX_PX - grid.size) // stride + 1)
    col_chunks = np.array_split(np.arange(grid.n_cols), -(-grid.n_cols // per_strip))
    row_chunks = np.array_split(np.arange(grid.n_rows), -(-grid.n_rows // max(1, TASK_ROWS_PX // stride)))
    return [tuple(tuple(grid.tile(int(i), int(j)) for j in cols) for i in rows)
            for rows in row_chunks for cols in col_chunks]


def _strip_window(tiles: tuple[Tile, ...]) -> Window:
    first, last = tiles[0], tiles[-1]
    return Window(first.col_off, first.row_off, last.col_off + last.width - first.col_off, first.height)


def _read_strip(src: rasterio.DatasetReader, window: Window, job: _ChipJob) -> tuple[np.ndarray, np.ndarray]:
    """Read ``window`` (padding whatever lies beyond the raster); return (data, valid pixel mask)."""
    inside = window.intersection(Window(0, 0, src.width, src.height))
    data = src.read(job.bands, window=inside)
    if job.nodata is None:
        valid = src.dataset_mask(window=inside) > 0 if job.mask_band else np.ones(data.shape[1:], bool)
    elif np.isnan(job.nodata):
        valid = ~np.isnan(data).all(axis=0)
    else:
        valid = (data != job.nodata).any(axis=0)
    if (inside.width, inside.height) == (window.width, window.height):
        return data, valid
    fill = 0 if job.nodata is None else job.nodata
    full = np.full((len(job.bands), window.height, window.width), fill, dtype=data.dtype)
    full_valid = np.zeros((window.height, window.width), bool)
    r0, c0 = inside.row_off - window.row_off, inside.col_off - window.col_off
    full[:, r0 : r0 + inside.height, c0 : c0 + inside.width] = data
    full_valid[r0 : r0 + inside.height, c0 : c0 + inside.width] = valid
    return full, full_valid


def _raster_labels(label_src: rasterio.DatasetReader, window: Window) -> np.ndarray:
    """Labels from a label raster: 0 background, its nodata value 255 (ignore), anything else 1."""
    inside = window.intersection(Window(0, 0, label_src.width, label_src.height))
    raw = label_src.read(1, window=inside)
    labels = np.full((window.height, window.width), 255, np.uint8)
    part = labels[inside.row_off - window.row_off :, inside.col_off - window.col_off :][
        : inside.height, : inside.width]
    part[...] = raw != 0
    if label_src.nodata is not None:
        part[raw == label_src.nodata] = 255
    return labels


def _vector_labels(footprints: Footprints, window: Window, transform: Affine) -> np.ndarray:
    """Burn the footprints that intersect ``window`` (pixel centres inside a polygon become 1)."""
    labels = np.zeros((window.height, window.width), np.uint8)
    geoms = footprints.intersecting(_window_bounds(transform, window))
    if len(geoms):
        rasterize(geoms, out_shape=labels.shape, transform=_window_transform(transform, window), fill=0,
                  default_value=1, out=labels)
    return labels


def _load_strip(job: _ChipJob, src: rasterio.DatasetReader, label_src: rasterio.DatasetReader | None,
                tiles: tuple[Tile, ...]) -> tuple[Window, np.ndarray, np.ndarray, np.ndarray | None]:
    """Read one strip of windows with one windowed read: (window, data, valid mask, raster labels)."""
    window = _strip_window(tiles)
    data, valid = _read_strip(src, window, job)
    return window, data, valid, _raster_labels(label_src, window) if label_src is not None else None


def _write_tif(path: Path, array: np.ndarray, profile: dict[str, Any]) -> None:
    with rasterio.open(path, "w", **profile, count=array.shape[0], dtype=array.dtype) as dst:
        dst.write(array)


def _write_strip(job: _ChipJob, src: rasterio.DatasetReader, tiles: tuple[Tile, ...],
                 loaded: tuple[Window, np.ndarray, np.ndarray, np.ndarray | None], footprints: Footprints | None,
                 counts: dict[str, int]) -> list[dict[str, Any]]:
    """Write the chips (and label chips) of one loaded strip; return their index rows."""
    out = Path(job.out_dir)
    strip, data, valid, labels = loaded
    if footprints is not None:
        labels = _vector_labels(footprints, strip, src.transform)
    if labels is not None:
        labels[~valid] = 255
    base = dict(driver="GTiff", width=job.size, height=job.size, crs=src.crs)
    if job.compress:
        base["compress"] = job.compress
    area = job.size * job.size
    rows = []
    for tile in tiles:
        cols = slice(tile.col_off - strip.col_off, tile.col_off - strip.col_off + job.size)
        n_valid = int(np.count_nonzero(valid[:, cols]))
        nodata_frac = 1.0 - n_valid / area
        if n_valid == 0:
            counts["skipped_all_nodata"] += 1
            continue
        if nodata_frac > job.max_nodata:
            counts["skipped_max_nodata"] += 1
            continue
        win = tile.window()
        chip_transform = _window_transform(src.transform, win)
        image = f"images/{tile.name}.tif"
        _write_tif(out / image, data[:, :, cols], dict(base, transform=chip_transform, nodata=job.nodata))
        label, building_frac = "", ""
        if labels is not None:
            chip_labels = labels[:, cols]
            label = f"labels/{tile.name}.tif"
            _write_tif(out / label, chip_labels[None], dict(base, transform=chip_transform, nodata=255))
            building_frac = round(int(np.count_nonzero(chip_labels == 1)) / n_valid, 6)
        minx, miny, maxx, maxy = _window_bounds(src.transform, win)
        rows.append(dict(image=image, label=label, col_off=tile.col_off, row_off=tile.row_off,
                         width=tile.width, height=tile.height, minx=minx, miny=miny, maxx=maxx, maxy=maxy,
                         building_frac=building_frac, nodata_frac=round(nodata_frac, 6)))
    return rows


def chip_block(job: _ChipJob, strips: tuple[tuple[Tile, ...], ...],
               geoms: np.ndarray | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Dask task: write the chips of consecutive strips through one dataset handle.

    A reader thread reads (decodes) the next strip while this one writes the current strip's chips; GDAL
    releases the GIL in both. At most two strips are in memory. Module level so that it pickles by
    reference to worker processes.

    Args:
        job: the settings shared by every task.
        strips: runs of windows, one per grid row, top to bottom.
        geoms: footprints (scene CRS) that intersect the block, or None without vector labels.

    Returns:
        The index rows of the chips written, and the counts of windows skipped for nodata.
    """
    counts = {"skipped_all_nodata": 0, "skipped_max_nodata": 0}
    footprints = Footprints(geoms, {}) if geoms is not None else None
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(raster_env())
        src = stack.enter_context(rasterio.open(job.scene))
        label_src = stack.enter_context(rasterio.open(job.label_raster)) if job.label_raster else None
        reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="rsseg-strip-reader"))
        pending = reader.submit(_load_strip, job, src, label_src, strips[0])
        for i, tiles in enumerate(strips):
            loaded = pending.result()
            if i + 1 < len(strips):
                pending = reader.submit(_load_strip, job, src, label_src, strips[i + 1])
            rows.extend(_write_strip(job, src, tiles, loaded, footprints, counts))
    return rows, counts


def _label_source(labels: Path | None, info: dict[str, Any]) -> tuple[dict | None, Footprints | None]:
    if labels is None:
        return None, None
    try:
        with _quiet_gdal():
            lab_cm = rasterio.open(labels)
    except rasterio.errors.RasterioIOError:  # not a raster: footprints
        return {"path": str(Path(labels).resolve()), "kind": "vector"}, load_footprints(labels, info["crs"],
                                                                                       info["bounds"])
    with lab_cm as lab_src:
        check_label_raster(lab_src, info)
    return {"path": str(Path(labels).resolve()), "kind": "raster"}, None


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
        label_meta, footprints = _label_source(Path(labels) if labels else None, info)
    job = _ChipJob(scene=str(scene.resolve()), out_dir="", size=size, bands=info["bands"], nodata=info["nodata"],
                   mask_band=info["mask_band"], max_nodata=max_nodata,
                   label_raster=label_meta["path"] if label_meta and label_meta["kind"] == "raster" else None,
                   compress=compress)
    tasks = _tasks(grid)
    rows: list[dict[str, Any]] = []
    counts = {"windows": len(grid), "chips": 0, "skipped_all_nodata": 0, "skipped_max_nodata": 0}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        if label_meta:
            (tmp / "labels").mkdir()
        job = replace(job, out_dir=str(tmp.resolve()))
        with dask_client(scheduler, n_workers) as client:
            futures = [client.submit(chip_block, job, t, footprints.intersecting(_bounds(t, info)) if footprints
                                     else None, pure=False) for t in tasks]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=f"tiling {scene.name}",
                                   unit="strip", disable=None):
                    task_rows, task_counts = future.result()
                    rows.extend(task_rows)
                    for key, value in task_counts.items():
                        counts[key] += value
            finally:
                client.cancel(futures)
        rows.sort(key=lambda r: (r["row_off"], r["col_off"]))
        counts["chips"] = len(rows)
        if footprints is not None:
            counts.update(footprints.counts)
        _write_index(tmp, rows, info, job, label_meta, counts, grid, scene)
    log.info("%s: %d chips from %d windows under %s (%s)", scene, len(rows), len(grid), out_dir, counts)
    return out_dir / "index.csv"


def _bounds(strips: tuple[tuple[Tile, ...], ...], info: dict[str, Any]) -> tuple[float, float, float, float]:
    first, last = _strip_window(strips[0]), _strip_window(strips[-1])
    block = Window(first.col_off, first.row_off, first.width, last.row_off + last.height - first.row_off)
    return _window_bounds(info["transform"], block)


def _write_index(tmp: Path, rows: list[dict], info: dict[str, Any], job: _ChipJob, label_meta: dict | None,
                 counts: dict[str, int], grid: TileGrid, scene: Path) -> None:
    with open(tmp / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(scene=job.scene, crs=_crs_string(info["crs"]), width=info["width"], height=info["height"],
                transform=list(info["transform"])[:6], size=grid.size, overlap=grid.overlap,
                n_rows=grid.n_rows, n_cols=grid.n_cols, bands=list(info["bands"]), dtype=info["dtype"],
                nodata=info["nodata"], max_nodata=job.max_nodata, compress=job.compress, labels=label_meta,
                counts=counts)
    (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
