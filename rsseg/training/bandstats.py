"""What a model learns from its training data besides weights: band statistics, source bands, resolution.

Band statistics (one dict per band, as tiling writes them into a chip folder's ``index.json``)::

    {"band": 1, "description": "red" | None, "mean": float, "std": float, "p01": float, "p99": float,
     "dtype": "uint16"}  (+ optional "count": the valid pixels they were computed over)

:class:`StatsAccumulator` computes them in one pass over images (bounded memory: sums per band, an exact
histogram for 8/16-bit integers, a strided sample for floats); :func:`combine_stats` merges several
folders' (weighted by ``count`` where every folder gives it, else equally); :func:`normalisation` turns
them into the model's mean/std. :func:`gsd_metres` gives the ground sampling distance of a grid in metres,
through the local scale at the scene centre for a geographic CRS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rsseg.errors import DatasetError

__all__ = ["StatsAccumulator", "bands_of", "combine_stats", "gsd_metres", "normalisation"]

#: Values per band kept from float images for their percentiles (a strided sample).
FLOAT_SAMPLE = 1 << 20


class StatsAccumulator:
    """Per-band mean, standard deviation and 1st/99th percentiles of valid pixels, image by image.

    Args:
        bands: band count.
        dtype: the images' data type (8/16-bit integers get exact histograms).
        nodata: a pixel whose bands all equal this is left out (None: every pixel counts).
    """

    def __init__(self, bands: int, dtype: str | np.dtype, nodata: float | None = None) -> None:
        self.bands, self.dtype, self.nodata = bands, np.dtype(dtype), nodata
        self.count = 0
        self.sum = np.zeros(bands, np.float64)
        self.sumsq = np.zeros(bands, np.float64)
        exact = self.dtype.kind in "ui" and self.dtype.itemsize <= 2
        self.offset = int(np.iinfo(self.dtype).min) if exact else 0
        self.hist = np.zeros((bands, 1 << (8 * self.dtype.itemsize)), np.int64) if exact else None
        self.samples: list[np.ndarray] = []
        self.sampled = 0

    def add(self, image: np.ndarray) -> None:
        """Count the valid pixels of ``image`` (H, W, bands)."""
        pixels = image.reshape(-1, self.bands)
        if self.nodata is not None and not (isinstance(self.nodata, float) and math.isnan(self.nodata)):
            pixels = pixels[~np.all(pixels == self.nodata, axis=1)]
        if self.dtype.kind == "f":
            pixels = pixels[np.all(np.isfinite(pixels), axis=1)]
        if not len(pixels):
            return
        values = pixels.astype(np.float64)
        self.count += len(pixels)
        self.sum += values.sum(axis=0)
        self.sumsq += np.square(values).sum(axis=0)
        if self.hist is not None:
            for b in range(self.bands):
                self.hist[b] += np.bincount(pixels[:, b].astype(np.int64) - self.offset, minlength=self.hist.shape[1])
        elif self.sampled < FLOAT_SAMPLE:
            step = max(1, len(pixels) // 4096)
            self.samples.append(values[::step])
            self.sampled += len(self.samples[-1])

    def stats(self, descriptions: Sequence[str | None] | None = None,
              band_indexes: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """The statistics so far, one dict per band (raises DatasetError without a valid pixel)."""
        if not self.count:
            raise DatasetError("no valid pixel to compute band statistics from: every pixel is nodata")
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean**2, 0.0))
        if self.hist is not None:
            cdf = np.cumsum(self.hist, axis=1) / self.count
            lo = [float(np.searchsorted(c, 0.01) + self.offset) for c in cdf]
            hi = [float(np.searchsorted(c, 0.99) + self.offset) for c in cdf]
        else:
            sample = np.concatenate(self.samples)
            lo, hi = np.percentile(sample, 1, axis=0).tolist(), np.percentile(sample, 99, axis=0).tolist()
        indexes = list(band_indexes or range(1, self.bands + 1))
        names = list(descriptions or [None] * self.bands)
        return [{"band": int(indexes[b]), "description": names[b], "mean": float(mean[b]), "std": float(std[b]),
                 "p01": lo[b], "p99": hi[b], "dtype": self.dtype.name, "count": int(self.count)}
                for b in range(self.bands)]


def combine_stats(parts: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge several folders' band statistics into one list (pooled mean and variance per band).

    Folders weigh by their pixel ``count`` where every one gives it, else equally. Percentiles are the
    same weighted average (an approximation); band numbers and descriptions are the first folder's.
    """
    if not parts:
        raise DatasetError("no band statistics to combine")
    if len({len(p) for p in parts}) > 1:
        raise DatasetError(f"band statistics of {[len(p) for p in parts]} bands: the chip folders disagree")
    counted = all("count" in band for part in parts for band in part)
    weights = np.array([float(part[0]["count"]) if counted else 1.0 for part in parts])
    weights = weights / weights.sum()
    out = []
    for b, first in enumerate(parts[0]):
        col = [part[b] for part in parts]
        mean = float(sum(w * s["mean"] for w, s in zip(weights, col, strict=True)))
        second = sum(w * (s["std"] ** 2 + s["mean"] ** 2) for w, s in zip(weights, col, strict=True))
        merged = dict(first, mean=mean, std=float(math.sqrt(max(second - mean**2, 0.0))))
        for key in ("p01", "p99"):
            merged[key] = float(sum(w * s[key] for w, s in zip(weights, col, strict=True)))
        if counted:
            merged["count"] = int(sum(s["count"] for s in col))
        out.append(merged)
    return out


def normalisation(stats: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The model's per-band mean and std from band statistics (a constant band gets std 1)."""
    return [float(s["mean"]) for s in stats], [float(s["std"]) if s["std"] > 0 else 1.0 for s in stats]


def gsd_metres(crs: Any, transform: Sequence[float], width: int, height: int) -> float | None:
    """The pixel size in metres of a grid (the mean of its x and y sizes); None without a CRS.

    A projected CRS converts its linear unit to metres; a geographic one measures one pixel along each
    axis on the ellipsoid at the grid's centre (pyproj's Geod).
    """
    from pyproj import CRS, Geod

    if not crs:
        return None
    try:
        crs = CRS.from_user_input(crs)
    except Exception:  # noqa: BLE001 - pyproj raises CRSError and others for odd input
        return None
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    if crs.is_geographic:
        lon, lat = c + a * width / 2 + b * height / 2, f + d * width / 2 + e * height / 2
        geod = Geod(ellps="WGS84") if crs.ellipsoid is None else Geod(a=crs.ellipsoid.semi_major_metre,
                                                                      rf=crs.ellipsoid.inverse_flattening)
        dx = geod.inv(lon, lat, lon + a, lat + d)[2]
        dy = geod.inv(lon, lat, lon + b, lat + e)[2]
        return float((abs(dx) + abs(dy)) / 2)
    unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return float((math.hypot(a, d) + math.hypot(b, e)) / 2 * unit)


def bands_of(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The source bands that band statistics describe: ``[{"band": index, "description": str | None}, ...]``."""
    return [{"band": s["band"], "description": s.get("description")} for s in stats]
