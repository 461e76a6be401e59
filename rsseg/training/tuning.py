"""The threshold and ``min_pixels`` chosen the way prediction will run: same TTA views, same precision.

Validation during training scores one view per image in the training precision; a prediction averages
TTA views (smoother probabilities, whose best threshold may differ). :func:`tune` scores a
:class:`~rsseg.inference.tta.Predictor` - the TTA and precision of the prediction to come - over images with
known masks (a validation split, or each fold's out-of-fold images), and :func:`tuned_meta` is what a
checkpoint or an ensemble stores (read back by :mod:`rsseg.inference.tuned`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from rsseg.inference.tta import Predictor
from rsseg.training.report import ThresholdDice

__all__ = ["Batch", "tune", "tuned_meta"]

#: ``(pixels (N, C, H, W) uint8 or float, truth (N, 1, H, W) 0/1, valid (N, 1, H, W) 0/1 or None)``.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def tune(predictor: Predictor, batches: Iterable[Batch], thresholds: Sequence[float], min_pixels: Sequence[int],
         on_probs: Callable[[torch.Tensor], None] | None = None) -> ThresholdDice:
    """Mean per-image Dice of ``predictor``'s probabilities over every ``(threshold, min_pixels)`` setting.

    Args:
        predictor: the model with the TTA and precision the prediction will use.
        batches: images and their masks (:data:`Batch`).
        thresholds, min_pixels: the settings to score (0.5 and 0 are always scored too, for reference).
        on_probs: called with each batch's probabilities ``(N, H, W)`` (e.g. to keep out-of-fold predictions).

    Returns:
        The accumulated scores; ``.best(thresholds, min_pixels)`` picks the setting.
    """
    scores = ThresholdDice([*thresholds, 0.5], [*min_pixels, 0], predictor.device)
    for pixels, truth, valid in batches:
        probs = predictor(pixels)
        device = probs.device
        scores.update(probs[:, None], truth.to(device), None if valid is None else valid.to(device))
        if on_probs is not None:
            on_probs(probs)
    return scores


def tuned_meta(scores: ThresholdDice, thresholds: Sequence[float], min_pixels: Sequence[int], tta: str,
               precision: str) -> dict[str, Any]:
    """The best setting as checkpoint / ensemble metadata: ``threshold``, ``min_pixels``, how they were tuned."""
    threshold, pixels, dice = scores.best(thresholds, min_pixels)
    return {"threshold": threshold, "min_pixels": pixels, "threshold_tta": tta, "threshold_precision": precision,
            "tuned_dice": dice, "tuned_dice_at_0.5": scores.scores()[(0.5, 0)], "tuned_images": scores.images}
