"""Chip GeoTIFFs written fast: one GDAL template per scene, patched per chip.

GDAL writes one template chip in memory, and every chip file is that template's bytes with its pixels and
its two tie-point coordinates put in, which costs a third of a GDAL create-write-close. The template is
checked by reading a patched copy back through GDAL; where it does not round-trip (a rotated transform,
compression, a big-endian machine) every chip goes through GDAL instead.
"""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import Affine

__all__ = ["ChipWriter"]

_TIEPOINT = struct.Struct("<6d")  # ModelTiepointTag: pixel (I, J, K) -> (X, Y, Z), little-endian doubles


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
        moved, buffer = t @ Affine.translation(7, 5), io.BytesIO()
        self._emit(buffer, pattern[:, ::-1], moved)
        with MemoryFile(buffer.getvalue()) as mem, mem.open() as check:
            ok = (check.transform == moved and check.crs == self.profile["crs"] and check.dtypes[0] == self.dtype
                  and np.array_equal(check.read(), pattern[:, ::-1])
                  and _same_nodata(check.nodata, self.profile.get("nodata")))
        if not ok:
            self._parts = None

    def _emit(self, fh: BinaryIO, array: np.ndarray, transform: Affine) -> None:
        head, middle, tail = self._parts
        np.copyto(self._pixels, array)  # one contiguous buffer, reused: no allocation per chip
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
