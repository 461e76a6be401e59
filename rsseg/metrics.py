"""Pixel scores for building masks.

:func:`dice` is the Tianchi competition's per-image score and :func:`mean_image_dice` its metric: the
mean over images of ``2|X∩Y| / (|X| + |Y|)``, where an image with both masks empty scores 1. Object-level
scores (SpaceNet F1 on footprints) live in :mod:`rsseg.vector.evaluate`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dice", "iou", "mean_image_dice"]


def _counts(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None) -> tuple[int, int, int]:
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        p, t = p & v, t & v
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def dice(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Dice ``2|X∩Y| / (|X| + |Y|)`` of two masks (non-zero = building); 1.0 when both are empty.

    Args:
        pred: predicted mask.
        truth: true mask of the same shape.
        valid: optional mask of pixels to score (others, e.g. nodata, are left out).
    """
    inter, n_pred, n_truth = _counts(pred, truth, valid)
    total = n_pred + n_truth
    return 1.0 if total == 0 else 2.0 * inter / total


def iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Intersection over union ``|X∩Y| / |X∪Y|`` of two masks; 1.0 when both are empty."""
    inter, n_pred, n_truth = _counts(pred, truth, valid)
    union = n_pred + n_truth - inter
    return 1.0 if union == 0 else inter / union


def mean_image_dice(preds: np.ndarray, truths: np.ndarray) -> float:
    """The competition metric over a stack of masks ``(N, H, W)``: the mean of the per-image Dice."""
    p = np.asarray(preds).reshape(len(preds), -1) != 0
    t = np.asarray(truths).reshape(len(truths), -1) != 0
    inter = np.count_nonzero(p & t, axis=1)
    total = np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)
    scores = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
    return float(scores.mean())
