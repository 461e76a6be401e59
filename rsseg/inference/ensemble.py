"""Ensembles: several checkpoints of one model (folds, seeds) predicting as one.

:class:`Ensemble` runs its members one after another on the same input (the activations of one member at a
time) and returns the logit of the mean of their probabilities, so :class:`~rsseg.inference.tta.Predictor`,
which takes the sigmoid and averages TTA views, gives probabilities averaged over members and views.

An ensemble file (``ensemble.json``, plain JSON) names the members and the settings tuned for the ensemble::

    {"format": "rsseg-ensemble/1",
     "members": [{"path": "../train@0/best.pt", "sha256": "...", "arch": "unet", "encoder": "resnet34",
                  "bands": 3}, ...],
     "meta": {"threshold": 0.45, "min_pixels": 64, "threshold_tta": "d4", "threshold_precision": "bf16",
              "precision": "bf16", "tuned_dice": 0.87, "tuned_on": "out-of-fold", "folds": 5, ...}}

Member paths are relative to the file's folder where possible (a pipeline's work folder moves as a whole);
reading checks every member is there with the SHA-256 it had when the file was written.
:func:`rsseg.inference.folds.fold_ensemble` writes one from K training runs, with the threshold and
``min_pixels`` chosen on their pooled out-of-fold scores (``tuning.json`` of each run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsseg.errors import CheckpointError
from rsseg.fileio import atomic_path, file_sha256
from rsseg.inference.sources import recorded_bands
from rsseg.inference.tuned import tuned_with
from rsseg.models import Segmenter, load_checkpoint, model_from_checkpoint, model_name

__all__ = ["FORMAT", "Ensemble", "Member", "check_compatible", "data_meta", "is_ensemble_file", "member_checkpoints",
           "members_digest", "read_ensemble", "read_members", "untuned_meta", "write_ensemble", "write_members"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: The ``format`` of an ensemble file.
FORMAT = "rsseg-ensemble/1"
#: What an ensemble keeps of a member checkpoint (not a training run's optimizer and scheduler state).
_KEPT = ("format", "version", "model", "state_dict", "meta")
#: Clamp of the mean probability before its logit (float32: ``logit(1 - 1e-6)`` is still finite).
EPS = 1e-6


class Ensemble(nn.Module):
    """Members taking the same raw pixels; the output is the logit of the mean of their sigmoid probabilities.

    Args:
        members: :class:`~rsseg.models.Segmenter` instances (each normalises its own input) with one band count.
    """

    def __init__(self, members: Sequence[Segmenter]) -> None:
        super().__init__()
        if not members:
            raise CheckpointError("an ensemble needs at least one member checkpoint")
        bands = {int(m.mean.shape[1]) for m in members}
        if len(bands) > 1:
            raise CheckpointError(f"ensemble members take {sorted(bands)} bands; they must all take the same")
        self.members = nn.ModuleList(members)

    @property
    def in_channels(self) -> int:
        """The band count every member takes."""
        return int(self.members[0].mean.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``logit(mean_k sigmoid(member_k(x)))`` in float32, ``(N, 1, H, W)`` (one member: its logits as they are)."""
        if len(self.members) == 1:
            return self.members[0](x)
        total = None
        for member in self.members:  # one member's activations alive at a time
            probs = torch.sigmoid(member(x).float())
            total = probs if total is None else total.add_(probs)
        return torch.logit(total / len(self.members), eps=EPS)


@dataclass(frozen=True)
class Member:
    """A member checkpoint as loaded on the CPU: where it is, its hash, and what it says about itself."""

    path: Path
    sha256: str
    checkpoint: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The ``create_model`` arguments."""
        return self.checkpoint["model"]

    @property
    def meta(self) -> dict[str, Any]:
        """The checkpoint's meta (threshold, precision, bands, GSD, ...)."""
        return self.checkpoint.get("meta") or {}

    @property
    def bands(self) -> int:
        """The band count the model takes."""
        return int(self.config.get("in_channels", 3))

    @property
    def label(self) -> str:
        """``<folder>/<file>``: enough to tell fold runs apart, no absolute path."""
        return f"{self.path.parent.name}/{self.path.name}" if self.path.parent.name else self.path.name

    def model(self, device: torch.device | str) -> Segmenter:
        """The member's model on ``device``, in eval mode."""
        return model_from_checkpoint(self.checkpoint, device)[0]


def read_members(paths: Sequence[PathLike]) -> list[Member]:
    """Load member checkpoints on the CPU and check they make one ensemble (:func:`check_compatible`)."""
    members = []
    for path in map(Path, paths):
        checkpoint = load_checkpoint(path)  # a missing or foreign file: CheckpointError naming it
        kept = {key: checkpoint[key] for key in _KEPT if key in checkpoint}  # the optimizer's state goes
        members.append(Member(path, file_sha256(path), kept))
    check_compatible(members)
    return members


def _traits(member: Member) -> dict[str, Any]:
    """What members of one ensemble share (None: not recorded, not compared)."""
    bands = recorded_bands(member.meta)
    return {"architecture": model_name(member.config), "band count": member.bands,
            "tile size": member.meta.get("tile_size"),
            "source bands": None if bands is None else [b["band"] for b in bands],
            "training GSD (gsd_m)": member.meta.get("gsd_m")}


def check_compatible(members: Sequence[Member]) -> None:
    """Raise :class:`~rsseg.errors.CheckpointError` naming two members and what differs between them.

    Members must share the architecture (arch and encoder), the band count, and where both record them, the
    tile size, the source bands and the training GSD.
    """
    if not members:
        raise CheckpointError("an ensemble needs at least one member checkpoint")
    first, reference = members[0], _traits(members[0])
    for other in members[1:]:
        for trait, value in _traits(other).items():
            if value is not None and reference[trait] is not None and value != reference[trait]:
                raise CheckpointError(f"checkpoints {first.path} and {other.path} differ in {trait} "
                                      f"({reference[trait]} vs {value}); an ensemble averages checkpoints of one "
                                      "model (folds, seeds): give checkpoints that agree")


def data_meta(members: Sequence[Member]) -> dict[str, Any]:
    """What prediction reads of the training data (``bands``, ``gsd_m``, ``tile_size``): the members' own."""
    out = {}
    for key in ("bands", "gsd_m", "tile_size"):
        value = next((m.meta[key] for m in members if m.meta.get(key) is not None), None)
        if value is not None:
            out[key] = value
    return out


def untuned_meta(members: Sequence[Member]) -> dict[str, Any]:
    """Settings of a plain list of checkpoints: the mean threshold, the smallest ``min_pixels``, common precision."""
    metas = [m.meta for m in members]
    out: dict[str, Any] = {"tuned_on": "members, not as an ensemble"}
    for key, values in (("precision", {m.get("precision") for m in metas}),
                        ("threshold_tta", {tuned_with(m)[0] for m in metas}),
                        ("threshold_precision", {tuned_with(m)[1] for m in metas})):
        if len(values) == 1 and None not in values:
            out[key] = values.pop()
    thresholds = [float(m["threshold"]) for m in metas if m.get("threshold") is not None]
    if thresholds:
        out["threshold"] = sum(thresholds) / len(thresholds)
    min_pixels = [int(m["min_pixels"]) for m in metas if m.get("min_pixels") is not None]
    if min_pixels:
        out["min_pixels"] = min(min_pixels)
    log.info("%d checkpoints not tuned as an ensemble: threshold %s (the members' mean), min_pixels %s (the "
             "smallest); an ensemble file (rsseg.inference.folds.fold_ensemble) stores tuned ones", len(members),
             out.get("threshold"), out.get("min_pixels"))
    return out


def members_digest(members: Sequence[Member]) -> str:
    """SHA-256 over the members' SHA-256 digests, in order."""
    return hashlib.sha256("\n".join(m.sha256 for m in members).encode()).hexdigest()


def is_ensemble_file(path: PathLike) -> bool:
    """Whether ``path`` names an ensemble file (``*.json``) rather than a checkpoint."""
    return Path(path).suffix.lower() == ".json"


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` where possible (same drive), else absolute, with ``/`` separators."""
    try:
        return Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix()
    except ValueError:  # another drive (Windows)
        return path.absolute().as_posix()


def write_ensemble(path: PathLike, checkpoints: Sequence[PathLike], meta: dict[str, Any] | None = None,
                   overwrite: bool = False) -> Path:
    """Write an ensemble file naming ``checkpoints`` (with their SHA-256) and ``meta``, atomically.

    Args:
        path: the file to write (``ensemble.json``).
        checkpoints: the member checkpoints; they must make one ensemble (same architecture, bands, tile size).
        meta: JSON-able settings for the ensemble (``threshold``, ``min_pixels``, how they were tuned...).
        overwrite: replace an existing file.

    Raises:
        CheckpointError: a missing, foreign or incompatible member. OutputExistsError: ``path`` exists.
    """
    return write_members(path, read_members(checkpoints), meta, overwrite)


def write_members(path: PathLike, members: Sequence[Member], meta: dict[str, Any] | None = None,
                  overwrite: bool = False) -> Path:
    """:func:`write_ensemble` of members already read (:func:`read_members`)."""
    path = Path(path)
    doc = {"format": FORMAT,
           "members": [{"path": _relative(m.path, path.parent), "sha256": m.sha256, "arch": m.config.get("arch"),
                        "encoder": m.config.get("encoder"), "bands": m.bands} for m in members],
           "meta": dict(meta or {})}
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_ensemble(path: PathLike) -> tuple[list[Path], dict[str, Any]]:
    """The member checkpoints and the meta of an ensemble file, every member checked against its SHA-256.

    Raises:
        CheckpointError: not an ensemble file, a member missing, or one changed since the file was written.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ensemble file {path} not found")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON ensemble file: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("members"), list) \
            or not doc["members"]:
        raise CheckpointError(f"{path} is not an rsseg ensemble file (expected format {FORMAT!r} and a list of "
                              "members); write one with rsseg.inference.ensemble.write_ensemble")
    paths = []
    for i, entry in enumerate(doc["members"], start=1):
        if not isinstance(entry, dict) or not entry.get("path") or not entry.get("sha256"):
            raise CheckpointError(f"{path}: member {i} lacks its path or sha256")
        member = path.parent / entry["path"]  # an absolute entry stays absolute
        if not member.is_file():
            raise CheckpointError(f"{path}: member {i} checkpoint {member} not found")
        if file_sha256(member) != entry["sha256"]:
            raise CheckpointError(f"{path}: member {i} checkpoint {member} changed since the ensemble was written "
                                  "(its SHA-256 differs); write the ensemble again")
        paths.append(member)
    meta = doc.get("meta") or {}
    return paths, dict(meta) if isinstance(meta, dict) else {}


def member_checkpoints(items: Sequence[PathLike]) -> tuple[list[Path], dict[str, Any] | None]:
    """The checkpoints ``items`` name (an ensemble file gives its members), and the file's meta if one alone.

    A single ensemble file is a tuned ensemble (its meta); any other list is a plain one (meta None).
    """
    paths: list[Path] = []
    file_meta = None
    for item in items:
        if is_ensemble_file(item):
            found, file_meta = read_ensemble(item)
            paths.extend(found)
        else:
            paths.append(Path(item))
    return paths, file_meta if len(items) == 1 else None

