"""Prediction over a folder of plain images (PNG, JPG, TIFF; georeferenced or not): one mask per image.

``rsseg predict model.pt images/ masks/`` (a folder, not a ``.csv`` and no ``--sample``: those make a Tianchi
submission, :func:`~rsseg.inference.predict.predict_images`) predicts every image of the folder with
:func:`~rsseg.inference.predict.predict_raster` (windows, TTA, bands, resolution as for scenes; the checkpoint
is loaded and hashed once) and writes ``masks/<stem>.<ext>``:

- a georeferenced image (a CRS, or a geotransform other than the identity) -> ``<stem>.tif``, the mask
  COG of a scene (CRS and transform kept, tags);
- a plain PNG or JPG -> ``<stem>.png`` (PNG, lossless: a JPEG would blur 0/1 masks), a plain TIFF ->
  ``<stem>.tif``; same size as the image, no georeferencing.

Masks hold 1 (building), 0 (background) and 255 (nodata), with the colour table of scene masks. Existing
masks are refused unless ``overwrite``; each is written atomically.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from rsseg.errors import DatasetError, RasterError
from rsseg.fileio import atomic_path, raster_env
from rsseg.inference.loading import ModelLike, load_model
from rsseg.inference.options import PredictOptions
from rsseg.inference.predict import predict_raster
from rsseg.inference.tta import resolve_device
from rsseg.options import resolve

__all__ = ["IMAGE_SUFFIXES", "mask_name", "predict_folder"]

log = logging.getLogger(__name__)

#: Image files a folder prediction reads (case-insensitive); other files (sidecars, world files) are left alone.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not p.name.startswith("."))
    if not found:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to predict")
    stems = [p.stem for p in found]
    doubles = sorted({s for s in stems if stems.count(s) > 1})
    if doubles:
        raise DatasetError(f"{folder}: images {doubles[:3]} share a stem with another format; their masks "
                           "would collide (move one of each pair elsewhere)")
    return found


def georeferenced(path: Path) -> bool:
    """Whether GDAL finds a CRS or a geotransform in ``path`` (world files included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                return src.crs is not None or src.transform != Affine.identity()
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"{path}: not an image GDAL can read ({' '.join(str(exc).split())})") from exc


def mask_name(image: Path, is_georeferenced: bool) -> str:
    """The mask's file name: ``.tif`` for georeferenced images and TIFFs, ``.png`` for plain PNG/JPG."""
    plain_tif = image.suffix.lower() in (".tif", ".tiff")
    return f"{image.stem}.tif" if is_georeferenced or plain_tif else f"{image.stem}.png"


def predict_folder(checkpoint_or_model: ModelLike, folder: str | Path, out_dir: str | Path,
                   options: PredictOptions | None = None, **values: Any) -> Path:
    """Predict every image of ``folder`` into a mask in ``out_dir`` (see the module docstring).

    Args:
        checkpoint_or_model: as for :func:`~rsseg.inference.predict.predict_raster`.
        folder: the images (``*.png``, ``*.jpg``, ``*.jpeg``, ``*.tif``, ``*.tiff``).
        out_dir: where the masks go (created).
        options: :class:`~rsseg.inference.options.PredictOptions` (masks only: ``output_kind`` is ``mask``).
        **values: override fields of ``options`` by name.

    Returns:
        ``out_dir``.

    Raises:
        DatasetError: no images, or two with the same stem. FileExistsError: a mask exists (without
        ``overwrite``). RasterError, CheckpointError, ConfigError: as for ``predict_raster``.
    """
    opts = resolve(PredictOptions, options, values).model_copy(update={"output_kind": "mask"})
    folder, out_dir = Path(folder), Path(out_dir)
    images = _images(folder)
    targets = {image: out_dir / mask_name(image, georeferenced(image)) for image in images}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not opts.overwrite:
        raise FileExistsError(f"{len(existing)} mask(s) exist, e.g. {existing[0]}; pass overwrite=True "
                              "(CLI: --overwrite) to replace them")
    loaded = load_model(checkpoint_or_model, resolve_device(opts.device))
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, target in targets.items():
        if target.suffix == ".tif":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                predict_raster(loaded, image, target, opts)
        else:
            _plain_png(loaded, image, target, opts)
    log.info("%s: %d image(s) -> masks in %s", folder, len(images), out_dir)
    return out_dir


def _plain_png(loaded: Any, image: Path, target: Path, opts: PredictOptions) -> None:
    """Predict a plain PNG/JPG into a GeoTIFF in a scratch folder, then copy it to a PNG (palette kept)."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".rsseg-") as scratch:
        mask = Path(scratch) / f"{image.stem}.tif"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            predict_raster(loaded, image, mask, opts.model_copy(update={"overwrite": True}))
            with raster_env(GDAL_PAM_ENABLED="NO"), atomic_path(target, overwrite=True) as tmp:
                rasterio.shutil.copy(mask, tmp, driver="PNG")
