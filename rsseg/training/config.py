"""The training configuration: pydantic models (a typo is an error) and YAML loading with overrides.

A config has five sections, each strict (``extra="forbid"``)::

    data:  {source: tianchi | chips | images, root, chips, images, masks, mask_ignore, val_fraction,
            folds, fold, stratify, split_block, seed,
            batch_size, augment: {...}}
    model: {arch, encoder, encoder_weights, init, kwargs: {...}}
    loss:  {dice_weight, bce_weight, per_image, smooth}
    optim: {lr, weight_decay, warmup_fraction, min_lr_ratio, grad_clip, accumulate}
    run:   {out_dir, epochs, device, precision, channels_last, sync_batchnorm, thresholds, tune_tta, resume, ...}

Relative paths are taken from the current directory. ``data.batch_size`` is the *global* batch: under DDP
each of N processes takes ``batch_size / N`` images, so a config trains the same way on 1 or N devices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rsseg.errors import ConfigError
from rsseg.inference.options import TtaMode
from rsseg.options import Options, read_yaml

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "LaunchOptions",
    "LossConfig",
    "ModelConfig",
    "NodeOptions",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AugmentConfig(_Strict):
    """Random training transforms (see :class:`rsseg.training.augment.TrainTransform`)."""

    d4: bool = True
    crop: int | None = Field(None, gt=0, description="random square crop side for training (None: whole images)")
    brightness: float = Field(0.1, ge=0, lt=1)
    contrast: float = Field(0.1, ge=0, lt=1)
    saturation: float = Field(0.1, ge=0, lt=1)
    hue: float = Field(0.0, ge=0, le=0.5)


class DataConfig(_Strict):
    """Where the images come from and how they are split and batched."""

    source: Literal["tianchi", "chips", "images"]
    root: Path | None = Field(None, description="Tianchi folder (train/ and train_mask.csv)")
    chips: list[Path] = Field(default_factory=list, description="chip folders or index.csv files (rsseg tile)")
    images: str | None = Field(None, description="source images: image patches, a folder or a glob pattern")
    masks: str | None = Field(None, description=(
        "source images: their masks (paired by file stem), a folder or a glob pattern; 0 background, > 0 "
        "building, 3-band masks: building where any band > 127"))
    mask_ignore: int | None = Field(None, ge=0, le=255, description=(
        "source images: a mask value marking pixels left out of loss and metrics"))
    mask_csv: str = "train_mask.csv"
    image_dir: str = "train"
    tile_size: int = Field(512, gt=0, description="Tianchi tile size (checked on every image)")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    folds: int | None = Field(None, ge=2, description=(
        "K-fold split: Tianchi images in K folds stratified as data.stratify; chips: scenes or grid blocks"))
    fold: int = Field(0, ge=0, description="the fold that validates (0-based, < data.folds)")
    stratify: Literal["building_fraction", "none"] = Field("building_fraction", description=(
        "Tianchi folds: building_fraction gives every fold the same share of empty images and of each "
        "building-fraction bin (from the decoded masks); none: shuffled folds of balanced sizes"))
    seed: int = 0
    split_block: int | None = Field(None, ge=1, description=(
        "chips of one scene: grid windows per side of the blocks that go to validation (None: automatic)"))
    batch_size: int = Field(8, gt=0, description="global batch, split across DDP processes")
    val_batch_size: int = Field(4, gt=0)
    num_workers: int | None = Field(None, ge=0, description="DataLoader workers per process (None: 0 on CPU)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source == "tianchi" and self.root is None:
            raise ValueError("data.source=tianchi needs data.root (the folder holding train/ and train_mask.csv)")
        if self.source == "chips" and not self.chips:
            raise ValueError("data.source=chips needs data.chips (one or more folders written by `rsseg tile`)")
        if self.source == "images" and not (self.images and self.masks):
            raise ValueError("data.source=images needs data.images and data.masks (folders or glob patterns of "
                             "image and mask patches, paired by file stem)")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"data.fold={self.fold} with data.folds={self.folds}: expected fold < folds")
        return self


class ModelConfig(_Strict):
    """Arguments of :func:`rsseg.models.create_model`."""

    arch: str = Field("unet", description="an smp architecture, or a network of your own as 'module:Class'")
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    init: str | None = Field(None, description=(
        "start from the weights of this rsseg checkpoint (fine-tuning); its architecture must match"))
    mean: list[float] | None = None
    std: list[float] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. encoder_depth, decoder_channels")


class LossConfig(_Strict):
    """Arguments of :class:`rsseg.training.losses.DiceBCELoss`."""

    dice_weight: float = Field(0.5, ge=0)
    bce_weight: float = Field(0.5, ge=0)
    per_image: bool = True
    smooth: float = Field(1.0, gt=0)


class OptimConfig(_Strict):
    """AdamW with a linear warm-up then a cosine decay to ``lr * min_lr_ratio``, stepped per batch."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="share of all steps spent warming up")
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    accumulate: int = Field(1, ge=1, description=(
        "batches per optimizer step: gradients of K batches of data.batch_size are summed (effective batch K x)"))


class RunConfig(_Strict):
    """Where outputs go, how long to train, on what device and in what precision."""

    out_dir: Path
    epochs: int = Field(10, gt=0)
    stop_after: int | None = Field(None, gt=0, description="stop after this many epochs in this invocation")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description=(
        "auto: bf16 on GPUs of compute capability >= 8.0, fp16 (with loss scaling) below, bf16 on CPUs with "
        "AVX512-BF16/AMX, else fp32"))
    channels_last: bool = True
    compile: bool = Field(False, description=(
        "torch.compile the training model (skipped with a warning where it cannot run: no triton on CUDA, "
        "no C++ compiler on CPU)"))
    sync_batchnorm: bool | None = Field(None, description=(
        "SyncBatchNorm across DDP processes; None: on under multi-GPU DDP when the per-GPU batch is below 8"))
    threads: int | None = Field(None, gt=0, description=(
        "torch CPU threads per process, set by `rsseg train` at start (fit() itself leaves threads alone)"))
    thresholds: list[float] = Field(default_factory=lambda: [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7])
    min_pixels: list[int] = Field(default_factory=lambda: [0, 16, 64, 256], description=(
        "post-processing chosen on validation with the threshold: fewer predicted pixels -> empty image"))
    tune_tta: TtaMode = Field("d4", description=(
        "the TTA the threshold/min_pixels are tuned with at the end of training (on the best checkpoint, in the "
        "training precision); match `rsseg predict --tta`, whose default is d4"))
    keep_val_probs: bool = Field(False, description=(
        "keep the tuning pass's validation (out-of-fold) probabilities: val_probs/<item>.png, uint8 0-255"))
    seed: int = 0
    resume: bool = Field(False, description="continue from out_dir/last.pt if it exists")
    overwrite: bool = Field(False, description="start afresh even if out_dir holds a run")
    progress: bool = True

    @model_validator(mode="after")
    def _thresholds(self) -> RunConfig:
        if not self.thresholds or not all(0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"run.thresholds={self.thresholds}: expected one or more values in (0, 1)")
        if not self.min_pixels or min(self.min_pixels) < 0:
            raise ValueError(f"run.min_pixels={self.min_pixels}: expected one or more pixel counts >= 0")
        return self


class TrainConfig(_Strict):
    """A whole training run."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig


class LaunchOptions(Options):
    """How a run is started (the options of ``rsseg train`` and of a pipeline's train stage)."""

    nproc: int = Field(1, ge=1, description="Processes (one per GPU); >1 starts torchrun.")


class NodeOptions(LaunchOptions):
    """``rsseg train``'s options for a run across machines: torchrun's static rendezvous on ``master_addr``.

    Start the same command on every node with its own ``node_rank`` (0 on the node at ``master_addr``).
    """

    nnodes: int = Field(1, ge=1, description="Machines (nodes) taking part; each runs --nproc processes.")
    node_rank: int = Field(0, ge=0, description="This machine's rank among the nodes (0: the master's).")
    master_addr: str = Field("127.0.0.1", description="Host name or address of node 0 (the rendezvous).")
    master_port: int | None = Field(None, ge=1, le=65535, description=(
        "TCP port of the rendezvous on node 0 (default: a free port with one node, 29500 with several)."))

    @model_validator(mode="after")
    def _node_rank(self) -> NodeOptions:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} with nnodes={self.nnodes}: expected node_rank < nnodes")
        return self


def _keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that holds the field at ``loc`` (None if ``loc`` goes below a plain value)."""
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _message(exc: ValidationError, origin: str) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        section = _section(loc)
        if err["type"] == "extra_forbidden" and section is not None:
            where = ".".join(str(p) for p in loc[:-1]) or "top level"
            problems.append(f"unknown key {key!r}; valid keys in {where}: {', '.join(_keys(section))}")
        elif err["type"] == "missing":
            problems.append(f"missing key {key!r}")
        elif err["type"] == "value_error":
            problems.append(f"{key or 'config'}: {err['msg'].removeprefix('Value error, ')}")
        else:
            problems.append(f"{key or 'config'}: {err['msg']} (got {err.get('input')!r})")
    return f"{origin}: " + "; ".join(problems)


def _apply_override(tree: dict[str, Any], dotted: str, raw: str) -> None:
    """Set ``tree[a][b]... = yaml(raw)`` for ``dotted = "a.b..."``, checking each key against the schema."""
    parts = dotted.split(".")
    model: type[BaseModel] | None = TrainConfig
    node = tree
    for depth, part in enumerate(parts):
        if model is not None and part not in model.model_fields:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(f"--set {dotted}: unknown key {part!r}; valid keys in {where}: {', '.join(_keys(model))}")
        if depth == len(parts) - 1:
            break
        annotation = model.model_fields[part].annotation if model is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if isinstance(raw, str) else raw
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}={raw!r}: not a YAML value ({exc})") from exc


def load_config(source: str | os.PathLike[str] | Mapping[str, Any],
                overrides: Mapping[str, str] | None = None) -> TrainConfig:
    """Read and validate a training config.

    Args:
        source: a YAML file, or a mapping with the same structure.
        overrides: dotted keys and YAML scalar values, e.g. ``{"optim.lr": "1e-3", "run.epochs": "2"}``.

    Raises:
        ConfigError: unreadable YAML, an unknown key (the message lists the valid ones) or a bad value.
    """
    if isinstance(source, Mapping):
        tree, origin = yaml.safe_load(yaml.safe_dump(dict(source))) if source else {}, "config"
    else:
        path = Path(source)
        origin = str(path)
        tree = read_yaml(path, "config")
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: expected a mapping with sections {', '.join(_keys(TrainConfig))}")
    for key, value in (overrides or {}).items():
        _apply_override(tree, key, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_message(exc, origin)) from exc
