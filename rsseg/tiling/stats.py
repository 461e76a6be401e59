"""Per-band statistics of a scene's valid pixels, gathered block by block and combined: fixed-bin histograms.

Each block of tiling work (:mod:`rsseg.tiling.blocks`) adds the pixels it owns (every pixel of the scene
belongs to exactly one block, whatever the windows' overlap) to a :class:`BandStats`; the blocks' partial
statistics are merged with ``+`` and :meth:`BandStats.summary` gives per band the mean, the standard
deviation (population, ``ddof=0``) and the 1st/99th percentiles (numpy's default, linear interpolation
between the two nearest ranks). Memory is a histogram per band, whatever the scene size.

The bins are fixed by the data type, so partial histograms add without a first pass over the data:

- 8-bit and 16-bit integers: one bin per value (256 or 65,536), so mean, std and percentiles are exact;
  8-bit planes are counted by Pillow's histogram (C), 16-bit ones by numpy's ``bincount``.
- anything else (float32/64, 32-bit integers): 65,536 log-spaced bins, symmetric around 0: one bin for
  ``|x| < 1e-12`` and 32,767 per sign covering magnitudes 1e-12 to 1e39 evenly in ``log10`` (each bin spans
  0.36% of its value). Percentiles are a bin's geometric centre clamped to the observed min/max, so they are
  within a bin's width (0.36% relative) of numpy's; mean and std come from exact running moments (Chan's
  pairwise update). A fixed log-spaced range was chosen over a first min/max pass so the scene is read once:
  it suits reflectance (0-1), radiance and DN alike at a resolution far finer than normalisation needs.

Valid pixels are those tiling keeps (not nodata, inside the scene's mask); NaN and infinite values are
left out of a float band's statistics too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["BandStats", "LOG_BINS", "LOG_RANGE"]

#: Number of log-spaced bins and the range of magnitudes (log10) they cover, for non-8/16-bit data.
LOG_BINS = 65536
LOG_RANGE = (-12.0, 39.0)
_HALF = LOG_BINS // 2
_STEP = (LOG_RANGE[1] - LOG_RANGE[0]) / (_HALF - 1)
_ROWS = 64  # rows per chunk: bounds the temporaries (a 8192-px strip: 64 x 8192 x 8 bytes = 4 MB)


def _exact_bins(dtype: np.dtype) -> tuple[int, int] | None:
    """(bins, value of bin 0) for integers of 16 bits or fewer; None: log-spaced bins."""
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        info = np.iinfo(dtype)
        return info.max - info.min + 1, info.min
    return None


def _histogram(plane: np.ndarray, valid: np.ndarray | None, exact: tuple[int, int]) -> np.ndarray:
    """Counts of each value of an 8/16-bit integer ``plane`` (rows, cols) where ``valid`` (None: everywhere).

    8-bit planes go through Pillow's histogram (C, 4x numpy's ``bincount``, which first widens every value to
    a 64-bit index); 16-bit ones through ``bincount``, ``_ROWS`` rows at a time.
    """
    bins, first = exact
    if not plane.size:
        return np.zeros(bins, np.int64)
    if bins == 256:  # int8 as its bytes: value v counts in bin v mod 256, rolled to v - first
        rows, cols = plane.shape
        image = Image.frombuffer("L", (cols, rows), np.ascontiguousarray(plane).view(np.uint8), "raw", "L", 0, 1)
        mask = None if valid is None else Image.frombuffer(
            "L", (cols, rows), np.ascontiguousarray(valid).view(np.uint8), "raw", "L", 0, 1)
        return np.roll(np.array(image.histogram(mask), np.int64), -first)
    counts = np.zeros(bins, np.int64)
    for start in range(0, plane.shape[0], _ROWS):
        chunk = plane[start : start + _ROWS]
        values = chunk.ravel() if valid is None else chunk[valid[start : start + _ROWS]]
        counts += np.bincount(values if first == 0 else values.astype(np.int32) - first, minlength=bins)
    return counts


def _log_bin(values: np.ndarray) -> np.ndarray:
    """Log-spaced bin index of each value (float64): 0 .. LOG_BINS - 1, _HALF for |x| < 1e-12."""
    magnitude = np.abs(values)
    with np.errstate(divide="ignore"):
        k = np.floor((np.log10(magnitude) - LOG_RANGE[0]) / _STEP) + 1
    k = np.where(magnitude < 10.0 ** LOG_RANGE[0], 0, np.clip(k, 1, _HALF - 1)).astype(np.intp)
    return np.where(values < 0, _HALF - k, _HALF + k)


def _log_value(index: int) -> float:
    """The geometric centre of log-spaced bin ``index``."""
    k = index - _HALF
    if k == 0:
        return 0.0
    return math.copysign(10.0 ** (LOG_RANGE[0] + (abs(k) - 0.5) * _STEP), k)


@dataclass(slots=True)
class BandStats:
    """Partial statistics of ``n_bands`` bands of one dtype: histograms, and for log bins running moments.

    Use :meth:`empty`, :meth:`add` pixels, merge partials with ``+``, then :meth:`summary`.
    """

    dtype: str
    hist: np.ndarray  # (bands, bins) int64
    n: np.ndarray  # (bands,) valid values per band
    mean: np.ndarray  # running moments, log bins only
    m2: np.ndarray
    lo: np.ndarray  # observed min and max, log bins only
    hi: np.ndarray

    @classmethod
    def empty(cls, n_bands: int, dtype: str) -> BandStats:
        """Statistics of no pixels yet, for ``n_bands`` bands of ``dtype``."""
        exact = _exact_bins(np.dtype(dtype))
        bins = exact[0] if exact else LOG_BINS
        zeros = np.zeros(n_bands)
        return cls(dtype, np.zeros((n_bands, bins), np.int64), np.zeros(n_bands, np.int64), zeros.copy(),
                   zeros.copy(), np.full(n_bands, np.inf), np.full(n_bands, -np.inf))

    def add(self, data: np.ndarray, valid: np.ndarray | None, nodata: float | None = None) -> None:
        """Add the pixels of ``data`` (bands, rows, cols) where ``valid`` (rows, cols; None: all) is True.

        ``nodata``: where given, every band of each invalid pixel equals it (``valid`` follows GDAL's nodata
        rule). Integer bands are then counted whole and the invalid pixels taken off the nodata value's bin:
        the same histogram, without a masked copy of the pixels.
        """
        exact = _exact_bins(np.dtype(self.dtype))
        if not exact:
            for start in range(0, data.shape[1], _ROWS):
                mask = None if valid is None else valid[start : start + _ROWS]
                for b in range(data.shape[0]):
                    chunk = data[b, start : start + _ROWS]
                    self._add_log(b, (chunk.ravel() if mask is None else chunk[mask]).astype(np.float64))
            return
        whole = valid is None or nodata is not None
        for b in range(data.shape[0]):
            self.hist[b] += _histogram(data[b], None if whole else valid, exact)
        if valid is not None and nodata is not None:
            invalid = valid.size - np.count_nonzero(valid)
            if invalid:  # each of them is nodata in every band, so in the nodata value's bin
                self.hist[:, int(nodata) - exact[1]] -= invalid
        self.n = self.hist.sum(axis=1)

    def _add_log(self, b: int, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not values.size:
            return
        self.hist[b] += np.bincount(_log_bin(values), minlength=LOG_BINS)
        n, mean = values.size, values.mean()
        self._merge_moments(b, n, mean, float(((values - mean) ** 2).sum()))
        self.lo[b], self.hi[b] = min(self.lo[b], values.min()), max(self.hi[b], values.max())

    def _merge_moments(self, b: int, n: int, mean: float, m2: float) -> None:
        total = self.n[b] + n
        delta = mean - self.mean[b]
        self.m2[b] += m2 + delta * delta * self.n[b] * n / total
        self.mean[b] += delta * n / total
        self.n[b] = total

    def __add__(self, other: BandStats) -> BandStats:
        merged = BandStats(self.dtype, self.hist + other.hist, self.n.copy(), self.mean.copy(), self.m2.copy(),
                           np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi))
        if _exact_bins(np.dtype(self.dtype)):
            merged.n = merged.hist.sum(axis=1)
        else:
            for b in range(len(self.n)):
                if other.n[b]:
                    merged._merge_moments(b, int(other.n[b]), float(other.mean[b]), float(other.m2[b]))
        return merged

    def _percentile(self, b: int, q: float) -> float:
        """The percentile numpy gives (linear interpolation), from the ranks' bins."""
        cum = np.cumsum(self.hist[b])
        h = (cum[-1] - 1) * q
        below = math.floor(h)
        ranks = np.searchsorted(cum, [below, min(below + 1, cum[-1] - 1)], side="right")
        exact = _exact_bins(np.dtype(self.dtype))
        if exact:
            low, high = (float(r + exact[1]) for r in ranks)
        else:
            low, high = (min(max(_log_value(int(r)), self.lo[b]), self.hi[b]) for r in ranks)
        return low + (h - below) * (high - low)

    def _moments(self, b: int) -> tuple[float, float]:
        exact = _exact_bins(np.dtype(self.dtype))
        if not exact:
            return float(self.mean[b]), math.sqrt(self.m2[b] / self.n[b])
        values = np.arange(exact[0], dtype=np.float64) + exact[1]
        weights = self.hist[b].astype(np.float64)
        mean = float(weights @ values / self.n[b])
        return mean, math.sqrt(float(weights @ (values - mean) ** 2 / self.n[b]))

    def summary(self, bands: tuple[int, ...], descriptions: tuple[str | None, ...]) -> list[dict[str, Any]]:
        """What ``index.json`` holds as ``band_stats``, one dict per band.

        Keys: ``band``, ``description``, ``mean``, ``std``, ``p01``, ``p99``, ``dtype`` and ``count`` (valid
        values; the statistics are None where there are none).
        """
        out = []
        for b, (band, description) in enumerate(zip(bands, descriptions, strict=True)):
            row: dict[str, Any] = dict(band=band, description=description, mean=None, std=None, p01=None,
                                       p99=None, dtype=self.dtype, count=int(self.n[b]))
            if self.n[b]:
                mean, std = self._moments(b)
                row.update(mean=mean, std=std, p01=self._percentile(b, 0.01), p99=self._percentile(b, 0.99))
            out.append(row)
        return out
