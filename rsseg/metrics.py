"""Pixel scores for building masks.

:func:`dice` is the Tianchi competition's per-image score and :func:`mean_image_dice` its metric: the
mean over images of ``2|X∩Y| / (|X| + |Y|)``, where an image with both masks empty scores 1. Object-level
scores (SpaceNet F1 on footprints) live in :mod:`rsseg.vector.evaluate`. :func:`count_buildings` counts a
mask's buildings (4-connected components) with :func:`components`, which also joins pieces of buildings cut
by block borders in :mod:`rsseg.vector.polygonize`.
"""

from __future__ import annotations

import numpy as np

from rsseg.errors import DatasetError

__all__ = ["components", "count_buildings", "dice", "mean_image_dice"]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice ``2|X∩Y| / (|X| + |Y|)`` of two masks of one shape (non-zero = building); 1.0 when both are empty."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise DatasetError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}; "
                           "score masks of the same (height, width)")
    return mean_image_dice(pred[None], truth[None])


def mean_image_dice(preds: np.ndarray, truths: np.ndarray) -> float:
    """The competition metric over a stack of masks ``(N, H, W)``: the mean of the per-image Dice."""
    p = np.asarray(preds).reshape(len(preds), -1) != 0
    t = np.asarray(truths).reshape(len(truths), -1) != 0
    inter = np.count_nonzero(p & t, axis=1)
    total = np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)
    scores = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
    return float(scores.mean())


def count_buildings(mask: np.ndarray) -> int:
    """The number of 4-connected building components of a 2-D mask (non-zero = building).

    A building with a courtyard is one; two touching only at a corner are two. Plain numpy (no labelling
    library is a dependency; :func:`rasterio.features.shapes` would count the same but swaps process-wide
    warning filters, which races between the threads of one worker): each column's vertical runs of
    building pixels are nodes, runs overlapping in neighbouring columns are joined, and the components
    of that graph are counted (:func:`components`).
    """
    building = np.asarray(mask) != 0
    height = building.shape[0]
    edges = np.diff(np.pad(building.T.view(np.int8), ((0, 0), (1, 1))), axis=1)  # one row per column
    (col_s, row_s), (col_e, row_e) = np.nonzero(edges == 1), np.nonzero(edges == -1)
    if not col_s.size:
        return 0
    # Runs of column c overlap run (c + 1, s, e) iff their end > s and their start < e: both searches in
    # one sorted key space where column c's keys lie in [c * (height + 1), c * (height + 1) + height].
    stride = height + 1
    start_key, end_key = col_s * stride + row_s, col_e * stride + row_e
    left = col_s - 1
    lo = np.searchsorted(end_key, left * stride + row_s, side="right")
    hi = np.searchsorted(start_key, left * stride + row_e, side="left")
    degree = np.where(col_s > 0, np.maximum(hi - lo, 0), 0)
    b = np.repeat(np.arange(col_s.size), degree)
    a = np.arange(degree.sum()) - np.repeat(np.cumsum(degree) - degree, degree) + np.repeat(lo, degree)
    return int(components(col_s.size, a, b).max()) + 1


def components(nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each node's component (numbered 0.. in order of its smallest node) in a graph of edges ``a[i] - b[i]``.

    Min-label hooking: every edge hooks the root of the larger label under the smaller, then every node is
    pointed at its root, until each edge joins two nodes of one root.
    """
    labels = np.arange(nodes)
    while True:
        la, lb = labels[a], labels[b]
        if np.array_equal(la, lb):
            return np.unique(labels, return_inverse=True)[1]
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
        while not np.array_equal(jumped := labels[labels], labels):  # point every node at its root
            labels = jumped
