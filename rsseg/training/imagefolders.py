"""Folders of image and mask patches (Inria, WHU, Massachusetts, SpaceNet, CrowdAI style) as a dataset.

``data.source: images`` pairs ``data.images`` with ``data.masks`` (each a folder or a glob pattern) by
file stem: ``images/austin1_3.tif`` goes with ``masks/austin1_3.png``. Any format GDAL reads works
(PNG, JPG, TIFF), georeferenced or not. A mask is a class map: 0 background, anything above 0 building
(0/1 and 0/255 alike); a 3-band mask (an RGB rendering) is building where any band is above 127. An
optional ``data.mask_ignore`` value marks pixels that count for neither class. The split is by image
(patches are never cut further), and the band statistics that normalise the model are computed over the
training images only.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from rsseg.errors import DatasetError
from rsseg.training.augment import TrainTransform
from rsseg.training.bandstats import StatsAccumulator, bands_of, gsd_metres
from rsseg.training.datasets import IGNORE, _check_split, _MaskDataset, value_range
from rsseg.training.splits import split_indices

__all__ = ["ImageFolderDataset", "list_pairs"]

log = logging.getLogger(__name__)

#: Files beside images that are not images: GDAL sidecars, world files, metadata.
SIDECARS = (".aux.xml", ".ovr", ".prj", ".tfw", ".pgw", ".jgw", ".wld", ".json", ".txt", ".csv", ".md", ".xml")


def _files(spec: str | os.PathLike[str], what: str) -> dict[str, Path]:
    """The files of a folder or glob pattern, by stem (sidecar and hidden files left out)."""
    path = Path(spec)
    found = sorted(path.iterdir()) if path.is_dir() else sorted(Path(p) for p in glob.glob(str(spec)))
    files = [f for f in found if f.is_file() and not f.name.startswith(".") and not f.name.lower().endswith(SIDECARS)]
    if not files:
        raise DatasetError(f"data.{what}={str(spec)!r} matches no files: expected a folder of images or a glob "
                           "pattern such as 'data/train/*.tif'")
    by_stem: dict[str, Path] = {}
    for file in files:
        if file.stem in by_stem:
            raise DatasetError(f"data.{what}: {by_stem[file.stem].name} and {file.name} share the stem "
                               f"{file.stem!r}; pairs are matched by stem, so keep one per stem")
        by_stem[file.stem] = file
    return by_stem


def list_pairs(images: str | os.PathLike[str], masks: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths matched by stem, sorted by stem; every file must have its partner."""
    image_files, mask_files = _files(images, "images"), _files(masks, "masks")
    lonely = sorted(set(image_files) ^ set(mask_files))
    if lonely:
        no_mask = [s for s in lonely if s in image_files]
        no_image = [s for s in lonely if s in mask_files]
        parts = [f"{len(found)} {what} ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})"
                 for what, found in (("images without a mask", no_mask), ("masks without an image", no_image))
                 if found]
        raise DatasetError(f"unmatched stems in data.images={str(images)!r} / data.masks={str(masks)!r}: "
                           f"{'; '.join(parts)}; images and masks pair by file stem")
    return [(image_files[s], mask_files[s]) for s in sorted(image_files)]


def _open(path: Path) -> Any:
    """rasterio.open without the warning plain PNG/JPG patches (no georeferencing) would give."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return rasterio.open(path)
        except RasterioIOError as exc:
            raise DatasetError(f"{path}: not a raster GDAL can read ({exc})") from exc


def _header(path: Path) -> tuple[int, int, int, str]:
    with _open(path) as src:
        return src.width, src.height, src.count, src.dtypes[0]


class ImageFolderDataset(_MaskDataset):
    """Image and mask patches paired by file stem (see the module docstring).

    Args:
        images: a folder or glob pattern of images.
        masks: a folder or glob pattern of masks.
        split, val_fraction, seed, folds, fold, transform: as for
            :class:`~rsseg.training.datasets.TianchiDataset`; the split's unit is the image.
        mask_ignore: a mask value (of the first band) that marks pixels to leave out of loss and metrics.
    """

    def __init__(self, images: str | os.PathLike[str], masks: str | os.PathLike[str], split: str = "all",
                 val_fraction: float = 0.1, seed: int = 0, folds: int | None = None, fold: int = 0,
                 transform: TrainTransform | None = None, mask_ignore: int | None = None) -> None:
        super().__init__(transform, seed)
        _check_split(split)
        self.mask_ignore = mask_ignore
        pairs = list_pairs(images, masks)
        val = set(split_indices(len(pairs), "val", val_fraction, seed, folds, fold).tolist())
        self.sides = {str(image): "val" if i in val else "train" for i, (image, _) in enumerate(pairs)}
        self.pairs = pairs
        self.items = [p for p in pairs if split == "all" or self.sides[str(p[0])] == split]
        width, height, self.bands, dtype = _header(pairs[0][0])
        for image, mask in pairs:
            found = _header(image)
            if found[:3] != (width, height, self.bands):
                raise DatasetError(f"{image} is {found[0]}x{found[1]} with {found[2]} bands; expected "
                                   f"{width}x{height} with {self.bands} like {pairs[0][0].name}: every image of a "
                                   "folder must have the same size and bands")
            mask_size = _header(mask)[:2]
            if mask_size != (width, height):
                raise DatasetError(f"mask {mask} is {mask_size[0]}x{mask_size[1]}; expected {width}x{height} like "
                                   f"its image {image.name}")
        if width != height:
            raise DatasetError(f"{pairs[0][0]} is {width}x{height}; expected square patches")
        self.size, self.dtype = width, np.dtype(dtype)
        self.min_value, self.max_value = value_range(self.dtype)
        self._stats: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def item_names(self) -> list[str]:
        """Each item's name in ``split.csv``, in the dataset's order: the image paths."""
        return [str(image) for image, _ in self.items]

    @property
    def band_stats(self) -> list[dict[str, Any]]:
        """Band statistics over the training images (the same for both splits' datasets; cached)."""
        if self._stats is None:
            acc = StatsAccumulator(self.bands, self.dtype)
            train = [image for image, _ in self.pairs if self.sides[str(image)] == "train"] or [self.pairs[0][0]]
            for image in train:
                with _open(image) as src:
                    acc.add(np.moveaxis(src.read(), 0, -1))
            with _open(self.pairs[0][0]) as src:
                descriptions, indexes = list(src.descriptions), list(src.indexes)
            self._stats = acc.stats(descriptions, indexes)
        return self._stats

    @property
    def source_bands(self) -> list[dict[str, Any]]:
        """The images' bands: ``[{"band": index, "description": str | None}, ...]``."""
        return bands_of(self.band_stats)

    @property
    def gsd(self) -> float | None:
        """The first image's pixel size in metres, or None where it has no georeferencing."""
        with _open(self.pairs[0][0]) as src:
            if src.crs is None:
                return None
            return gsd_metres(src.crs.to_wkt(), list(src.transform)[:6], src.width, src.height)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W, C, source dtype) and labels (H, W uint8: 0, 1, 255 ignore) of item ``index``."""
        image_path, mask_path = self.items[index]
        with _open(image_path) as src:
            image = np.moveaxis(src.read(), 0, -1)
        with _open(mask_path) as src:
            mask = src.read()
        building = np.any(mask > 127, axis=0) if mask.shape[0] >= 3 else mask[0] > 0
        labels = building.astype(np.uint8)
        if self.mask_ignore is not None:
            labels[mask[0] == self.mask_ignore] = IGNORE
        return image, labels
