"""The model prediction runs: from a checkpoint path, a loaded checkpoint dict, a module, or loaded once.

:func:`load_model` returns a :class:`LoadedModel` (the model on its device, its band count, the checkpoint's
meta, its SHA-256 and file name); the prediction functions take one in place of a checkpoint, so a folder of
images loads and hashes the checkpoint once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsseg.errors import CheckpointError
from rsseg.fileio import file_sha256
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


ModelLike = PathLike | dict[str, Any] | nn.Module | LoadedModel


def load_model(checkpoint_or_model: ModelLike, device: torch.device) -> LoadedModel:
    """A :class:`LoadedModel` on ``device`` from a checkpoint path, dict, module (or a LoadedModel, as is)."""
    if isinstance(checkpoint_or_model, LoadedModel):
        checkpoint_or_model.model.to(device)
        return checkpoint_or_model
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


def module_sha256(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, values): the tag for a model given in memory."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
