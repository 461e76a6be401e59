"""The threshold and ``min_pixels`` chosen the way prediction will run: same TTA views, same precision.

Validation during training scores one view per image in the training precision; a prediction averages
TTA views (smoother probabilities, whose best threshold may differ). :func:`tune` scores a
:class:`~rsseg.inference.tta.Predictor` - the TTA and precision of the prediction to come - over images with
known masks (a validation split, or each fold's out-of-fold images), and :func:`tuned_meta` is what a
checkpoint or an ensemble stores (read back by :mod:`rsseg.inference.tuned`).

At the end of training (rank 0), :func:`tune_run` tunes the run's ``best.pt`` with ``run.tune_tta`` in the
training precision over the validation images (whole images, as per-epoch validation) and writes, in this
order and each atomically:

* ``val_probs/<item>.png`` with ``run.keep_val_probs``: the probabilities of every validation item as uint8
  (``round(p * 255)``), the file named after the item's ``split.csv`` name made a safe file name
  (:func:`probs_file_names`; ``tuning.json`` maps the files back to the items);
* ``best.pt`` with meta ``threshold``, ``min_pixels``, ``threshold_tta``, ``threshold_precision``,
  ``tuned_dice`` (:func:`tuned_meta`), the single-view values kept as ``val_threshold`` / ``val_min_pixels``;
* ``tuning.json`` (:func:`tuning_record`), the contract k-fold pooling reads: every scored setting's mean
  per-image Dice over ``images`` validation images, so folds pool as ``sum(mean_dice * images) /
  sum(images)`` (the mean over all their out-of-fold images). Written last, it marks the tuning done
  (:func:`tuning_done`): a resumed run whose tuning matches its best checkpoint does not tune again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rsseg.errors import CheckpointError, DatasetError
from rsseg.fileio import atomic_dir, atomic_path
from rsseg.inference.tta import Predictor
from rsseg.models import load_checkpoint, model_from_checkpoint
from rsseg.training.report import ThresholdDice

__all__ = ["PROBS_DIR", "TUNING_FILE", "Batch", "probs_file_names", "score_validation", "tune",
           "tune_run", "tuned_meta", "tuning_done", "tuning_record"]

log = logging.getLogger(__name__)

#: ``(pixels (N, C, H, W) uint8 or float, truth (N, 1, H, W) 0/1, valid (N, 1, H, W) 0/1 or None)``.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

#: The tuning record of a run folder (:func:`tuning_record`).
TUNING_FILE = "tuning.json"
#: The folder of the kept validation probabilities (``run.keep_val_probs``).
PROBS_DIR = "val_probs"


def tune(predictor: Predictor, batches: Iterable[Batch], thresholds: Sequence[float], min_pixels: Sequence[int],
         on_probs: Callable[[torch.Tensor], None] | None = None) -> ThresholdDice:
    """Mean per-image Dice of ``predictor``'s probabilities over every ``(threshold, min_pixels)`` setting.

    Args:
        predictor: the model with the TTA and precision the prediction will use.
        batches: images and their masks (:data:`Batch`).
        thresholds: the probability thresholds to score (0.5 is always scored too, for reference).
        min_pixels: the ``min_pixels`` rules to score (0 is always scored too).
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


@torch.no_grad()
def score_validation(module: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     criterion: Callable[..., torch.Tensor], autocast: Callable[[], AbstractContextManager[Any]],
                     thresholds: Sequence[float], min_pixels: Sequence[int], device: torch.device) -> dict[str, Any]:
    """An epoch's validation: loss and the best setting's mean per-image Dice, one view in the training precision.

    Args:
        module: the model (put in eval mode).
        batches: ``(image, mask, valid)`` on the model's device, whole images.
        criterion: the training loss ``criterion(logits, mask, valid)``.
        autocast: the training precision's context (a new one per batch).
        thresholds: the probability thresholds to choose from (0.5 is scored too, for reference).
        min_pixels: the ``min_pixels`` rules to choose from (0 is scored too).
        device: where the scores accumulate (the model's device).

    Returns:
        ``val_loss``, ``val_dice``, ``threshold``, ``min_pixels``, ``val_dice_at_0.5``, ``val_s``.
    """
    module.eval()
    scores = ThresholdDice([*thresholds, 0.5], [*min_pixels, 0], device)
    loss_sum, images, start = 0.0, 0, time.perf_counter()
    for image, mask, valid in batches:
        with autocast():
            logits = module(image)
        loss_sum += float(criterion(logits, mask, valid)) * image.shape[0]
        images += image.shape[0]
        scores.update(torch.sigmoid(logits.float()), mask, valid)
    threshold, pixels, dice = scores.best(thresholds, min_pixels)
    return {"val_loss": loss_sum / max(images, 1), "val_dice": dice, "threshold": threshold, "min_pixels": pixels,
            "val_dice_at_0.5": scores.scores()[(0.5, 0)], "val_s": time.perf_counter() - start}


def tuned_meta(scores: ThresholdDice, thresholds: Sequence[float], min_pixels: Sequence[int], tta: str,
               precision: str) -> dict[str, Any]:
    """The best setting as checkpoint / ensemble metadata: ``threshold``, ``min_pixels``, how they were tuned."""
    threshold, pixels, dice = scores.best(thresholds, min_pixels)
    return {"threshold": threshold, "min_pixels": pixels, "threshold_tta": tta, "threshold_precision": precision,
            "tuned_dice": dice, "tuned_dice_at_0.5": scores.scores()[(0.5, 0)], "tuned_images": scores.images}


def tuning_record(scores: ThresholdDice, thresholds: Sequence[float], min_pixels: Sequence[int], tta: str,
                  precision: str, epoch: int) -> dict[str, Any]:
    """``tuning.json``: how and on how many images, every scored setting's mean Dice, the best, the checkpoint.

    ``thresholds`` and ``min_pixels`` are the grid the best is chosen from; ``scores`` also holds the
    ``(0.5, 0)`` reference that :func:`tune` always scores.
    """
    threshold, pixels, dice = scores.best(thresholds, min_pixels)
    return {"tta": tta, "precision": precision, "images": scores.images,
            "thresholds": [float(t) for t in thresholds], "min_pixels": [int(m) for m in min_pixels],
            "scores": [{"threshold": t, "min_pixels": m, "mean_dice": d} for (t, m), d in scores.scores().items()],
            "best": {"threshold": threshold, "min_pixels": pixels, "mean_dice": dice},
            "checkpoint": "best.pt", "checkpoint_epoch": int(epoch)}


def probs_file_names(items: Sequence[str]) -> list[str]:
    """A PNG file name per item: ``<item>.png``, unique, of letters, digits, ``.``, ``_`` and ``-``.

    Paths are taken relative to the items' common folder first; other characters become ``_``; a name
    already taken gets ``-<n>`` before ``.png``.
    """
    parts = [Path(item) for item in items]
    if any(len(p.parts) > 1 for p in parts):
        try:
            common = os.path.commonpath([str(p.parent) for p in parts])
        except ValueError:  # absolute and relative paths mixed
            common = ""
        parts = [p.relative_to(common) if common else p for p in parts]
    names: list[str] = []
    taken: set[str] = set()
    for part in parts:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(part.parts)).lstrip(".") or "item"
        name, n = f"{stem}.png", 1
        while name in taken:
            name, n = f"{stem}-{n}.png", n + 1
        taken.add(name)
        names.append(name)
    return names


def tuning_done(out_dir: Path, tta: str, precision: str, thresholds: Sequence[float], min_pixels: Sequence[int],
                keep_probs: bool) -> bool:
    """Whether ``out_dir``'s ``best.pt`` and ``tuning.json`` hold one tuning with these settings.

    A ``best.pt`` replaced since (a better epoch of a resumed run, a run started afresh over an old folder)
    has no tuned meta, or not the record's: it is tuned again.
    """
    try:
        record = json.loads((out_dir / TUNING_FILE).read_text())
        meta = load_checkpoint(out_dir / "best.pt")["meta"]
    except (OSError, ValueError, CheckpointError):
        return False
    wanted = {"tta": tta, "precision": precision, "thresholds": [float(t) for t in thresholds],
              "min_pixels": [int(m) for m in min_pixels]}
    return (all(record.get(k) == v for k, v in wanted.items()) and (not keep_probs or "val_probs" in record)
            and record.get("checkpoint_epoch") == meta.get("epoch") and meta.get("threshold_tta") == tta
            and meta.get("threshold_precision") == precision
            and meta.get("tuned_dice") == record.get("best", {}).get("mean_dice"))


class _ProbsWriter:
    """``on_probs`` of :func:`tune`: each batch's probabilities as uint8 PNGs, in item order."""

    def __init__(self, folder: Path, names: Sequence[str]) -> None:
        self.folder, self.names, self.written = folder, names, 0

    def __call__(self, probs: torch.Tensor) -> None:
        pixels = (probs.float() * 255).round_().to(torch.uint8).cpu().numpy()
        for image in pixels:
            Image.fromarray(np.ascontiguousarray(image)).save(self.folder / self.names[self.written])
            self.written += 1


@contextmanager
def _probs_sink(out_dir: Path, items: Sequence[str] | None) -> Iterator[_ProbsWriter | None]:
    """A :class:`_ProbsWriter` into a temporary folder renamed ``val_probs`` on success (None: keep nothing)."""
    if items is None:
        yield None
        return
    names = probs_file_names(items)
    with atomic_dir(out_dir / PROBS_DIR, overwrite=True) as tmp:
        writer = _ProbsWriter(tmp, names)
        yield writer
        if writer.written != len(names):
            raise DatasetError(f"{writer.written} validation probability maps for the {len(names)} validation items "
                               "of split.csv: the validation loader must yield every item once, in order")


def tune_run(out_dir: Path, batches: Iterable[Batch], items: Sequence[str], device: torch.device, tta: str,
             precision: str, thresholds: Sequence[float], min_pixels: Sequence[int], max_views: int | None = None,
             keep_probs: bool = False) -> dict[str, Any]:
    """Tune ``out_dir/best.pt`` as prediction will run it; write its meta, ``tuning.json`` (and ``val_probs/``).

    Args:
        out_dir: the run folder.
        batches: the validation images and masks (whole images), in the order of ``items``.
        items: the validation items' ``split.csv`` names (the dataset's ``item_names``).
        device: where the model runs.
        tta: the TTA mode of the prediction to come (``none``, ``flip``, ``d4``).
        precision: the forward pass's precision (fp32, bf16 or fp16).
        thresholds: the thresholds to choose from (``run.thresholds``).
        min_pixels: the ``min_pixels`` rules to choose from (``run.min_pixels``).
        max_views: views per forward pass (None: all of a batch at once).
        keep_probs: keep the probabilities as ``val_probs/*.png``.

    Returns:
        The ``tuning.json`` record.
    """
    best = out_dir / "best.pt"
    ckpt = load_checkpoint(best)
    model, _ = model_from_checkpoint(ckpt, device)
    predictor = Predictor(model, device, tta, precision, max_views=max_views)
    if not keep_probs:  # a folder of an earlier tuning would not be this checkpoint's
        shutil.rmtree(out_dir / PROBS_DIR, ignore_errors=True)
    with _probs_sink(out_dir, items if keep_probs else None) as sink:
        scores = tune(predictor, batches, thresholds, min_pixels, sink)
    meta = ckpt["meta"]
    single = {"val_threshold": meta.get("val_threshold", meta["threshold"]),
              "val_min_pixels": meta.get("val_min_pixels", meta["min_pixels"])}
    ckpt["meta"] = {**meta, **single, **tuned_meta(scores, thresholds, min_pixels, tta, precision)}
    with atomic_path(best) as tmp:  # the single-view choice kept as val_threshold / val_min_pixels
        torch.save(ckpt, tmp)
    record = tuning_record(scores, thresholds, min_pixels, tta, precision, meta["epoch"])
    if sink is not None:
        record["val_probs"] = dict(zip(sink.names, items, strict=True))
    with atomic_path(out_dir / TUNING_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    chosen = record["best"]
    log.info("tuned best.pt (epoch %d) on %d validation images with TTA %s in %s: Dice %.4f at threshold %.2f, "
             "min_pixels %d (single view: %.4f at threshold %.2f, min_pixels %d)", meta["epoch"], scores.images, tta,
             precision, chosen["mean_dice"], chosen["threshold"], chosen["min_pixels"], meta["val_dice"],
             single["val_threshold"], single["val_min_pixels"])
    return record
