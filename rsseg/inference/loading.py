"""The model prediction runs: from a checkpoint path, several, an ensemble file, a dict, a module, or loaded once.

:func:`load_model` returns a :class:`LoadedModel` (the model on its device, its band count, the checkpoint's
meta, its SHA-256 and file name); the prediction functions take one in place of a checkpoint, so a folder of
images loads and hashes the checkpoint once.

Several checkpoints (a list or tuple of paths) or an ensemble file (``ensemble.json``) load as an
:class:`~rsseg.inference.ensemble.Ensemble`: probabilities averaged over the members. Its meta is the ensemble
file's (the threshold and ``min_pixels`` tuned for the ensemble), or for a plain list the members' mean
threshold and smallest ``min_pixels`` (:func:`~rsseg.inference.ensemble.untuned_meta`); the training data's
``bands``, ``gsd_m`` and ``tile_size`` come from the members. Its digest is the SHA-256 over the members'
SHA-256 digests; ``members`` names each (``<folder>/<file>``) with its own. Members of different
architectures, band counts or tile sizes are refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsseg.errors import CheckpointError
from rsseg.fileio import file_sha256
from rsseg.inference.ensemble import (
    Ensemble,
    data_meta,
    is_ensemble_file,
    member_checkpoints,
    members_digest,
    read_members,
    untuned_meta,
)
from rsseg.models import Segmenter, model_from_checkpoint

__all__ = ["LoadedModel", "ModelLike", "load_model"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict with what its checkpoint says about it."""

    model: nn.Module
    in_channels: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    name: str | None = None  # the checkpoint's file name (None: given as a dict or a module)
    members: tuple[tuple[str, str], ...] = ()  # an ensemble's members: (<folder>/<file>, SHA-256) each

    def provenance(self) -> dict[str, str]:
        """Output tags naming the model: ``checkpoint_sha256``, ``checkpoint`` and an ensemble's ``members`` (JSON)."""
        tags = {"checkpoint_sha256": self.digest}
        if self.name is not None:
            tags["checkpoint"] = self.name
        if self.members:
            tags["members"] = json.dumps([{"checkpoint": name, "sha256": digest} for name, digest in self.members])
        return tags


ModelLike = PathLike | list[PathLike] | tuple[PathLike, ...] | dict[str, Any] | nn.Module | LoadedModel


def load_model(checkpoint_or_model: ModelLike, device: torch.device) -> LoadedModel:
    """A :class:`LoadedModel` on ``device`` from a checkpoint path, dict, module (or a LoadedModel, as is).

    A list or tuple of checkpoint paths, or an ensemble file's path, gives an ensemble (module docstring);
    a list of one checkpoint is that checkpoint.

    Raises:
        CheckpointError: a missing or foreign checkpoint, a changed ensemble member, members that differ in
            architecture, band count or tile size (naming two of them and what differs).
    """
    if isinstance(checkpoint_or_model, LoadedModel):
        checkpoint_or_model.model.to(device)
        return checkpoint_or_model
    if isinstance(checkpoint_or_model, list | tuple):
        if len(checkpoint_or_model) == 1 and not is_ensemble_file(checkpoint_or_model[0]):
            return load_model(checkpoint_or_model[0], device)
        return _load_ensemble(checkpoint_or_model, device)
    if isinstance(checkpoint_or_model, str | os.PathLike) and is_ensemble_file(checkpoint_or_model):
        return _load_ensemble([checkpoint_or_model], device)
    name = None
    if isinstance(checkpoint_or_model, nn.Module):
        model, meta, digest = checkpoint_or_model, {}, module_sha256(checkpoint_or_model)
    else:
        if isinstance(checkpoint_or_model, dict):
            digest = "unknown (checkpoint given as a dict)"
        else:
            path = Path(checkpoint_or_model)
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} not found")
            digest, name = file_sha256(path), path.name
        model, ckpt = model_from_checkpoint(checkpoint_or_model, device)
        meta = ckpt.get("meta") or {}
    in_channels = int(model.mean.shape[1]) if isinstance(model, Segmenter) else None
    return LoadedModel(model, in_channels, meta, digest, name)


def _load_ensemble(items: list[PathLike] | tuple[PathLike, ...], device: torch.device) -> LoadedModel:
    """The ensemble of checkpoint paths and ensemble files ``items`` (one file alone: its tuned meta)."""
    if not items:
        raise CheckpointError("no checkpoint given; expected one or more checkpoint paths or an ensemble file")
    paths, file_meta = member_checkpoints(items)
    members = read_members(paths)
    meta = {**data_meta(members), **(file_meta if file_meta is not None else untuned_meta(members))}
    model = Ensemble([m.model(device) for m in members])
    name = f"ensemble of {len(members)}"
    if file_meta is not None:
        name = f"{Path(items[0]).name} ({name})"
    return LoadedModel(model, model.in_channels, meta, members_digest(members), name,
                       tuple((m.label, m.sha256) for m in members))


def module_sha256(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, values): the tag for a model given in memory."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
