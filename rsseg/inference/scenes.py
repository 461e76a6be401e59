"""Several scenes with one model: ``rsseg predict CHECKPOINT SCENE... OUTPUT`` (a list, a glob, remote names).

Each scene is predicted by :func:`~rsseg.inference.predict.predict_raster` with the model loaded once, into
``OUTPUT/<stem>.tif`` (and ``<stem>.prob.tif`` with ``output="both"``). ``OUTPUT`` appears only when every
scene is written; a failure leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsseg.errors import ConfigError
from rsseg.fileio import atomic_dir, expand_paths, stem_of
from rsseg.inference.loading import ModelLike, load_model
from rsseg.inference.options import PredictOptions
from rsseg.inference.predict import predict_raster
from rsseg.inference.tta import resolve_device
from rsseg.options import resolve

__all__ = ["is_scene_folder", "predict_rasters", "scene_targets"]

log = logging.getLogger(__name__)


def is_scene_folder(folder: Path) -> bool:
    """Whether ``folder``'s images are all georeferenced GeoTIFFs, i.e. scenes.

    ``rsseg predict`` then writes ``<stem>.tif`` (+ ``<stem>.prob.tif``) each, as for several scenes; any other
    folder is one of plain images, one mask per image (:func:`rsseg.inference.images.predict_folder`).
    """
    from rsseg.inference.images import IMAGE_SUFFIXES, georeferenced

    images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
              and not p.name.startswith(".")]
    return bool(images) and all(p.suffix.lower() in (".tif", ".tiff") and georeferenced(p) for p in images)


def scene_targets(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
                  ) -> dict[str | Path, Path]:
    """``{scene: out_dir/<stem>.tif}`` for the scenes ``inputs`` names (files, folders of GeoTIFFs, globs, remote).

    Raises:
        ConfigError: an empty glob, a missing scene, or two scenes with the same stem (their outputs would
            collide); the message names them.
    """
    targets: dict[str | Path, Path] = {}
    seen: dict[str, str | Path] = {}
    for scene in expand_paths(list(inputs)):
        stem = stem_of(scene)
        if (first := seen.setdefault(stem, scene)) is not scene:
            raise ConfigError(f"{first} and {scene} have the same name {stem!r}; their outputs would collide in "
                              f"{out_dir}: rename one or predict them in separate calls")
        targets[scene] = Path(out_dir) / f"{stem}.tif"
    return targets


def predict_rasters(checkpoint_or_model: ModelLike, inputs: Sequence[str | os.PathLike[str]],
                   out_dir: str | os.PathLike[str], options: PredictOptions | None = None, **values: Any) -> Path:
    """Predict every scene ``inputs`` names into the folder ``out_dir``, loading the model once.

    Args:
        checkpoint_or_model: as for :func:`~rsseg.inference.predict.predict_raster`.
        inputs: files, folders (their ``.tif``/``.tiff``), globs and remote names (``/vsicurl/https://...``,
            ``s3://...``, ``gs://...``), see :func:`rsseg.fileio.expand_paths`.
        out_dir: the output folder: ``<stem>.tif`` per scene (``<stem>.prob.tif`` too with ``output="both"``).
        options: :class:`~rsseg.inference.options.PredictOptions`.
        **values: override fields of ``options`` by name, e.g. ``window=256, output="both"``.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: see :func:`scene_targets`. OutputExistsError: ``out_dir`` exists (without ``overwrite``).
        RasterError, CheckpointError: as for ``predict_raster``; ``out_dir`` is then not created.
    """
    opts = resolve(PredictOptions, options, values)
    targets = scene_targets(inputs, out_dir)
    with atomic_dir(out_dir, overwrite=opts.overwrite) as tmp:
        loaded = load_model(checkpoint_or_model, resolve_device(opts.device))
        for scene, target in targets.items():
            predict_raster(loaded, scene, tmp / target.name, opts.model_copy(update={"overwrite": False}))
    log.info("%d scene(s) -> %s", len(targets), out_dir)
    return Path(out_dir)
