"""Pixel scores for building masks.

:func:`dice` is the Tianchi competition's per-image score and :func:`mean_image_dice` its metric: the
mean over images of ``2|X∩Y| / (|X| + |Y|)``, where an image with both masks empty scores 1. Object-level
scores (SpaceNet F1 on footprints) live in :mod:`rsseg.vector.evaluate`.
"""

from __future__ import annotations

import numpy as np

from rsseg.errors import DatasetError

__all__ = ["dice", "mean_image_dice"]


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
