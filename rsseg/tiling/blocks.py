"""One block of tiling work: read strips of windows, make their labels, write their chips.

A block is a few strips (runs of windows along one grid row) of the same grid columns, top to bottom.
:func:`write_block` reads each strip with one windowed read, rasterizes the block's footprints into a
label buffer (:func:`rasterio.features.rasterize`) or reads the label raster as a class map
(:mod:`rsseg.tiling.labels`), marks nodata, writes the chips with a :class:`~rsseg.tiling.writer.ChipWriter`
and returns their index rows and the band statistics (:mod:`rsseg.tiling.stats`) of the pixels it owns.
It runs sequentially: the parallelism is the executor's (one block per task), and GDAL's decoding threads
are whatever the process's environment says (``GDAL_NUM_THREADS``). Memory does not grow with the scene
(:class:`_StripReader`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.enums import MergeAlg
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.windows import Window, union

from rsseg.errors import RasterError
from rsseg.tiling.grid import Tile
from rsseg.tiling.labels import LabelRaster
from rsseg.tiling.stats import BandStats
from rsseg.tiling.writer import ChipWriter

__all__ = ["ChipBlock", "ChipJob", "sorted_bounds", "strip_window", "window_transform", "write_block"]

_LABEL_PROFILE = dict(count=1, dtype="uint8", nodata=255)


@dataclass(frozen=True, slots=True)
class ChipJob:
    """What every block of a scene needs besides its windows (pickled to the executor's workers)."""

    scene: str
    out_dir: str
    size: int
    bands: tuple[int, ...]
    dtype: str
    nodata: float | None
    mask_band: bool
    max_nodata: float
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    label_raster: LabelRaster | None
    compress: str | None


@dataclass(frozen=True, slots=True)
class ChipBlock:
    """One unit of parallel work: strips of the same grid columns, top to bottom, and their footprints.

    ``strips`` are runs of windows, one per grid row; ``footprints`` the polygons (scene CRS) that intersect
    them as WKB, or None without vector labels: bytes pickle (and Dask hashes a task's arguments) in one call
    per block, where shapely objects take one each, 0.3 s of a 10000² scene's 3,800 footprints on the client
    before any block starts. ``owned`` are the pixels whose band statistics this block counts
    (each pixel of the scene in one block): the end column (exclusive; they start at the first window's)
    and each strip's end row (from its top).
    """

    job: ChipJob
    strips: tuple[tuple[Tile, ...], ...]
    footprints: np.ndarray | None
    owned: tuple[int, tuple[int, ...]]


def strip_window(strip: tuple[Tile, ...]) -> Window:
    """The window covering a strip: a run of windows of one grid row."""
    return union(strip[0].window(), strip[-1].window())


def window_transform(window: Window, transform: Affine) -> Affine:
    """The transform of ``window``: its pixel (0, 0) maps to the window's corner, ``transform @ (col, row)``.

    What :func:`rasterio.windows.transform` computes; that one multiplies with ``*``, which affine 2.4
    warns about on every call (``PendingDeprecationWarning``), once per chip here.
    """
    return transform @ Affine.translation(window.col_off, window.row_off)


def sorted_bounds(window: Window, transform: Affine) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of ``window``'s four corners (any rotation; south-up rasters too)."""
    xs, ys = zip(*(transform @ (col, row) for col in (window.col_off, window.col_off + window.width)
                   for row in (window.row_off, window.row_off + window.height)), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


class _StripReader:
    """Reads the strips of one column range of a scene, top to bottom, into one reused buffer.

    Rows ``[lo, hi)`` of the scene are held in ``data[:, : hi - lo]``. A strip keeps the rows it shares
    with the previous one and reads the rest, up to the end of the file's block row (those rows are kept
    for the next strip), so each block of the file is decoded once. Each read opens the dataset afresh, so
    GDAL's block cache never holds more than one read's blocks, whatever the process-wide cache size is.
    Columns or rows beyond a scene smaller than one window stay filled with nodata (or 0) and invalid.
    """

    def __init__(self, job: ChipJob, columns: Window) -> None:
        with rasterio.open(job.scene) as src:
            block_rows = src.block_shapes[job.bands[0] - 1][0]
        self.job, self.col_off = job, columns.col_off
        self.ahead = block_rows if block_rows <= job.size else 1  # a one-strip file: no read-ahead
        self.inside = min(columns.width, job.width - columns.col_off)  # columns inside the scene
        rows = job.size + self.ahead
        fill = 0 if job.nodata is None else job.nodata
        self.data = np.full((len(job.bands), rows, columns.width), fill, np.dtype(job.dtype))
        padded = self.inside < columns.width or job.height < job.size
        self.mask = np.zeros((rows, columns.width), bool) if job.nodata is None and (
            job.mask_band or padded) else None
        self.lo = self.hi = 0

    def strip(self, row_off: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels (bands, size, width) of the strip at ``row_off`` and its valid mask (None: all valid)."""
        size, keep = self.job.size, max(0, self.hi - row_off)
        if keep:  # move the shared rows to the top of the buffers (numpy copies overlapping slices safely)
            self.data[:, :keep] = self.data[:, self.hi - self.lo - keep : self.hi - self.lo]
            if self.mask is not None:
                self.mask[:keep] = self.mask[self.hi - self.lo - keep : self.hi - self.lo]
        self.lo, self.hi = row_off, row_off + keep
        end = min(self.job.height, -(-(row_off + size) // self.ahead) * self.ahead)
        if end > self.hi:
            self._read(self.hi, end)
            self.hi = end
        data = self.data[:, :size]
        return data, self._valid(data)

    def _read(self, start: int, end: int) -> None:
        window = Window(self.col_off, start, self.inside, end - start)
        rows = slice(start - self.lo, end - self.lo)
        try:
            with rasterio.open(self.job.scene) as src:  # a fresh handle: GDAL's cached blocks go with it
                src.read(self.job.bands, window=window, out=self.data[:, rows, : self.inside])
                if self.mask is not None:
                    self.mask[rows, : self.inside] = src.dataset_mask(window=window) > 0 if self.job.mask_band else True
        except rasterio.errors.RasterioError as exc:
            error = RasterError(f"{self.job.scene}: cannot read {window!r} (a damaged file?): {_gdal_messages(exc)}")
        else:
            return
        # Not chained: Dask sends a block's error to the client with its causes (tblib), and rasterio's
        # CPLE_* causes do not unpickle there ("property 'args' ... has no setter"); their text is in the message.
        raise error

    def _valid(self, data: np.ndarray) -> np.ndarray | None:
        """Valid pixels: not every band equal to nodata (GDAL's dataset-mask rule), or the scene's mask."""
        nodata = self.job.nodata
        if nodata is None:
            return None if self.mask is None else self.mask[: self.job.size]
        if np.isnan(nodata):
            return ~np.isnan(data).all(axis=0)
        return (data != nodata).any(axis=0)


def _gdal_messages(exc: BaseException) -> str:
    """The messages of ``exc`` and of its causes (GDAL's own, e.g. which block failed), on one line."""
    parts = []
    while exc is not None:
        parts.append(" ".join(str(exc).split()))
        exc = exc.__cause__
    return "; ".join(dict.fromkeys(p for p in parts if p))


class _FootprintLabels:
    """A block's footprints rasterized strip by strip into one reused buffer.

    Each footprint becomes the GeoJSON mapping that :func:`rasterio.features.rasterize` takes once per block,
    not once for every strip it touches (a third of them touch two).
    """

    def __init__(self, wkb: np.ndarray, transform: Affine, shape: tuple[int, int]) -> None:
        footprints = shapely.from_wkb(wkb)
        self.shapes = [geom.__geo_interface__ for geom in footprints]
        self.boxes, self.transform = shapely.bounds(footprints), transform
        self.out = np.empty(shape, np.uint8)

    def labels(self, window: Window) -> np.ndarray:
        """1 where a pixel centre of ``window`` lies in a footprint (holes empty), else 0 (the reused buffer)."""
        self.out.fill(0)
        minx, miny, maxx, maxy = sorted_bounds(window, self.transform)
        boxes = self.boxes
        near = np.flatnonzero((boxes[:, 0] <= maxx) & (boxes[:, 2] >= minx) & (boxes[:, 1] <= maxy)
                              & (boxes[:, 3] >= miny))
        if near.size:
            rasterize([self.shapes[i] for i in near], out=self.out, transform=window_transform(window, self.transform),
                      default_value=1, all_touched=False, merge_alg=MergeAlg.replace)
        return self.out


def _column_counts(mask: np.ndarray) -> np.ndarray:
    """Cumulative 1s by column of a bool array (``counts[c1] - counts[c0]``: columns c0:c1).

    Summed as uint8, 255 rows at a time (no overflow, no cast of every pixel to a wider integer).
    """
    counts = np.zeros(mask.shape[1] + 1, np.int64)
    cells = mask.view(np.uint8)
    for start in range(0, mask.shape[0], 255):
        counts[1:] += np.add.reduce(cells[start : start + 255], axis=0, dtype=np.uint8)
    return np.cumsum(counts, out=counts)


def write_block(block: ChipBlock) -> tuple[list[dict[str, Any]], dict[str, int], BandStats]:
    """Write the chips (and label chips) of a block's strips; module level, so it pickles by reference.

    Returns:
        The index rows of the chips written, the counts of windows skipped for nodata, and the band
        statistics of the pixels the block owns.
    """
    job, columns = block.job, strip_window(block.strips[0])
    reader = _StripReader(job, columns)
    base = dict(width=job.size, height=job.size, crs=job.crs, transform=job.transform)
    if job.compress:
        base["compress"] = job.compress
    writers = (ChipWriter(dict(base, count=len(job.bands), dtype=job.dtype, nodata=job.nodata)),
               ChipWriter(dict(base, **_LABEL_PROFILE)))
    burner = None if block.footprints is None else _FootprintLabels(block.footprints, job.transform,
                                                                    (job.size, columns.width))
    counts = {"skipped_all_nodata": 0, "skipped_max_nodata": 0}
    rows: list[dict[str, Any]] = []
    stats, own_cols = BandStats.empty(len(job.bands), job.dtype), block.owned[0] - columns.col_off
    for strip, row_end in zip(block.strips, block.owned[1], strict=True):
        window = strip_window(strip)
        data, valid = reader.strip(window.row_off)
        own_rows = row_end - window.row_off
        stats.add(data[:, :own_rows, :own_cols], None if valid is None else valid[:own_rows, :own_cols],
                  job.nodata)
        labels = None
        if job.label_raster is not None:
            labels = job.label_raster.read(window)
        elif burner is not None:
            labels = burner.labels(window)
        if labels is not None and valid is not None:
            labels[~valid] = 255
        rows += _write_strip(job, strip, window, (data, valid, labels), writers, counts)
    return rows, counts, stats


def _write_strip(job: ChipJob, strip: tuple[Tile, ...], extent: Window,
                 loaded: tuple[np.ndarray, np.ndarray | None, np.ndarray | None],
                 writers: tuple[ChipWriter, ChipWriter], counts: dict[str, int]) -> list[dict[str, Any]]:
    """Write the chips (and label chips) of a strip's windows from its pixels and labels; return their index rows.

    ``extent`` is the strip's window in the scene; ``loaded`` its pixels, valid mask and labels.
    """
    data, valid, labels = loaded
    valid_counts = None if valid is None else _column_counts(valid)
    building_counts = None if labels is None else _column_counts(labels == 1)
    out, area = Path(job.out_dir), job.size * job.size
    rows = []
    for cell in strip:
        c0 = cell.col_off - extent.col_off
        n_valid = area if valid_counts is None else int(valid_counts[c0 + job.size] - valid_counts[c0])
        nodata_frac = 1.0 - n_valid / area
        if n_valid == 0:
            counts["skipped_all_nodata"] += 1
            continue
        if nodata_frac > job.max_nodata:
            counts["skipped_max_nodata"] += 1
            continue
        window = cell.window()
        chip_transform = window_transform(window, job.transform)
        image = f"images/{cell.name}.tif"
        writers[0].write(out / image, data[:, :, c0 : c0 + job.size], chip_transform)
        label, building_frac = "", ""
        if labels is not None:
            label = f"labels/{cell.name}.tif"
            writers[1].write(out / label, labels[None, :, c0 : c0 + job.size], chip_transform)
            building_frac = round(int(building_counts[c0 + job.size] - building_counts[c0]) / n_valid, 6)
        minx, miny, maxx, maxy = sorted_bounds(window, job.transform)
        rows.append(dict(image=image, label=label, col_off=cell.col_off, row_off=cell.row_off,
                         width=cell.width, height=cell.height, minx=minx, miny=miny, maxx=maxx, maxy=maxy,
                         building_frac=building_frac, nodata_frac=round(nodata_frac, 6)))
    return rows
