"""Fold ensembles: K fold runs as one ensemble file, thresholds tuned on their pooled out-of-fold scores.

K-fold training leaves K run folders, each with its checkpoint (``best.pt``) and ``tuning.json``
(:mod:`rsseg.training.tuning`): the mean per-image Dice of every ``(threshold, min_pixels)`` setting over the
run's validation images - the images its model never trained on - scored with the TTA and precision of the
prediction to come::

    {"tta": "d4", "precision": "bf16", "images": 80, "thresholds": [...], "min_pixels": [...],
     "scores": [{"threshold": 0.45, "min_pixels": 64, "mean_dice": 0.86}, ...], "best": {...},
     "checkpoint": "best.pt", "checkpoint_epoch": 39}

The folds' validation images together are every training image once, so pooling their scores per setting as
``sum(mean_dice * images) / sum(images)`` equals tuning on all out-of-fold predictions at once.
:func:`fold_ensemble` picks the best pooled setting and writes it with the members
(:func:`rsseg.inference.ensemble.write_ensemble`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsseg.errors import CheckpointError
from rsseg.inference.ensemble import Member, read_members, write_members
from rsseg.training.report import ThresholdDice
from rsseg.training.tuning import tuned_meta

__all__ = ["fold_ensemble", "pooled_scores"]

log = logging.getLogger(__name__)

Setting = tuple[float, int]


def _read_tuning(run: Path) -> dict[str, Any]:
    """A run folder's ``tuning.json``, checked: scores by setting, images, TTA, precision, grid, checkpoint."""
    path = run / "tuning.json"
    if not path.is_file():
        raise CheckpointError(f"{run}: no tuning.json; the run did not finish tuning (train it to the end with "
                              "run.tune_tta set)")
    try:
        doc = json.loads(path.read_text())
        scores = {(round(float(s["threshold"]), 6), int(s["min_pixels"])): float(s["mean_dice"])
                  for s in doc["scores"]}
        images, tta, precision = int(doc["images"]), str(doc["tta"]), str(doc["precision"])
        grid = ({round(float(t), 6) for t in doc.get("thresholds") or ()},
                {int(m) for m in doc.get("min_pixels") or ()})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a tuning file (expected tta, precision, images and scores of "
                              f"threshold, min_pixels, mean_dice): {type(exc).__name__}: {exc}") from exc
    if images < 1 or not scores:
        raise CheckpointError(f"{path}: {images} images and {len(scores)} scores; expected at least one of each")
    return {"run": run, "scores": scores, "images": images, "tta": tta, "precision": precision, "grid": grid,
            "checkpoint": run / str(doc.get("checkpoint") or "best.pt"), "epoch": doc.get("checkpoint_epoch")}


def pooled_scores(folds: Sequence[tuple[dict[Setting, float], int]]) -> dict[Setting, float]:
    """Mean Dice over all folds' images of each setting every fold scored.

    Args:
        folds: per fold, ``({(threshold, min_pixels): mean Dice}, images)``.

    Returns:
        ``{setting: sum(mean_dice * images) / sum(images)}`` over the settings present in every fold.
    """
    common = set.intersection(*(set(scores) for scores, _ in folds))
    images = sum(n for _, n in folds)
    return {k: sum(scores[k] * n for scores, n in folds) / images for k in sorted(common)}


def _table(scores: dict[Setting, float], images: int) -> ThresholdDice:
    """A :class:`~rsseg.training.report.ThresholdDice` holding ``scores`` (a full grid, mean Dice over ``images``)."""
    table = ThresholdDice(sorted({t for t, _ in scores}), sorted({m for _, m in scores}))
    for i, t in enumerate(table.thresholds.tolist()):
        for j, m in enumerate(table.min_pixels.tolist()):
            key = (round(t, 6), m)
            if key not in scores:
                raise CheckpointError(f"no score for threshold {t:g}, min_pixels {m} in every fold; tuning.json "
                                      "files score a full grid of thresholds x min_pixels")
            table.total[i, j] = scores[key] * images
    table.images = images
    return table


def _check_folds(folds: list[dict[str, Any]], members: Sequence[Member]) -> None:
    """Every fold tuned with the first fold's TTA and precision, for the checkpoint epoch it holds."""
    first = folds[0]
    for fold, member in zip(folds, members, strict=True):
        if (fold["tta"], fold["precision"]) != (first["tta"], first["precision"]):
            raise CheckpointError(f"{fold['run']} was tuned with TTA {fold['tta']} in {fold['precision']}, "
                                  f"{first['run']} with TTA {first['tta']} in {first['precision']}; tune every "
                                  "fold with the TTA and precision of the prediction to come")
        epoch = member.meta.get("epoch")
        if fold["epoch"] is not None and epoch is not None and int(fold["epoch"]) != int(epoch):
            raise CheckpointError(f"{fold['run']}: tuning.json scored epoch {fold['epoch']} but "
                                  f"{member.path.name} is epoch {epoch}; tune the run again")


def _allowed(folds: list[dict[str, Any]], pooled: dict[Setting, float]) -> tuple[set | None, set | None]:
    """The thresholds and min_pixels every fold was asked to choose among (tuning also scores 0.5 and 0)."""
    out = []
    for i in (0, 1):
        scored = {k[i] for k in pooled}
        wanted = set.intersection(*(f["grid"][i] for f in folds)) & scored
        out.append(wanted or None)
    return out[0], out[1]


def fold_ensemble(runs: Sequence[str | os.PathLike[str]], path: str | os.PathLike[str],
                  overwrite: bool = False) -> Path:
    """Write the ensemble of K fold runs with the threshold and ``min_pixels`` tuned on their out-of-fold images.

    The folds' scores are pooled (:func:`pooled_scores`) and the best setting kept (ties: smallest
    ``min_pixels``, then the threshold nearest 0.5, as :meth:`~rsseg.training.report.ThresholdDice.best`),
    among the thresholds and ``min_pixels`` the runs were tuned over.

    Args:
        runs: the fold run folders (each with ``tuning.json`` and the checkpoint it names).
        path: the ensemble file to write (``ensemble.json``).
        overwrite: replace an existing file.

    Returns:
        ``path``; its meta holds ``threshold``, ``min_pixels``, ``threshold_tta``, ``threshold_precision``,
        ``precision``, ``tuned_dice`` (pooled out-of-fold Dice), ``tuned_dice_at_0.5``, ``tuned_images``,
        ``tuned_on`` (``out-of-fold``), ``folds`` and ``per_fold`` (each fold's own best setting and Dice).

    Raises:
        CheckpointError: a run without tuning.json or its checkpoint, folds tuned with another TTA or precision
        or for another epoch, checkpoints of different models. OutputExistsError: ``path`` exists.
    """
    if not runs:
        raise CheckpointError("fold_ensemble: no run folders given")
    folds = [_read_tuning(Path(run)) for run in runs]
    members = read_members([f["checkpoint"] for f in folds])
    _check_folds(folds, members)
    pooled = pooled_scores([(f["scores"], f["images"]) for f in folds])
    if (0.5, 0) not in pooled:
        raise CheckpointError(f"{folds[0]['run']}/tuning.json: not every fold scored threshold 0.5, min_pixels 0 "
                              "(the reference setting tuning always scores)")
    allowed = _allowed(folds, pooled)
    tta, precision = folds[0]["tta"], folds[0]["precision"]
    meta = tuned_meta(_table(pooled, sum(f["images"] for f in folds)), *allowed, tta, precision)
    per_fold = []
    for fold in folds:
        threshold, min_pixels, dice = _table({k: fold["scores"][k] for k in pooled}, fold["images"]).best(*allowed)
        per_fold.append({"run": fold["run"].name, "threshold": threshold, "min_pixels": min_pixels, "dice": dice,
                         "images": fold["images"], "checkpoint_epoch": fold["epoch"]})
    meta |= {"precision": precision, "tuned_on": "out-of-fold", "folds": len(folds), "per_fold": per_fold}
    log.info("%d folds: threshold %g, min_pixels %d, out-of-fold Dice %.4f (%.4f at 0.5) over %d images",
             len(folds), meta["threshold"], meta["min_pixels"], meta["tuned_dice"], meta["tuned_dice_at_0.5"],
             meta["tuned_images"])
    return write_members(path, members, meta, overwrite=overwrite)
