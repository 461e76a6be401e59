"""Background I/O of sliding-window inference: a window reader and a GeoTIFF row writer, each a thread.

The reader reads batches of windows ahead of the model (GDAL decompression releases the GIL, so I/O
overlaps the forward passes); the writer compresses and writes finished rows behind it. Both hand items
over through bounded queues, so at most a few batches are in memory whatever the scene's size, and an
error in either thread is re-raised in the caller's thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from rsseg.fileio import raster_env
from rsseg.inference.outputs import MASK_COLORS
from rsseg.tiling.grid import Tile, TileGrid

__all__ = ["TAG_NS", "Prefetch", "RowWriter", "read_batches", "source_has_mask", "warped"]

log = logging.getLogger(__name__)

#: Rows of the output GeoTIFFs' internal GDAL blocks; the writer writes whole rows of them at a time.
BLOCK = 512
#: GDAL metadata domain of the tags written on outputs.
TAG_NS = "rsseg"
_END = object()


class Prefetch:
    """Iterate over ``make_items()`` run in a daemon thread, at most ``depth`` items ahead.

    Use as a context manager, so that leaving early stops the thread.
    """

    def __init__(self, make_items: Callable[[], Iterable[Any]], depth: int = 2, name: str = "rsseg-reader") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_items,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make_items: Callable[[], Iterable[Any]]) -> None:
        try:
            for item in make_items():
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread, which re-raises it
            self._put(exc)

    def __iter__(self) -> Iterator[Any]:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def source_has_mask(src: rasterio.DatasetReader) -> bool:
    """True if some pixels of ``src`` may be nodata (a nodata value, a mask band or an alpha band)."""
    return src.nodata is not None or any(
        MaskFlags.per_dataset in flags or MaskFlags.alpha in flags or MaskFlags.nodata in flags
        for flags in src.mask_flag_enums)


def warped(src: rasterio.DatasetReader, grid: dict[str, Any]) -> WarpedVRT:
    """``src`` seen on another grid of its CRS (``width``, ``height``, ``transform``, ``crs``), bilinear."""
    return WarpedVRT(src, crs=grid["crs"], transform=grid["transform"], width=grid["width"],
                     height=grid["height"], resampling=Resampling.bilinear)


@contextlib.contextmanager
def _dataset(path: str | os.PathLike[str], warp: dict[str, Any] | None) -> Iterator[Any]:
    with rasterio.open(path) as src:
        if warp is None:
            yield src
            return
        with warped(src, warp) as vrt:
            yield vrt


def read_batches(path: str | os.PathLike[str], grid: TileGrid, batch_size: int, pin: bool,
                 threads: int = 1, bands: list[int] | None = None, warp: dict[str, Any] | None = None
                 ) -> Iterator[tuple[list[Tile], torch.Tensor]]:
    """Yield ``(windows, pixels)`` batches in the grid's order; ``pixels`` is ``(N, C, size, size)``.

    uint8 sources stay uint8 (the model normalises them, on its device); other dtypes become float32.
    Windows reaching beyond a raster smaller than ``size`` are zero-padded. With ``pin``, batches are in
    page-locked memory for asynchronous copies to a GPU (allocated in the calling thread). With ``threads``
    > 1, that many batches are read and decoded at once, each thread with its own dataset handle (GDAL
    releases the GIL), and still yielded in order: what a GPU needs to be fed. ``bands``: the 1-based band
    indexes to read, in order (default: all). ``warp``: read the raster resampled to this grid (see
    :func:`warped`; ``grid`` then tiles the resampled raster).
    """
    windows = list(grid)
    chunks = [windows[start : start + batch_size] for start in range(0, len(windows), batch_size)]
    with raster_env(), _dataset(path, warp) as src:
        bands = list(bands or range(1, src.count + 1))
        dtype, count = torch.uint8 if src.dtypes[bands[0] - 1] == "uint8" else torch.float32, len(bands)

        def empty(chunk: list[Tile]) -> torch.Tensor:
            return torch.zeros((len(chunk), count, grid.size, grid.size), dtype=dtype, pin_memory=pin)

        if threads <= 1:
            for chunk in chunks:
                yield chunk, _fill(src, grid, chunk, empty(chunk), bands)
            return
        yield from _read_in_threads(path, grid, chunks, empty, threads, bands, warp)


def _fill(src: rasterio.DatasetReader, grid: TileGrid, chunk: list[Tile], batch: torch.Tensor,
          bands: list[int]) -> torch.Tensor:
    """Read the windows of ``chunk`` into ``batch`` (zero-initialised) and return it."""
    pixels = batch.numpy()
    for i, window in enumerate(chunk):
        h, w = min(grid.size, grid.height - window.row_off), min(grid.size, grid.width - window.col_off)
        pixels[i, :, :h, :w] = src.read(bands, window=Window(window.col_off, window.row_off, w, h))
    return batch


def _read_in_threads(path: str | os.PathLike[str], grid: TileGrid, chunks: list[list[Tile]],
                     empty: Callable[[list[Tile]], torch.Tensor], threads: int, bands: list[int],
                     warp: dict[str, Any] | None) -> Iterator[
                         tuple[list[Tile], torch.Tensor]]:
    """:func:`read_batches` with ``threads`` batches in flight, one dataset handle per thread."""
    local, handles, lock = threading.local(), [], threading.Lock()

    def read(chunk: list[Tile], batch: torch.Tensor) -> tuple[list[Tile], torch.Tensor]:
        if not hasattr(local, "src"):
            src = rasterio.open(path)  # closed by close(), not a with block: its thread's GDAL env is gone then
            local.src = warped(src, warp) if warp is not None else src
            with lock:
                handles.extend([local.src, src] if warp is not None else [src])
        return chunk, _fill(local.src, grid, chunk, batch, bands)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="rsseg-read")
    pending: collections.deque = collections.deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(read, chunk, empty(chunk)))
            if len(pending) >= threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        for handle in handles:
            handle.close()


def _copy_to_host(probs: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue a copy of CUDA ``probs`` to pinned host memory; the event completes when it is filled.

    The copy is queued on the current stream of the tensor's device (whatever device is current in this
    thread), and the event is recorded on that same stream, so that waiting on it waits for the copy.
    """
    with torch.cuda.device(probs.device):
        stream = torch.cuda.current_stream(probs.device)
        host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        host.copy_(probs, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return host, event


class RowWriter:
    """Encode and write finished rows of blended probabilities from a thread, in whole 512-row blocks.

    Rows arrive in order, as float32 probabilities (a numpy array, or a tensor on any device: CUDA rows
    are copied to pinned memory asynchronously and the thread waits on an event). The thread turns them
    into each output's pixels: the mask is ``probability > threshold`` as uint8 0/1; uint8 probabilities
    are ``round(255 * p)``; float32 probabilities are ``p``. Source nodata comes from the source's dataset
    mask, read window by window: ``255`` in masks (the declared nodata), NaN in float32 probabilities
    (the declared nodata), and an internal mask band (0 = nodata) for uint8 probabilities, whose 0-255
    range leaves no spare value.

    Args:
        source: the raster being predicted (for its dataset mask); None if it has no nodata.
        outputs: ``{"mask" | "prob": (path, profile)}``; the profile's dtype selects the encoding.
        tags: metadata written to every output, in the GDAL metadata domain :data:`TAG_NS`; masks also get
            the colour table :data:`~rsseg.inference.outputs.MASK_COLORS`.
        threshold: the mask's probability threshold.
    """

    def __init__(self, source: Path | None, outputs: dict[str, tuple[Path, dict[str, Any]]],
                 tags: dict[str, str], threshold: float) -> None:
        self._source = source
        self._outputs = outputs
        self._tags = tags
        self._threshold = np.float32(threshold)
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # each item is a grid row of rows x full width
        self._error: BaseException | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_start = 0
        self._thread = threading.Thread(target=self._run, name="rsseg-writer", daemon=True)
        self._thread.start()

    def submit(self, row0: int, probs: np.ndarray | torch.Tensor) -> None:
        """Queue the probabilities ``(k, width)`` of raster rows ``row0 .. row0 + k``."""
        if self._error is not None:
            raise self._error
        event = None
        if isinstance(probs, torch.Tensor) and probs.device.type == "cuda":
            probs, event = _copy_to_host(probs)
        while True:
            try:
                self._queue.put((row0, probs, event), timeout=0.5)
                return
            except queue.Full:
                if self._error is not None:
                    raise self._error from None

    def _encode(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        pixels = {}
        for key, (_, profile) in self._outputs.items():
            if key == "mask":
                pixels[key] = (probs > self._threshold).view(np.uint8)
            elif profile["dtype"] == "float32":
                pixels[key] = probs
            else:
                pixels[key] = np.rint(probs * np.float32(255)).astype(np.uint8)
        return pixels

    def close(self, ok: bool = True) -> None:
        """Write what is left (if ``ok``), close the outputs and re-raise an error of the thread."""
        if not ok:
            self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()
        if ok and self._error is not None:
            raise self._error

    def _run(self) -> None:
        ended = False
        try:
            with raster_env(GDAL_TIFF_INTERNAL_MASK=True), contextlib.ExitStack() as stack:
                src = stack.enter_context(rasterio.open(self._source)) if self._source is not None else None
                dsts = {}
                for key, (path, profile) in self._outputs.items():
                    dsts[key] = stack.enter_context(rasterio.open(path, "w", **profile))
                    dsts[key].update_tags(ns=TAG_NS, **self._tags)
                    if key == "mask":
                        dsts[key].write_colormap(1, MASK_COLORS)
                while (item := self._queue.get()) is not None:
                    if self._error is None:
                        row0, probs, event = item
                        if event is not None:
                            event.synchronize()
                        probs = probs.numpy() if isinstance(probs, torch.Tensor) else probs
                        self._stage(src, dsts, row0, self._encode(probs))
                ended = True
                if self._error is None:
                    self._write(src, dsts, final=True)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the submitting thread
            self._error = exc
            while not ended and self._queue.get() is not None:  # drain, so that submit() never blocks forever
                pass

    def _stage(self, src: rasterio.DatasetReader | None, dsts: dict[str, Any], row0: int,
               arrays: dict[str, np.ndarray]) -> None:
        if not self._pending:
            self._pending_start = row0
        self._pending.append(arrays)
        self._write(src, dsts, final=False)

    def _write(self, src: rasterio.DatasetReader | None, dsts: dict[str, Any], final: bool) -> None:
        if not self._pending:
            return
        n = sum(next(iter(a.values())).shape[0] for a in self._pending)
        end = self._pending_start + n
        stop = end if final else end // BLOCK * BLOCK
        if stop <= self._pending_start:
            return
        k = stop - self._pending_start
        joined = {key: np.concatenate([a[key] for a in self._pending]) for key in self._pending[0]}
        self._pending = [{key: arr[k:].copy() for key, arr in joined.items()}] if stop < end else []
        width = joined[next(iter(joined))].shape[1]
        window = Window(0, self._pending_start, width, k)
        valid = src.dataset_mask(window=window) > 0 if src is not None else None
        for key, dst in dsts.items():
            rows = joined[key][:k]
            if valid is not None and rows.dtype == np.float32:
                rows = np.where(valid, rows, np.float32(np.nan))
            elif valid is not None and key == "mask":
                rows = np.where(valid, rows, np.uint8(255))
            elif valid is not None:
                dst.write_mask(valid.astype(np.uint8) * np.uint8(255), window=window)
            dst.write(rows, 1, window=window)
        self._pending_start = stop
