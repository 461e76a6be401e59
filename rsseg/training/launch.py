"""The training loop: one process on a CPU or GPU, or one DDP rank of several under torchrun.

:func:`fit` trains from a :class:`~rsseg.training.config.TrainConfig`. Under ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set) it joins a process group (NCCL on CUDA, gloo on CPU), shards the batches with a
:class:`~torch.utils.data.DistributedSampler` and averages gradients with DDP; ``data.batch_size`` is the
global batch, so one process and N processes take the same steps. Rank 0 alone logs, validates and
writes (see :mod:`rsseg.training.trainer`). :func:`launch` starts ``torch.distributed.run`` itself for ``nproc > 1``.

Each epoch writes to ``run.out_dir`` (all atomically): ``last.pt``; ``best.pt`` when the validation mean
per-image Dice improves; ``metrics.csv``; ``curves.png``; and ``config.yaml`` (the resolved config) at the
start. A checkpoint's ``meta`` holds the epoch, ``val_dice``, ``best_dice``, the validation-chosen
``threshold``, the data source, the rsseg version, ``in_channels``, ``tile_size`` and what inference needs
to know of the data: ``bands`` (the source bands' indexes and descriptions), ``band_stats`` (per band: mean,
std, 1st/99th percentiles, dtype; the model's normalisation unless ``model.mean/std`` are set) and ``gsd_m``
(the chips' pixel size in metres; None for ungeoreferenced images); ``last.pt`` also holds
the optimizer, scheduler, step and RNG states (as tensors and lists: ``weights_only`` loading), from which
``run.resume`` continues exactly where the run stopped. After the last epoch ``best.pt``'s ``threshold`` and
``min_pixels`` are tuned again with ``run.tune_tta`` and ``tuning.json`` is written
(:mod:`rsseg.training.tuning`).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import Dataset

from rsseg.errors import ConfigError, DatasetError, OutputExistsError, PipelineError
from rsseg.options import resolve
from rsseg.training.augment import TrainTransform
from rsseg.training.config import LaunchOptions, NodeOptions, TrainConfig, load_config
from rsseg.training.datasets import ChipDataset, TianchiDataset
from rsseg.training.devices import usable_cores
from rsseg.training.imagefolders import ImageFolderDataset
from rsseg.training.splits import tianchi_folds
from rsseg.training.trainer import Rank, Trainer, WarmupCosine, data_source

__all__ = ["TrainConfig", "WarmupCosine", "build_datasets", "fit", "launch", "load_config", "resolve_device"]

#: The module torchrun starts in each training process: ``rsseg train`` (an entry point: it sets the
#: process's allocator and threads, then calls :func:`fit`, which joins the process group).
RANK_ENTRY = ("-m", "rsseg.cli", "train")

log = logging.getLogger(__name__)

#: torchrun's default rendezvous port, used across nodes when --master-port is not given.
DEFAULT_PORT = 29500

#: Minutes a collective (the end-of-epoch barrier) may wait: rank 0 validates while the others wait there.
COLLECTIVE_TIMEOUT_MIN = 120


def resolve_device(name: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """The torch device for ``run.device`` ("auto", "cpu", "cuda") and this process's place on its machine.

    ``local_rank`` and ``local_world`` are torchrun's ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``: the processes
    of *this* node share its GPUs (the other nodes have their own). A launcher that gives each process one
    GPU (``CUDA_VISIBLE_DEVICES=i``, e.g. srun) leaves one visible device: every local rank takes it.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA GPU is available (torch.cuda.is_available() is False); "
                          "use run.device=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_world > count or local_rank >= count:
        raise ConfigError(f"{local_world} processes on this machine (local rank {local_rank}) but {count} CUDA "
                          f"devices: use --nproc <= {count} per node, or run.device=cpu")
    return torch.device("cuda", local_rank)


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training (augmented) and validation (whole images) datasets of ``cfg.data``."""
    data = cfg.data
    common: dict[str, Any] = dict(val_fraction=data.val_fraction, seed=data.seed, folds=data.folds, fold=data.fold)
    if data.source == "tianchi":
        common.update(root=data.root, mask_csv=data.mask_csv, image_dir=data.image_dir, size=data.tile_size)
        if data.folds is not None:  # decode the masks once for both sides
            csv_path = Path(data.root or ".") / data.mask_csv
            if not csv_path.is_file():
                raise DatasetError(f"{csv_path} not found: expected a Tianchi folder with {data.mask_csv} and "
                                   f"{data.image_dir}/")
            common.update(fold_of=tianchi_folds(csv_path, data.folds, data.stratify, data.seed, data.tile_size))
        kind: type[TianchiDataset] | type[ChipDataset] | type[ImageFolderDataset] = TianchiDataset
    elif data.source == "images":
        common.update(images=data.images, masks=data.masks, mask_ignore=data.mask_ignore)
        kind = ImageFolderDataset
    else:
        common.update(indexes=data.chips, split_block=data.split_block)
        kind = ChipDataset
    val = kind(split="val", **common)
    aug = data.augment
    train = kind(split="train", transform=TrainTransform(
        d4=aug.d4, crop=aug.crop, brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation,
        hue=aug.hue, min_value=val.min_value, max_value=val.max_value), **common)
    if not len(val):
        raise DatasetError(f"the validation split of {data_source(cfg)['path']} is empty: raise data.val_fraction "
                           "or use data.folds")
    if aug.crop is not None and aug.crop > val.size:
        raise ConfigError(f"data.augment.crop={aug.crop} is larger than the {val.size}-pixel images")
    return train, val


def _per_rank_batch(cfg: TrainConfig, world: int, n_train: int) -> int:
    batch = cfg.data.batch_size
    if batch % world:
        raise ConfigError(f"data.batch_size={batch} (the global batch) must be a multiple of the {world} processes")
    step = batch * cfg.optim.accumulate
    if n_train < step:
        raise DatasetError(f"the training split has {n_train} images, fewer than one batch ({step} = "
                           f"data.batch_size {batch} x optim.accumulate {cfg.optim.accumulate}); "
                           "add images or lower data.batch_size or optim.accumulate")
    return batch // world


def _resume_path(cfg: TrainConfig) -> Path | None:
    last = Path(cfg.run.out_dir) / "last.pt"
    if not last.exists():
        return None
    if cfg.run.resume:
        return last
    if cfg.run.overwrite:
        return None
    raise OutputExistsError(f"{cfg.run.out_dir} already holds a run (last.pt); set run.resume=true to continue it "
                          "or run.overwrite=true to start afresh")


def fit(cfg: TrainConfig) -> Path:
    """Train as configured, in this process (or as one DDP rank under torchrun); returns ``best.pt``'s path.

    The process is left as found: the run draws from its own RNG streams (seeded with ``run.seed``), and
    allocator and thread settings (``run.threads``) are the entry point's (``rsseg train`` sets them).

    Raises:
        ConfigError: a device that is not there, or a batch that does not split across processes.
        DatasetError: missing or wrongly sized images, an empty split.
        OutputExistsError: ``run.out_dir`` holds a run and neither ``run.resume`` nor ``run.overwrite`` is set.
    """
    env = Rank.from_env()
    device = resolve_device(cfg.run.device, env.local_rank, env.local_world)
    train_ds, val_ds = build_datasets(cfg)
    per_rank = _per_rank_batch(cfg, env.world, len(train_ds))
    resume_from = _resume_path(cfg)
    if env.world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Ranks > 0 wait at a barrier while rank 0 validates and writes: allow for long validations.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world,
                                timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
    try:
        trainer = Trainer(cfg, env, device, train_ds, val_ds, per_rank)
        if resume_from is not None:
            trainer.resume(resume_from)
        return trainer.run()
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(config: str | os.PathLike[str] | Mapping[str, Any] | TrainConfig,
           options: LaunchOptions | NodeOptions | None = None, *, overrides: Mapping[str, str] | None = None,
           **values: Any) -> Path:
    """Train from a config file, mapping or :class:`TrainConfig`; ``nproc > 1`` or ``nnodes > 1`` runs DDP.

    ``options`` (or keywords such as ``nproc=2``) are :class:`NodeOptions`; ``overrides`` are dotted
    config keys with YAML values, as ``--set`` takes them.

    With ``nproc > 1`` or ``nnodes > 1`` the config, device and data are checked here first (so bad input
    fails with one message before any worker starts), then ``python -m torch.distributed.run
    --nproc_per_node N --nnodes M --node_rank R --master_addr HOST --master_port P -m rsseg.cli train CONFIG``
    runs and this call waits for it. Across nodes every node runs this with its own ``node_rank``; the data
    paths and ``run.out_dir`` must be the same on all of them (node 0's rank 0 writes).

    Returns:
        The path of ``best.pt``.

    Raises:
        PipelineError: a worker process failed (its own message is in the log above).
    """
    if isinstance(config, TrainConfig):
        cfg = load_config(config.model_dump(mode="json"), overrides) if overrides else config
    else:
        cfg = load_config(config, overrides)
    opts = resolve(NodeOptions, NodeOptions(**options.model_dump()) if options is not None else None, values)
    nproc = opts.nproc
    if nproc == 1 and opts.nnodes == 1:
        return fit(cfg)
    device = resolve_device(cfg.run.device, 0, nproc)
    train_ds, _ = build_datasets(cfg)
    _per_rank_batch(cfg, nproc * opts.nnodes, len(train_ds))
    if opts.node_rank == 0:
        _resume_path(cfg)
    env = dict(os.environ)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // nproc))  # the children's threads: the cores shared out
    port = opts.master_port or (_free_port() if opts.nnodes == 1 else DEFAULT_PORT)
    with tempfile.TemporaryDirectory(prefix="rsseg-train-") as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--nnodes", str(opts.nnodes), "--node_rank", str(opts.node_rank),
               "--master_addr", opts.master_addr, "--master_port", str(port), *RANK_ENTRY, str(resolved)]
        log.info("starting %d training processes (node %d of %d): %s", nproc, opts.node_rank, opts.nnodes,
                 " ".join(cmd))
        result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise PipelineError(f"training with {nproc} processes on node {opts.node_rank} of {opts.nnodes} failed "
                            f"(exit status {result.returncode}); the workers' own messages are above")
    return Path(cfg.run.out_dir) / "best.pt"
