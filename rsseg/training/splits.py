"""Training/validation splits: shuffled item splits and spatial splits of chips without leakage.

Tianchi images are independent 512x512 images: :func:`split_indices` shuffles them (or takes stratified
folds, :func:`rsseg.tianchi.folds.stratified_folds`). Chips are not independent: neighbouring chips of a
scene overlap (``rsseg tile --overlap``) and nearby pixels look alike, so a shuffled split puts most
validation pixels in training chips too. :func:`chip_sides` splits chips by place instead:

- several scenes (chip folders of different ``index.json`` scenes): whole scenes go to validation;
- one scene (or fewer scenes than folds): blocks of ``block`` x ``block`` windows of the scene's grid go to
  validation, and every training chip closer than ``gap`` pixels (at least the chips' overlap) to a
  validation chip is left out of both sides (side ``"gap"``).

Either way no validation pixel lies in a training chip. The split (every chip's side) is written to the
run folder as ``split.csv`` (:func:`write_split`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsseg.errors import DatasetError
from rsseg.fileio import atomic_path
from rsseg.tianchi.folds import stratified_folds
from rsseg.tianchi.masks import describe_masks

__all__ = ["ChipPlaces", "chip_sides", "split_indices", "tianchi_folds", "write_split"]

#: Fraction of a pixel by which two boxes may overlap and still count as apart (float round-off).
_EPS = 1e-6


def split_indices(n: int, split: str, val_fraction: float = 0.1, seed: int = 0, folds: int | None = None,
                  fold: int = 0) -> np.ndarray:
    """Indexes of the ``split`` ("train", "val" or "all") part of ``n`` items (sorted).

    Args:
        n: number of items.
        split: which part to return.
        val_fraction: share of the validation part when ``folds`` is None (at least one item if ``n > 1``).
        seed: seed of the shuffle that assigns items to parts.
        folds: k-fold cross-validation: the validation part is fold ``fold`` of ``folds`` equal parts.
        fold: which fold validates (0-based).
    """
    if split == "all":
        return np.arange(n)
    if split not in ("train", "val"):
        raise DatasetError(f"split {split!r}: expected 'train', 'val' or 'all'")
    order = np.random.default_rng(seed).permutation(n)
    if folds is not None:
        if not 0 <= fold < folds or folds < 2:
            raise DatasetError(f"fold {fold} of {folds} folds: expected folds >= 2 and 0 <= fold < folds")
        val = np.array_split(order, folds)[fold]
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
        n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
        val = order[:n_val]
    chosen = val if split == "val" else np.setdiff1d(order, val)
    return np.sort(chosen)


@dataclass(frozen=True)
class ChipPlaces:
    """Where each chip lies: its scene, its pixel window in the scene, its bounds in the scene's CRS.

    Attributes:
        scene: (N,) scene key of each chip (``index.json``'s ``scene``, else the chip folder).
        crs: (N,) CRS string of each chip's scene ("" when unknown).
        window: (N, 4) int64 ``col_off, row_off, width, height`` in scene pixels.
        bounds: (N, 4) float64 ``minx, miny, maxx, maxy`` in the CRS (kept for reports).
        stride: scene key -> grid stride in pixels (chip size - overlap).
        overlap: scene key -> overlap of neighbouring chips in pixels.
    """

    scene: np.ndarray
    crs: np.ndarray
    window: np.ndarray
    bounds: np.ndarray
    stride: Mapping[str, int]
    overlap: Mapping[str, int]


def _units(places: ChipPlaces, folds: int | None, block: int | None) -> tuple[np.ndarray, str]:
    """Each chip's unit of the split (an int) and the kind of unit ("scene" or "block")."""
    scenes = np.unique(places.scene)
    if len(scenes) >= max(2, folds or 0):
        return np.searchsorted(scenes, places.scene), "scene"
    keys = []
    for scene, (col, row, _, _) in zip(places.scene, places.window, strict=True):
        stride = max(1, places.stride[scene])
        side = block or max(1, math.ceil((stride + 2 * places.overlap[scene]) / stride))
        keys.append(f"{scene}|{row // stride // side}|{col // stride // side}")
    _, units = np.unique(np.array(keys, dtype=object), return_inverse=True)
    return units.reshape(-1), "block"


def _near(boxes: np.ndarray, others: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """For each box (x0, y0, x1, y1), whether it comes closer than ``gap`` (per other box) to any other box."""
    near = np.zeros(len(boxes), dtype=bool)
    if not len(others):
        return near
    lo, hi = others[:, :2] - gap[:, None], others[:, 2:] + gap[:, None]
    for start in range(0, len(boxes), 1024):  # bounded memory: 1024 x len(others) comparisons at a time
        part = boxes[start:start + 1024, None, :]
        tol = _EPS * np.maximum(1.0, np.abs(part[..., :2]))
        apart = ((part[..., :2] >= hi - tol) | (part[..., 2:] <= lo + tol)).any(-1)
        near[start:start + 1024] = (~apart).any(-1)
    return near


def _pixel_boxes(window: np.ndarray) -> np.ndarray:
    return np.column_stack([window[:, 0], window[:, 1], window[:, 0] + window[:, 2],
                            window[:, 1] + window[:, 3]]).astype(np.float64)


def chip_sides(places: ChipPlaces, val_fraction: float = 0.1, seed: int = 0, folds: int | None = None,
               fold: int = 0, block: int | None = None, gap: int | None = None) -> tuple[np.ndarray, str]:
    """Each chip's side of a spatial split: "train", "val" or "gap" (left out: too close to validation).

    Units (whole scenes, or blocks of ``block`` x ``block`` grid windows of one scene) are split with
    :func:`split_indices` (``val_fraction`` or ``folds``/``fold``, shuffled by ``seed``). A training chip of
    the same scene within ``gap`` pixels of a validation chip becomes "gap". Scenes are taken as apart:
    scenes of the same ground (two dates of one place) leak into each other; tile them as one scene.

    Args:
        places: the chips' scenes, windows and bounds.
        val_fraction: share of validation units (when ``folds`` is None).
        seed: seed of the shuffle of units.
        folds: k-fold split of the units instead of ``val_fraction``.
        fold: the validation fold.
        block: grid windows per block side (None: enough that a block is wider than the gap ring).
        gap: pixels between training and validation chips (None: each scene's chip overlap).

    Returns:
        ``(sides, unit)``: an (N,) array of "train"/"val"/"gap" and the kind of unit ("scene" or "block").

    Raises:
        DatasetError: fewer than two units (one window of one scene), or fewer units than folds.
    """
    units, kind = _units(places, folds, block)
    n_units = int(units.max()) + 1 if len(units) else 0
    if n_units < max(2, folds or 0):
        raise DatasetError(f"{n_units} {kind}(s) of chips cannot be split into training and validation without "
                           f"overlap{f' ({folds} folds)' if folds else ''}: tile more scenes or larger scenes, or "
                           "lower data.split_block")
    val = np.isin(units, split_indices(n_units, "val", val_fraction, seed, folds, fold))
    sides = np.where(val, "val", "train").astype(object)
    gap_px = np.array([places.overlap[s] if gap is None else gap for s in places.scene], dtype=np.float64)
    boxes = _pixel_boxes(places.window)
    for scene in np.unique(places.scene):  # within a scene: pixel windows
        same = places.scene == scene
        train, held = np.flatnonzero(same & ~val), same & val
        sides[train[_near(boxes[train], boxes[held], gap_px[held])]] = "gap"
    return np.array([str(v) for v in sides], dtype=object), kind


def tianchi_folds(mask_csv: str | os.PathLike[str], folds: int, stratify: str = "building_fraction",
                  seed: int = 0, size: int = 512) -> dict[str, int]:
    """Each image's fold of a K-fold split of a Tianchi mask file, stratified by its decoded masks.

    The masks are decoded and described (:func:`rsseg.tianchi.masks.describe_masks`: building fraction,
    emptiness) and dealt to folds by :func:`rsseg.tianchi.folds.stratified_folds`; nothing is cached.

    Args:
        mask_csv: the ``train_mask.csv`` file.
        folds: the number of folds (K).
        stratify: "building_fraction" (the same share of empty images and of each building-fraction bin in
            every fold) or "none" (a shuffled split of balanced sizes).
        seed: seed of the deal.
        size: the images' side in pixels.

    Raises:
        DatasetError: a bad row in the mask file (the first one named).
    """
    report = describe_masks(mask_csv, None, image_size=[size, size])
    report.raise_if_bad()
    assigned = stratified_folds(report.table, folds=folds, stratify=stratify, seed=seed)
    return {str(name): int(f) for name, f in assigned.items()}


def write_split(sides: Mapping[str, str], path: str | os.PathLike[str]) -> Path:
    """Write ``split.csv`` (columns ``item,side``: every item and its side), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item", "side"])
        writer.writerows(sorted(sides.items()))
    return path
