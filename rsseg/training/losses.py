"""Dice + BCE loss for building masks, scored per image like the competition.

The Tianchi metric is the mean over images of each image's Dice, so the soft Dice here is computed per
image and then averaged (segmentation-models-pytorch's ``DiceLoss`` pools the batch into one Dice, which
gives no signal on a batch of empty images and lets large images drown small ones).

Soft Dice of one image, over its valid pixels, with ``p = sigmoid(logit)`` and truth ``t``::

    dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)

**Empty truth.** With ``sum(t) = 0`` the image's soft Dice is ``smooth / (sum(p) + smooth)``: 1 when the
prediction is empty, halved once the predicted probability mass reaches ``smooth`` pixels (1 by default)
and falling towards 0 after, like the competition's score, where an empty image scores 1 if the prediction
is empty and 0 after a single false pixel. Its gradient pushes every probability of the image down.

**Ignore pixels** (``valid == 0``: nodata, padding, label 255) are left out of both terms: they add
nothing to the Dice sums, and BCE is averaged over valid pixels only. An image with no valid pixel
contributes to neither term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError

__all__ = ["DiceBCELoss", "soft_dice"]


def soft_dice(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
              smooth: float = 1.0, per_image: bool = True) -> torch.Tensor:
    """Soft Dice of probabilities against a 0/1 target, per image ``(N,)`` or pooled over the batch ``()``.

    Args:
        probs: probabilities ``(N, 1, H, W)`` (or any ``(N, ...)``).
        target: truth of the same shape (0 or 1).
        valid: optional 0/1 weights of the same shape; pixels with 0 are left out.
        smooth: added to numerator and denominator (see the module docstring for empty truths).
        per_image: one Dice per image (the competition's rule); False pools the batch.
    """
    if valid is not None:
        probs, target = probs * valid, target * valid
    dims = tuple(range(1, probs.ndim)) if per_image else tuple(range(probs.ndim))
    inter = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return (2.0 * inter + smooth) / (total + smooth)


class DiceBCELoss(nn.Module):
    """``bce_weight * BCE-with-logits + dice_weight * (1 - soft Dice)``, ignore pixels left out of both.

    Args:
        dice_weight: weight of the soft Dice term.
        bce_weight: weight of the BCE term.
        per_image: Dice per image then averaged (True, the competition's rule) or pooled over the batch.
        smooth: Dice smoothing (1 by default: an empty truth scores ``1 / (1 + sum(p))``).
    """

    def __init__(self, dice_weight: float = 0.5, bce_weight: float = 0.5, per_image: bool = True,
                 smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ConfigError(f"dice_weight={dice_weight}, bce_weight={bce_weight}: expected non-negative "
                             "weights, not both zero")
        self.dice_weight, self.bce_weight = float(dice_weight), float(bce_weight)
        self.per_image, self.smooth = per_image, float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar loss of ``logits`` ``(N, 1, H, W)`` against ``target`` (0/1), ignoring ``valid == 0``."""
        logits, target = logits.float(), target.float()
        weights = torch.ones_like(target) if valid is None else valid.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = loss + self.bce_weight * (bce * weights).sum() / weights.sum().clamp_min(1.0)
        if self.dice_weight:
            scores = soft_dice(torch.sigmoid(logits), target, weights, self.smooth, self.per_image)
            if self.per_image:
                counted = weights.flatten(1).sum(1) > 0
                scores = scores[counted] if bool(counted.any()) else scores.new_ones(1)
            loss = loss + self.dice_weight * (1.0 - scores.mean())
        return loss
