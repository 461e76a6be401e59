"""Torch datasets of images and building masks: Tianchi folders and chip indexes.

Every item is a dict of float32 tensors::

    {"image": (C, H, W) raw pixel values (the model normalises), "mask": (1, H, W) 0/1,
     "valid": (1, H, W) 0 where the label says ignore (255: nodata, padding), else 1}

Splits are deterministic (:mod:`rsseg.training.splits`), so every process and every run with the same
seed agrees on them: Tianchi images are shuffled with ``numpy.random.default_rng(seed)`` and cut into
``folds`` parts (``folds=None``: one validation part of ``val_fraction``); chips are split by place (whole
scenes, or blocks of a scene's grid with a gap), so that no validation pixel is in a training chip. Each
dataset's ``sides`` maps every item to its side ("train", "val", "gap") for the run's ``split.csv``.
Random transforms draw from a generator seeded with
``(seed, epoch, index)``: an item's augmentation does not depend on the worker that loads it, and a
resumed run sees exactly the items an uninterrupted one would (call :meth:`set_epoch` each epoch before
iterating; the epoch is in shared memory, so persistent DataLoader workers see it too).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
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
from rsseg.training.bandstats import StatsAccumulator, bands_of, combine_stats, gsd_metres
from rsseg.training.splits import ChipPlaces, chip_sides, split_indices, tianchi_folds

__all__ = ["ChipDataset", "TianchiDataset", "value_range"]

log = logging.getLogger(__name__)

IGNORE = 255
PathLike = str | os.PathLike[str]


_PLACE_COLUMNS = ("col_off", "row_off", "width", "height", "minx", "miny", "maxx", "maxy")


def _check_split(split: str) -> None:
    if split not in ("train", "val", "all"):
        raise DatasetError(f"split {split!r}: expected 'train', 'val' or 'all'")


def _places(rows: list[dict[str, Any]], metas: list[dict[str, Any]]) -> ChipPlaces:
    """The chips' scenes, windows and bounds (from index.csv) and each scene's grid (from index.json)."""
    try:
        window = np.array([[int(r[k]) for k in _PLACE_COLUMNS[:4]] for r in rows], dtype=np.int64)
        bounds = np.array([[float(r[k]) for k in _PLACE_COLUMNS[4:]] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"a chip index row has a bad window or bounds value ({exc}); expected the numbers "
                           "rsseg tile writes") from exc
    overlap: dict[str, int] = {}
    for meta in metas:  # folders of one scene: the widest overlap sets the gap
        overlap[meta["scene"]] = max(overlap.get(meta["scene"], 0), meta["overlap"])
    stride = {m["scene"]: m["size"] - overlap[m["scene"]] for m in metas}
    return ChipPlaces(np.array([r["scene"] for r in rows], dtype=object), np.array([r["crs"] for r in rows],
                      dtype=object), window, bounds, stride, overlap)


def _nodata(value: Any) -> float | None:
    """index.json's nodata (JSON has no NaN: tiling writes it as the string "nan")."""
    return None if value is None else float(value)


def value_range(dtype: np.dtype) -> tuple[float | None, float | None]:
    """The range photometric augmentation keeps pixels in: an integer type's own, none for floats."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return None, None


class _MaskDataset(Dataset):
    """Shared item assembly: load (image HWC, labels HW), transform, tensors."""

    def __init__(self, transform: TrainTransform | None, seed: int) -> None:
        self.transform = transform
        self.seed = seed
        # Shared memory: DataLoader workers (persistent ones too) see the epoch set_epoch sets here.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.sides: dict[str, str] = {}
        #: items as uint8 tensors (uint8 data bound for a GPU, which normalises them): see
        #: :func:`rsseg.training.devices.uint8_batches`
        self.uint8_items = False

    @property
    def epoch(self) -> int:
        """The epoch whose random transforms items draw."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random transforms the next iteration draws (in every DataLoader worker)."""
        self._epoch[0] = int(epoch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Image (H, W, C) and labels (H, W uint8: 0, 1, 255 ignore) of item ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, labels = self.load(index)
        if self.transform is not None:
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            image, (labels,) = self.transform(image.astype(np.float32, copy=False), (labels,), rng)
        if self.uint8_items:  # augmented values are in 0-255 (clipped): round them back
            image = np.rint(image).astype(np.uint8) if image.dtype != np.uint8 else image
        out_dtype = np.uint8 if self.uint8_items else np.float32
        image = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=out_dtype)
        labels = np.ascontiguousarray(labels)
        valid = labels != IGNORE
        return {"image": torch.from_numpy(image),
                "mask": torch.from_numpy(((labels == 1) & valid)[None].astype(out_dtype)),
                "valid": torch.from_numpy(valid[None].astype(out_dtype))}


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
        folds: k-fold split instead of ``val_fraction``, stratified as ``stratify`` says
            (:func:`rsseg.training.splits.tianchi_folds`).
        fold: the validation fold.
        transform: random training transform (None for validation).
        mask_csv: the mask file, relative to ``root``.
        image_dir: the image folder, relative to ``root``.
        size: expected image width and height.
        stratify: "building_fraction" or "none" (folds only).
        fold_of: each image's fold, when already computed (e.g. shared by the training and validation sets).
    """

    def __init__(self, root: PathLike, split: str = "all", val_fraction: float = 0.1, seed: int = 0,
                 folds: int | None = None, fold: int = 0, transform: TrainTransform | None = None,
                 mask_csv: str = "train_mask.csv", image_dir: str = "train", size: int = 512,
                 stratify: str = "building_fraction", fold_of: Mapping[str, int] | None = None) -> None:
        super().__init__(transform, seed)
        _check_split(split)
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
        if folds is not None:
            if not 0 <= fold < folds:
                raise DatasetError(f"fold {fold} of {folds} folds: expected 0 <= fold < folds")
            if fold_of is None:
                fold_of = tianchi_folds(csv_path, folds, stratify, seed, size)
            self.sides = {name: "val" if fold_of[name] == fold else "train" for name in names}
        else:
            val = set(split_indices(len(names), "val", val_fraction, seed).tolist())
            self.sides = {name: "val" if i in val else "train" for i, name in enumerate(names)}
        self.names = [n for n in names if split == "all" or self.sides[n] == split]
        self._check_images(csv_path)
        self.bands, self.min_value, self.max_value = 3, 0.0, 255.0
        # JPG RGB: no georeferencing; the model keeps its default (ImageNet) normalisation
        self.band_stats, self.gsd = None, None
        self.source_bands = [{"band": i + 1, "description": d} for i, d in enumerate(("red", "green", "blue"))]

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

    @property
    def item_names(self) -> list[str]:
        """Each item's name in ``split.csv``, in the dataset's order: the image file names."""
        return list(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB image (H, W, 3 uint8) and mask (H, W uint8) of item ``index``."""
        name = self.names[index]
        with Image.open(self.image_dir / name) as img:
            image = np.asarray(img.convert("RGB"))
        return image, self.masks.mask(name, (self.size, self.size))


class ChipDataset(_MaskDataset):
    """Image and label chips listed in one or several ``index.csv`` files written by :func:`rsseg.tiling.write_chips`.

    Each chip is read whole (chips are small). Label chips are uint8: 0 background, 1 building, 255 ignore.
    Folders may come from different scenes but must agree on band count and chip size. The split is
    spatial (:func:`rsseg.training.splits.chip_sides`): whole scenes when there are several, else blocks
    of the grid with a gap of the chips' overlap; chips in the gap are in neither split.

    Args:
        indexes: chip folders (holding ``index.csv`` and ``index.json``) or ``index.csv`` paths.
        split, val_fraction, seed, folds, fold, transform: as for :class:`TianchiDataset`; the split's
            units are scenes or blocks, not chips.
        split_block: grid windows per block side when one scene is split (None: automatic).
    """

    def __init__(self, indexes: PathLike | Sequence[PathLike], split: str = "all", val_fraction: float = 0.1,
                 seed: int = 0, folds: int | None = None, fold: int = 0,
                 transform: TrainTransform | None = None, split_block: int | None = None) -> None:
        super().__init__(transform, seed)
        _check_split(split)
        paths = [indexes] if isinstance(indexes, str | os.PathLike) else list(indexes)
        if not paths:
            raise DatasetError("no chip index given: expected one or more chip folders or index.csv files")
        rows: list[dict[str, Any]] = []
        metas: list[dict[str, Any]] = []
        per_folder: list[list[dict[str, Any]]] = []
        for path in map(Path, paths):
            index = path / "index.csv" if path.is_dir() or path.suffix != ".csv" else path
            found = self._read_index(index)
            meta = self._read_meta(index)
            rows.extend(dict(r, scene=meta["scene"], crs=meta["crs"]) for r in found)
            metas.append(meta)
            per_folder.append(found)
        shapes = {(len(m["bands"]), m["size"]) for m in metas}
        if len(shapes) > 1:
            raise DatasetError(f"chip folders disagree on (bands, chip size): {sorted(shapes)}; train on one kind")
        if not rows:
            raise DatasetError(f"the chip indexes {[str(p) for p in paths]} list no chips")
        if split == "all":
            self.sides = {r["image"]: "train" for r in rows}
        else:
            sides, self.unit = chip_sides(_places(rows, metas), val_fraction, seed, folds, fold, split_block)
            self.sides = {r["image"]: side for r, side in zip(rows, sides, strict=True)}
        self.items = [(r["image"], r["label"]) for r in rows if split == "all" or self.sides[r["image"]] == split]
        self.bands, self.size = shapes.pop()
        self.metas, self._folder_images = metas, [[r["image"] for r in found] for found in per_folder]
        self.dtype = np.dtype(metas[0]["dtype"])
        self.min_value, self.max_value = value_range(self.dtype)
        self._stats: list[dict[str, Any]] | None = None

    @property
    def band_stats(self) -> list[dict[str, Any]]:
        """Band statistics of the chip folders, combined (cached).

        A folder whose ``index.json`` has no ``band_stats`` gets them computed from its chips.
        """
        if self._stats is None:
            parts = []
            for meta, images in zip(self.metas, self._folder_images, strict=True):
                if meta.get("band_stats"):
                    parts.append(meta["band_stats"])
                    continue
                log.info("%s has no band_stats: computing them from its %d chips", meta["path"], len(images))
                acc = StatsAccumulator(self.bands, meta["dtype"], meta.get("nodata"))
                descriptions = None
                for path in images:
                    with rasterio.open(path) as src:
                        acc.add(np.moveaxis(src.read(), 0, -1))
                        descriptions = descriptions or list(src.descriptions)
                parts.append(acc.stats(descriptions, meta["bands"]))
            self._stats = combine_stats(parts)
        return self._stats

    @property
    def source_bands(self) -> list[dict[str, Any]]:
        """The scene bands the chips hold: ``[{"band": index, "description": str | None}, ...]``."""
        return bands_of(self.band_stats)

    @property
    def gsd(self) -> float | None:
        """The chips' pixel size in metres (the folders' mean; None where no folder has a CRS and transform)."""
        found = [gsd_metres(m["crs"], m["transform"], m["width"], m["height"]) for m in self.metas
                 if m.get("transform")]
        found = [g for g in found if g is not None]
        return float(np.mean(found)) if found else None

    @staticmethod
    def _read_index(index: Path) -> list[dict[str, Any]]:
        if not index.is_file():
            raise DatasetError(f"chip index {index} not found: expected a folder written by `rsseg tile`")
        with open(index, newline="") as fh:
            reader = csv.DictReader(fh)
            if not {"image", "label", *_PLACE_COLUMNS} <= set(reader.fieldnames or ()):
                raise DatasetError(f"{index}: columns {reader.fieldnames}; expected image,label,"
                                   f"{','.join(_PLACE_COLUMNS)} (written by rsseg tile)")
            rows = list(reader)
        unlabelled = [r["image"] for r in rows if not r["label"]]
        if unlabelled:
            raise DatasetError(f"{index}: {len(unlabelled)} chips have no label chip (e.g. {unlabelled[0]}); "
                               "tile the scene with --labels to train on it")
        out = [dict(r, image=str(index.parent / r["image"]), label=str(index.parent / r["label"])) for r in rows]
        missing = [r[k] for r in out for k in ("image", "label") if not os.path.isfile(r[k])]
        if missing:
            raise DatasetError(f"{index}: {len(missing)} listed chip files are missing (e.g. {missing[0]})")
        return out

    @staticmethod
    def _read_meta(index: Path) -> dict[str, Any]:
        meta_path = index.with_name("index.json")
        try:
            meta = json.loads(meta_path.read_text())
            return {"bands": list(meta["bands"]), "size": int(meta["size"]), "dtype": str(meta["dtype"]),
                    "overlap": int(meta.get("overlap", 0)), "scene": str(meta.get("scene") or index.parent),
                    "crs": str(meta.get("crs") or ""), "nodata": _nodata(meta.get("nodata")),
                    "band_stats": meta.get("band_stats"), "transform": meta.get("transform"),
                    "width": int(meta.get("width") or 0), "height": int(meta.get("height") or 0),
                    "path": str(meta_path)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{meta_path}: cannot read bands/size/dtype ({type(exc).__name__}: {exc})") from exc

    def __len__(self) -> int:
        return len(self.items)

    @property
    def item_names(self) -> list[str]:
        """Each item's name in ``split.csv``, in the dataset's order: the chip image paths."""
        return [str(image) for image, _ in self.items]

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
