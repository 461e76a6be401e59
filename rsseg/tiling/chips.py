"""The worker side of tiling: read strips of windows, burn labels, write chip GeoTIFFs fast.

A Dask task (:func:`chip_block`) covers a band of grid columns: its strips (runs of windows along one grid
row), top to bottom. It opens its own dataset handles; a reader thread reads each strip with one windowed
read and burns its labels (:mod:`rsseg.tiling.burn`) while the task's thread and one helper thread write the
previous strip's chips, half each; it returns the chips' index rows. For a scene without nodata, footprint
labels depend on nothing the image holds: :func:`label_block` tasks burn and write them apart, so the image
tasks need not wait for the footprints to be read.

Chips are written by :class:`ChipWriter`: GDAL writes one template chip in memory, and every chip file is
that template's bytes with its pixels and its two tie-point coordinates put in, which costs a third of a
GDAL create-write-close. The template is checked by reading a patched copy back through GDAL; where it
does not round-trip (a rotated transform, compression) every chip goes through GDAL instead.
"""

from __future__ import annotations

import contextlib
import io
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window

from rsseg.errors import RasterError
from rsseg.fileio import GDAL_CACHEMAX_MB, raster_env
from rsseg.pipeline.cluster import task_threads
from rsseg.pipeline.process import retain_freed_memory
from rsseg.tiling.burn import Edges, burn
from rsseg.tiling.grid import Tile

__all__ = ["ChipJob", "ChipWriter", "chip_block", "label_block", "strip_window", "window_bounds",
           "window_transform"]


#: A loaded strip: its window, pixels (bands, rows, cols), labels or None, and the cumulative counts by column
#: of valid pixels (None: all valid) and of building pixels (None: no labels); see _column_counts.
_Loaded = tuple[Window, np.ndarray, "np.ndarray | None", "np.ndarray | None", "np.ndarray | None"]

_TIEPOINT = struct.Struct("<6d")  # ModelTiepointTag: pixel (I, J, K) -> (X, Y, Z), little-endian doubles


@dataclass(frozen=True, slots=True)
class ChipJob:
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
    threads_by_host: dict[str, int] = field(default_factory=dict)  # Dask worker threads per host


def window_transform(transform: Affine, window: Window) -> Affine:
    """The transform of ``window``: its pixel (0, 0) maps to the window's corner.

    Same values as ``transform @ Affine.translation(col_off, row_off)`` (and rasterio's
    ``window_transform``), computed directly: tiling calls it for every chip.
    """
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    col, row = window.col_off, window.row_off
    return Affine(a, b, a * col + b * row + c, d, e, d * col + e * row + f)


def window_bounds(transform: Affine, window: Window) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of ``window`` (like :func:`rasterio.windows.bounds`, any rotation)."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    corners = [(col, row) for col in (window.col_off, window.col_off + window.width)
               for row in (window.row_off, window.row_off + window.height)]
    xs = [a * col + b * row + c for col, row in corners]
    ys = [d * col + e * row + f for col, row in corners]
    return min(xs), min(ys), max(xs), max(ys)


def strip_window(tiles: tuple[Tile, ...]) -> Window:
    """The window covering a run of windows of one grid row."""
    first, last = tiles[0], tiles[-1]
    return Window(first.col_off, first.row_off, last.col_off + last.width - first.col_off, first.height)


def _same_nodata(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (np.isnan(a) and np.isnan(b))


class ChipWriter:
    """Writes GeoTIFF chips that share shape, dtype, bands, CRS, pixel size and nodata.

    Args:
        profile: rasterio creation profile of one chip (``width``, ``height``, ``count``, ``dtype``,
            ``crs``, ``transform``, ``nodata``, optionally ``compress``).
    """

    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = dict(profile, driver="GTiff", interleave="band", tiled=False,
                            blockysize=profile["height"])
        self.dtype = np.dtype(profile["dtype"])
        self._pixels = np.empty((profile["count"], profile["height"], profile["width"]), self.dtype)
        self._parts: tuple[bytes, bytes, bytes] | None = None
        if not profile.get("compress"):
            self._prepare_template()

    def copy(self) -> ChipWriter:
        """A writer sharing this one's checked template, with its own pixel buffer (one per thread)."""
        twin = object.__new__(ChipWriter)
        twin.profile, twin.dtype, twin._parts = self.profile, self.dtype, self._parts
        twin._pixels = np.empty_like(self._pixels)
        return twin

    @property
    def uses_template(self) -> bool:
        """True when chips are written from the checked template, False when each goes through GDAL."""
        return self._parts is not None

    def _gdal_bytes(self, array: np.ndarray, transform: Affine) -> bytes:
        with MemoryFile() as mem:
            with mem.open(**dict(self.profile, transform=transform)) as dst:
                dst.write(array)
            return mem.read()

    def _prepare_template(self) -> None:
        """Keep the template's bytes before the tie point, between it and the pixels, and after the pixels.

        Only if a chip assembled from them at another position reads back right through GDAL.
        """
        t = self.profile["transform"]
        if t.b or t.d or sys.byteorder != "little":
            return
        shape = (self.profile["count"], self.profile["height"], self.profile["width"])
        pattern = np.random.default_rng(0).integers(1, 100, shape).astype(self.dtype)
        raw, pixels, tie = self._gdal_bytes(pattern, t), pattern.tobytes(), _TIEPOINT.pack(0, 0, 0, t.c, t.f, 0)
        start = raw.find(pixels)
        at = raw.find(tie, 0, max(start, 0))
        if raw[:2] != b"II" or start < 0 or at < 0 or raw.count(tie) != 1:
            return
        self._parts = raw[:at], raw[at + _TIEPOINT.size : start], raw[start + len(pixels) :]
        moved, buffer = window_transform(t, Window(7, 5, 1, 1)), io.BytesIO()
        self._emit(buffer, pattern[:, ::-1], moved)
        with MemoryFile(buffer.getvalue()) as mem, mem.open() as check:
            ok = (check.transform == moved and check.crs == self.profile["crs"] and check.dtypes[0] == self.dtype
                  and np.array_equal(check.read(), pattern[:, ::-1])
                  and _same_nodata(check.nodata, self.profile.get("nodata")))
        if not ok:
            self._parts = None

    def _emit(self, fh: BinaryIO, array: np.ndarray, transform: Affine) -> None:
        head, middle, tail = self._parts
        np.copyto(self._pixels, array)  # one reused buffer: Dask workers trim freed memory, new pages fault
        fh.write(head)
        fh.write(_TIEPOINT.pack(0, 0, 0, transform.c, transform.f, 0))
        fh.write(middle)
        fh.write(self._pixels.data)
        fh.write(tail)

    def write(self, path: str | Path, array: np.ndarray, transform: Affine) -> None:
        """Write ``array`` (bands, rows, cols) as a chip whose pixel (0, 0) lies at ``transform``."""
        t = self.profile["transform"]
        if self._parts is None or (transform.a, transform.b, transform.d, transform.e) != (t.a, t.b, t.d, t.e):
            with rasterio.open(path, "w", **dict(self.profile, transform=transform)) as dst:
                dst.write(array)
            return
        with open(path, "wb") as fh:
            self._emit(fh, array, transform)


def _cache_mb(src: rasterio.DatasetReader, strip: Window) -> int:
    """A GDAL block cache that holds the blocks two successive strips share, with room to spare.

    Those blocks are what the cache is for (each is then decoded once); the default (GDAL_CACHEMAX_MB)
    would fill with blocks never read again, and memory would follow the scene's width up to it.
    """
    bx, by = src.block_shapes[0][1], src.block_shapes[0][0]
    span = min(src.width, (-(-strip.width // bx) + 1) * bx)
    rows = min(src.height, (-(-strip.height // by) + 1) * by)
    need = 1.5 * span * rows * sum(np.dtype(d).itemsize for d in src.dtypes)  # half again: margin
    return int(min(GDAL_CACHEMAX_MB, 8 + need / 2**20))


def _read_strip(src: rasterio.DatasetReader, window: Window, job: ChipJob,
                out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``window``, padding what lies beyond the raster; return (data, valid mask or None: all valid).

    ``out``, a buffer of the strip's shape, is filled instead of a new array when the strip needs no padding.
    """
    inside = window.intersection(Window(0, 0, src.width, src.height))
    padded = (inside.width, inside.height) != (window.width, window.height)
    reuse = out is not None and not padded and out.shape == (len(job.bands), window.height, window.width)
    data = src.read(job.bands, window=inside, out=out if reuse else None)
    if job.nodata is None:
        valid = src.dataset_mask(window=inside) > 0 if job.mask_band else None
    elif np.isnan(job.nodata):
        valid = ~np.isnan(data).all(axis=0)
    else:
        valid = (data != job.nodata).any(axis=0)
    if not padded:
        return data, valid
    fill = 0 if job.nodata is None else job.nodata
    full = np.full((len(job.bands), window.height, window.width), fill, dtype=data.dtype)
    full_valid = np.zeros((window.height, window.width), bool)
    r0, c0 = inside.row_off - window.row_off, inside.col_off - window.col_off
    full[:, r0 : r0 + inside.height, c0 : c0 + inside.width] = data
    full_valid[r0 : r0 + inside.height, c0 : c0 + inside.width] = True if valid is None else valid
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


def _load_strip(job: ChipJob, src: rasterio.DatasetReader, label_src: rasterio.DatasetReader | None,
                edges: Edges | None, tiles: tuple[Tile, ...], out: np.ndarray | None,
                label_out: np.ndarray | None) -> _Loaded:
    """Read one strip of windows with one windowed read (into ``out`` when it fits) and make its labels.

    Labels are footprint ``edges`` burned into ``label_out`` (1 where a pixel centre lies in a footprint,
    else 0) or read from the label raster, and 255 where the image has no data.
    """
    window = strip_window(tiles)
    try:
        data, valid = _read_strip(src, window, job, out)
        labels = _raster_labels(label_src, window) if label_src is not None else None
    except rasterio.errors.RasterioError as exc:
        problem = " ".join(str(exc).split())
    else:
        if edges is not None:
            labels = _burn_strip(edges, window, label_out)
        if labels is not None and valid is not None:
            labels[~valid] = 255
        building_counts = None
        if labels is not None:  # burned labels of an image without nodata hold only 0 and 1: count them as is
            building_counts = _column_counts(labels if label_src is None and valid is None else labels == 1)
        return window, data, labels, None if valid is None else _column_counts(valid), building_counts
    # Raised outside the handler: GDAL's chained errors do not unpickle, and Dask sends this to the client.
    raise RasterError(f"{job.scene}: cannot read {window!r} (a damaged file?): {problem}")


def _burn_strip(edges: Edges, window: Window, out: np.ndarray | None) -> np.ndarray:
    """Labels of ``window``: 1 where a pixel centre lies in a footprint, else 0 (into ``out`` when it fits)."""
    shape = (window.height, window.width)
    labels = out if out is not None and out.shape == shape else np.empty(shape, np.uint8)
    labels.fill(0)
    burn(edges.select(window.row_off, window.row_off + window.height), labels, window.row_off, window.col_off)
    return labels


def _column_counts(mask: np.ndarray) -> np.ndarray:
    """Cumulative 1s by column of a bool or 0/1 uint8 array (``counts[c1] - counts[c0]``: columns c0:c1).

    Summed as uint8, 255 rows at a time (no overflow, no cast of every pixel to a wider integer).
    """
    counts = np.zeros(mask.shape[1] + 1, np.int64)
    cells = mask.view(np.uint8)
    for start in range(0, mask.shape[0], 255):
        counts[1:] += np.add.reduce(cells[start : start + 255], axis=0, dtype=np.uint8)
    return np.cumsum(counts, out=counts)


def _write_strip(job: ChipJob, transform: Affine, tiles: tuple[Tile, ...], loaded: _Loaded,
                 writers: tuple[ChipWriter, ChipWriter], counts: dict[str, int]) -> list[dict[str, Any]]:
    """Write the chips (and label chips) of ``tiles`` from their loaded strip; return their index rows."""
    out = Path(job.out_dir)
    strip, data, labels, valid_counts, building_counts = loaded
    area = job.size * job.size
    rows = []
    for tile in tiles:
        c0 = tile.col_off - strip.col_off
        cols = slice(c0, c0 + job.size)
        n_valid = area if valid_counts is None else int(valid_counts[c0 + job.size] - valid_counts[c0])
        nodata_frac = 1.0 - n_valid / area
        if n_valid == 0:
            counts["skipped_all_nodata"] += 1
            continue
        if nodata_frac > job.max_nodata:
            counts["skipped_max_nodata"] += 1
            continue
        win = tile.window()
        chip_transform = window_transform(transform, win)
        image = f"images/{tile.name}.tif"
        writers[0].write(out / image, data[:, :, cols], chip_transform)
        label, building_frac = "", ""
        if labels is not None:
            chip_labels = labels[:, cols]
            label = f"labels/{tile.name}.tif"
            writers[1].write(out / label, chip_labels[None], chip_transform)
            building_frac = round(int(building_counts[c0 + job.size] - building_counts[c0]) / n_valid, 6)
        minx, miny, maxx, maxy = window_bounds(transform, win)
        rows.append(dict(image=image, label=label, col_off=tile.col_off, row_off=tile.row_off,
                         width=tile.width, height=tile.height, minx=minx, miny=miny, maxx=maxx, maxy=maxy,
                         building_frac=building_frac, nodata_frac=round(nodata_frac, 6)))
    return rows


_LABEL_PROFILE = dict(count=1, dtype="uint8", nodata=255)


def _chip_profile(job: ChipJob, src: rasterio.DatasetReader) -> dict[str, Any]:
    """What every chip of the scene shares: size, CRS, pixel size (the scene's transform), compression."""
    base = dict(width=job.size, height=job.size, crs=src.crs, transform=src.transform)
    if job.compress:
        base["compress"] = job.compress
    return base


def chip_block(job: ChipJob, strips: tuple[tuple[Tile, ...], ...],
               footprints: Edges | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Dask task: write the chips of consecutive strips through one dataset handle.

    A reader thread reads (decodes) the next strip and makes its labels while this thread writes the
    current strip's chips; GDAL releases the GIL while it decodes. The two alternate between two pairs of
    strip buffers, so at most two strips are in memory and their pages are reused. Module level, so that
    it pickles by reference to worker processes.

    Args:
        job: the settings shared by every task.
        strips: runs of windows, one per grid row, top to bottom.
        footprints: the edges (scene pixel space) of the footprints that intersect the block, or None
            without vector labels or when :func:`label_block` tasks write them.

    Returns:
        The index rows of the chips written, and the counts of windows skipped for nodata.
    """
    # Dask's workers trim the heap above 64 KiB, which makes every decoded block and strip buffer a fresh
    # mmap (page faults, zeroing): 1.8 ms of system time per MB of chips instead of 0.85 on one task.
    retain_freed_memory()
    counts = [{"skipped_all_nodata": 0, "skipped_max_nodata": 0} for _ in range(2)]
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        # Decoding threads: all cores for one worker per machine; one each for a worker per core, where
        # more would only contend (2 cores, 2 workers: 620 MB/s with one thread each, 551 with two).
        threads = str(task_threads(job.threads_by_host))
        stack.enter_context(raster_env(GDAL_NUM_THREADS=threads))
        src = stack.enter_context(rasterio.open(job.scene))
        stack.enter_context(raster_env(cache_mb=_cache_mb(src, strip_window(strips[0])), GDAL_NUM_THREADS=threads))
        label_src = stack.enter_context(rasterio.open(job.label_raster)) if job.label_raster else None
        transform, dtype = src.transform, src.dtypes[job.bands[0] - 1]
        base = _chip_profile(job, src)
        image_writer = ChipWriter(dict(base, count=len(job.bands), dtype=dtype, nodata=job.nodata))
        label_writer = ChipWriter(dict(base, **_LABEL_PROFILE))
        writers = [(image_writer, label_writer), (image_writer.copy(), label_writer.copy())]
        reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="rsseg-strip-reader"))
        helper = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="rsseg-chip-writer"))
        first = strip_window(strips[0])
        buffers = [np.empty((len(job.bands), first.height, first.width), dtype) for _ in range(2)]
        label_buffers = [np.empty((first.height, first.width), np.uint8) if footprints is not None else None
                         for _ in range(2)]
        pending = reader.submit(_load_strip, job, src, label_src, footprints, strips[0], buffers[0], label_buffers[0])
        for i, tiles in enumerate(strips):
            loaded = pending.result()
            if i + 1 < len(strips):  # the other buffers: their strip's chips are written by now
                pending = reader.submit(_load_strip, job, src, label_src, footprints, strips[i + 1],
                                        buffers[(i + 1) % 2], label_buffers[(i + 1) % 2])
            # Writing (copies and system calls, without the GIL) is the longest part: two threads share it.
            half = (len(tiles) + 1) // 2
            other = helper.submit(_write_strip, job, transform, tiles[half:], loaded, writers[1], counts[1])
            rows.extend(_write_strip(job, transform, tiles[:half], loaded, writers[0], counts[0]))
            rows.extend(other.result())
    return rows, {key: counts[0][key] + counts[1][key] for key in counts[0]}


def label_block(job: ChipJob, strips: tuple[tuple[Tile, ...], ...], footprints: Edges) -> list[dict[str, Any]]:
    """Dask task: burn footprints into the label chips of strips of a scene that has no nodata.

    The labels of such a scene depend on the footprints alone (every pixel is valid, no chip is skipped),
    so they can be written apart from the image chips: :func:`rsseg.tiling.tiler.write_chips` starts the image
    tasks first and reads the footprints while those run. The strips are shared among the task's share of
    the host's cores (threads: burning and writing release the GIL for most of their time).

    Returns:
        One row per chip: ``row_off``, ``col_off``, ``label`` (its path under the output folder) and
        ``building_frac``.
    """
    retain_freed_memory()  # the strip buffers and each chip's copy are reused, not mapped afresh
    with raster_env(GDAL_NUM_THREADS="1"), rasterio.open(job.scene) as src:
        transform, writer = src.transform, ChipWriter(dict(_chip_profile(job, src), **_LABEL_PROFILE))
    threads = min(len(strips), task_threads(job.threads_by_host))
    writers = [writer, *(writer.copy() for _ in range(threads - 1))]
    with ThreadPoolExecutor(threads, thread_name_prefix="rsseg-label-writer") as pool:
        parts = pool.map(_write_labels, [job] * threads, [transform] * threads,
                         [strips[k::threads] for k in range(threads)], [footprints] * threads, writers)
        return [row for part in parts for row in part]


def _write_labels(job: ChipJob, transform: Affine, strips: tuple[tuple[Tile, ...], ...], footprints: Edges,
                  writer: ChipWriter) -> list[dict[str, Any]]:
    """Burn and write the label chips of ``strips``; return their rows (see :func:`label_block`)."""
    out, area = Path(job.out_dir), job.size * job.size
    rows: list[dict[str, Any]] = []
    labels = None
    for tiles in strips:
        window = strip_window(tiles)
        labels = _burn_strip(footprints, window, labels)
        counts = _column_counts(labels)
        for tile in tiles:
            c0 = tile.col_off - window.col_off
            label = f"labels/{tile.name}.tif"
            writer.write(out / label, labels[None, :, c0 : c0 + job.size], window_transform(transform, tile.window()))
            rows.append(dict(row_off=tile.row_off, col_off=tile.col_off, label=label,
                             building_frac=round(int(counts[c0 + job.size] - counts[c0]) / area, 6)))
    return rows
