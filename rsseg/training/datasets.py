"""Torch datasets of images and building masks: Tianchi folders and chip indexes.

Every item is a dict of float32 tensors::

    {"image": (C, H, W) raw pixel values (the model normalises), "mask": (1, H, W) 0/1,
     "valid": (1, H, W) 0 where the label says ignore (255: nodata, padding), else 1}

Splits are deterministic: the items are shuffled with ``numpy.random.default_rng(seed)`` and cut into
``folds`` parts (``folds=None``: one validation part of ``val_fraction``), so every process and every
run with the same seed agrees on them. Random transforms draw from a generator seeded with
``(seed, epoch, index)``: an item's augmentation does not depend on the worker that loads it, and a
resumed run sees exactly the items an uninterrupted one would (call :meth:`set_epoch` each epoch before
iterating; DataLoader workers copy the dataset when an epoch's iterator starts).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from PIL import Image
from torch.utils.data import Dataset

from rsseg.errors import DatasetError
from rsseg.tianchi.files import read_masks_csv
from rsseg.training.augment import TrainTransform

__all__ = ["ChipDataset", "TianchiDataset", "split_indices"]

log = logging.getLogger(__name__)

IGNORE = 255
PathLike = str | os.PathLike[str]


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


class _MaskDataset(Dataset):
    """Shared item assembly: load (image HWC, labels HW), transform, tensors."""

    def __init__(self, transform: TrainTransform | None, seed: int) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random transforms the next iteration draws."""
        self.epoch = int(epoch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Image (H, W, C) and labels (H, W uint8: 0, 1, 255 ignore) of item ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, labels = self.load(index)
        if self.transform is not None:
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            image, (labels,) = self.transform(image.astype(np.float32, copy=False), (labels,), rng)
        image = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)
        labels = np.ascontiguousarray(labels)
        valid = labels != IGNORE
        return {"image": torch.from_numpy(image),
                "mask": torch.from_numpy(((labels == 1) & valid)[None].astype(np.float32)),
                "valid": torch.from_numpy(valid[None].astype(np.float32))}


class TianchiDataset(_MaskDataset):
    """JPG images and their RLE masks in the Tianchi layout (``root/train/*.jpg``, ``root/train_mask.csv``).

    Masks are decoded per item from the lazily indexed CSV. Every image the CSV names must exist and be
    ``size`` pixels square; both are checked on construction (image headers only) so that bad data fails
    before training starts, with a message naming the file.

    Args:
        root: the dataset folder.
        split: "train", "val" or "all" (see :func:`split_indices`).
        val_fraction: share of validation images.
        seed: seed of the split and of the random transforms.
        folds: k-fold split instead of ``val_fraction``.
        fold: the validation fold.
        transform: random training transform (None for validation).
        mask_csv: the mask file, relative to ``root``.
        image_dir: the image folder, relative to ``root``.
        size: expected image width and height.
    """

    def __init__(self, root: PathLike, split: str = "all", val_fraction: float = 0.1, seed: int = 0,
                 folds: int | None = None, fold: int = 0, transform: TrainTransform | None = None,
                 mask_csv: str = "train_mask.csv", image_dir: str = "train", size: int = 512) -> None:
        super().__init__(transform, seed)
        self.root = Path(root)
        self.image_dir = self.root / image_dir
        self.size = size
        csv_path = self.root / mask_csv
        if not csv_path.is_file():
            raise DatasetError(f"{csv_path} not found: expected a Tianchi folder with {mask_csv} and {image_dir}/")
        self.masks = read_masks_csv(csv_path)
        names = sorted(self.masks)
        if not names:
            raise DatasetError(f"{csv_path} lists no images")
        self.names = [names[i] for i in split_indices(len(names), split, val_fraction, seed, folds, fold)]
        self._check_images(csv_path)
        self.bands, self.max_value = 3, 255.0

    def _check_images(self, csv_path: Path) -> None:
        missing = [n for n in self.names if not (self.image_dir / n).is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} images named in {csv_path.name} are missing from {self.image_dir} "
                               f"(e.g. {', '.join(missing[:3])})")
        for name in self.names:
            with Image.open(self.image_dir / name) as img:
                if img.size != (self.size, self.size):
                    raise DatasetError(f"{self.image_dir / name} is {img.size[0]}x{img.size[1]}; expected "
                                       f"{self.size}x{self.size} like every Tianchi image")

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB image (H, W, 3 uint8) and mask (H, W uint8) of item ``index``."""
        name = self.names[index]
        with Image.open(self.image_dir / name) as img:
            image = np.asarray(img.convert("RGB"))
        return image, self.masks.mask(name, (self.size, self.size))


class ChipDataset(_MaskDataset):
    """Image and label chips listed in one or several ``index.csv`` files written by :func:`rsseg.tiling.write_chips`.

    Each chip is read whole (chips are small). Label chips are uint8: 0 background, 1 building, 255 ignore.
    Folders may come from different scenes but must agree on band count and chip size.

    Args:
        indexes: chip folders (holding ``index.csv`` and ``index.json``) or ``index.csv`` paths.
        split, val_fraction, seed, folds, fold, transform: as for :class:`TianchiDataset`.
    """

    def __init__(self, indexes: PathLike | Sequence[PathLike], split: str = "all", val_fraction: float = 0.1,
                 seed: int = 0, folds: int | None = None, fold: int = 0,
                 transform: TrainTransform | None = None) -> None:
        super().__init__(transform, seed)
        paths = [indexes] if isinstance(indexes, str | os.PathLike) else list(indexes)
        if not paths:
            raise DatasetError("no chip index given: expected one or more chip folders or index.csv files")
        rows: list[tuple[str, str]] = []
        metas: list[dict[str, Any]] = []
        for path in map(Path, paths):
            index = path / "index.csv" if path.is_dir() or path.suffix != ".csv" else path
            rows.extend(self._read_index(index))
            metas.append(self._read_meta(index))
        shapes = {(len(m["bands"]), m["size"]) for m in metas}
        if len(shapes) > 1:
            raise DatasetError(f"chip folders disagree on (bands, chip size): {sorted(shapes)}; train on one kind")
        if not rows:
            raise DatasetError(f"the chip indexes {[str(p) for p in paths]} list no chips")
        self.items = [rows[i] for i in split_indices(len(rows), split, val_fraction, seed, folds, fold)]
        self.bands, self.size = shapes.pop()
        dtype = np.dtype(metas[0]["dtype"])
        self.max_value = float(np.iinfo(dtype).max) if dtype.kind in "ui" else None

    @staticmethod
    def _read_index(index: Path) -> list[tuple[str, str]]:
        if not index.is_file():
            raise DatasetError(f"chip index {index} not found: expected a folder written by `rsseg tile`")
        with open(index, newline="") as fh:
            reader = csv.DictReader(fh)
            if not {"image", "label"} <= set(reader.fieldnames or ()):
                raise DatasetError(f"{index}: columns {reader.fieldnames}; expected image,label,... (rsseg tile)")
            rows = list(reader)
        unlabelled = [r["image"] for r in rows if not r["label"]]
        if unlabelled:
            raise DatasetError(f"{index}: {len(unlabelled)} chips have no label chip (e.g. {unlabelled[0]}); "
                               "tile the scene with --labels to train on it")
        out = [(str(index.parent / r["image"]), str(index.parent / r["label"])) for r in rows]
        missing = [p for pair in out for p in pair if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"{index}: {len(missing)} listed chip files are missing (e.g. {missing[0]})")
        return out

    @staticmethod
    def _read_meta(index: Path) -> dict[str, Any]:
        meta_path = index.with_name("index.json")
        try:
            meta = json.loads(meta_path.read_text())
            return {"bands": list(meta["bands"]), "size": int(meta["size"]), "dtype": str(meta["dtype"])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{meta_path}: cannot read bands/size/dtype ({type(exc).__name__}: {exc})") from exc

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image chip (H, W, C, source dtype) and label chip (H, W uint8) of item ``index``."""
        image_path, label_path = self.items[index]
        with rasterio.open(image_path) as src:
            image = np.moveaxis(src.read(), 0, -1)
        with rasterio.open(label_path) as src:
            labels = src.read(1)
        if image.shape[:2] != labels.shape or image.shape[-1] != self.bands:
            raise DatasetError(f"{image_path}: {image.shape} (H, W, bands) with labels {labels.shape}; "
                               f"expected {self.bands} bands and a label chip of the same size")
        return image, labels
