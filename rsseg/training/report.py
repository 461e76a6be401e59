"""What a training run reports each epoch: validation Dice per threshold, metrics.csv and curves.png.

Validation follows the competition's rule: per-image Dice ``2|X∩Y| / (|X| + |Y|)`` (1 when both masks are
empty), averaged over images, computed at once for several probability thresholds and ``min_pixels`` rules
so that the run can store the best pair in its checkpoint. Ignore pixels (``valid == 0``) are left out.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rsseg.fileio import atomic_path

__all__ = ["METRIC_COLUMNS", "ThresholdDice", "write_curves", "write_metrics"]

#: Columns of ``metrics.csv``, one row per epoch.
METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_dice", "threshold", "min_pixels",
                  "val_dice_at_0.5", "train_images_per_s", "train_s", "val_s")


class ThresholdDice:
    """Accumulates the mean per-image Dice of probability maps over a grid of post-processing settings.

    A setting is a probability ``threshold`` and a ``min_pixels`` rule: an image with fewer predicted
    building pixels than ``min_pixels`` is predicted empty (competition practice: an image without buildings
    scores 0 for a single false pixel, so dropping specks on such images pays; ``min_pixels=0`` is the plain
    threshold).
    """

    def __init__(self, thresholds: Sequence[float], min_pixels: Sequence[int] = (0,),
                 device: torch.device | str = "cpu") -> None:
        self.thresholds = torch.tensor(sorted(set(thresholds)), dtype=torch.float32, device=device)
        self.min_pixels = torch.tensor(sorted(set(min_pixels)), dtype=torch.int64, device=device)
        self.total = torch.zeros(len(self.thresholds), len(self.min_pixels), dtype=torch.float64, device=device)
        self.images = 0

    def update(self, probs: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add a batch: ``probs``, ``truth`` (0/1) and ``valid`` (0/1) of shape ``(N, 1, H, W)``."""
        keep = torch.ones_like(truth, dtype=torch.bool) if valid is None else valid > 0
        t = (truth > 0) & keep
        pred = (probs.float()[None] > self.thresholds.view(-1, 1, 1, 1, 1)) & keep  # (T, N, 1, H, W)
        inter = (pred & t).sum((2, 3, 4))
        n_pred, n_truth = pred.sum((2, 3, 4)), t.sum((1, 2, 3))
        total = n_pred + n_truth
        dice = torch.where(total == 0, 1.0, 2.0 * inter / total.clamp_min(1))  # (T, N)
        dropped = n_pred[..., None] < self.min_pixels  # (T, N, M): predicted empty
        scores = torch.where(dropped, (n_truth == 0).view(1, -1, 1).to(dice.dtype), dice[..., None])
        self.total += scores.sum(1).double()
        self.images += probs.shape[0]

    def scores(self) -> dict[tuple[float, int], float]:
        """Mean per-image Dice for each ``(threshold, min_pixels)``."""
        values = (self.total / max(self.images, 1)).tolist()
        return {(round(float(t), 6), int(m)): v for t, row in zip(self.thresholds.tolist(), values, strict=True)
                for m, v in zip(self.min_pixels.tolist(), row, strict=True)}

    def best(self, thresholds: Sequence[float] | None = None,
             min_pixels: Sequence[int] | None = None) -> tuple[float, int, float]:
        """``(threshold, min_pixels, mean Dice)`` of the best setting (among those given, if any).

        Ties go to the smallest ``min_pixels``, then the threshold nearest 0.5.
        """
        ts = None if thresholds is None else {round(float(t), 6) for t in thresholds}
        ms = None if min_pixels is None else {int(m) for m in min_pixels}
        scores = {k: v for k, v in self.scores().items() if (ts is None or k[0] in ts) and (ms is None or k[1] in ms)}
        threshold, min_pixels = max(scores, key=lambda k: (scores[k], -k[1], -abs(k[0] - 0.5)))
        return threshold, min_pixels, scores[(threshold, min_pixels)]


def write_metrics(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write the per-epoch records as ``metrics.csv`` (atomically, the whole history each time)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    return path


def write_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Plot training/validation loss and validation Dice per epoch to a PNG (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, dice_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="Dice + BCE loss", title="loss")
    loss_ax.legend()
    dice_ax.plot(epochs, [r["val_dice"] for r in history], "o-", label="best threshold, min_pixels")
    dice_ax.plot(epochs, [r["val_dice_at_0.5"] for r in history], "s--", label="threshold 0.5 alone")
    dice_ax.set(xlabel="epoch", ylabel="mean per-image Dice", title="validation Dice", ylim=(0, 1))
    dice_ax.legend(loc="lower right")
    for ax in (loss_ax, dice_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path
