"""The training loop: one process on a CPU or GPU, or one DDP rank of several under torchrun.

:func:`fit` trains from a :class:`~rsseg.train_config.TrainConfig`. Under ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set) it joins a process group (NCCL on CUDA, gloo on CPU), shards the batches with a
:class:`~torch.utils.data.DistributedSampler` and averages gradients with DDP; ``data.batch_size`` is the
global batch, so one process and N processes take the same steps. Rank 0 alone logs, validates and
writes. :func:`launch` starts ``torch.distributed.run`` itself for ``nproc > 1``.

Each epoch writes to ``run.out_dir`` (all atomically): ``last.pt``; ``best.pt`` when the validation mean
per-image Dice improves; ``metrics.csv``; ``curves.png``; and ``config.yaml`` (the resolved config) at the
start. A checkpoint's ``meta`` holds the epoch, ``val_dice``, ``best_dice``, the validation-chosen
``threshold``, the data source, the rsseg version, ``in_channels`` and ``tile_size``; ``last.pt`` also holds
the optimizer, scheduler, step and RNG states (as tensors and lists: ``weights_only`` loading), from which
``run.resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from rsseg.augment import TrainTransform
from rsseg.datasets import ChipDataset, TianchiDataset
from rsseg.errors import CheckpointError, ConfigError, DatasetError, PipelineError, RssegError
from rsseg.fileio import atomic_path
from rsseg.losses import DiceBCELoss
from rsseg.models import create_model, load_checkpoint, model_config, save_checkpoint
from rsseg.train_config import TrainConfig, load_config
from rsseg.train_report import ThresholdDice, write_curves, write_metrics

__all__ = ["TrainConfig", "WarmupCosine", "build_datasets", "fit", "launch", "load_config", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> _Dist:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


class WarmupCosine:
    """Learning-rate factor per step: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def __init__(self, total: int, warmup: int, min_ratio: float) -> None:
        self.total, self.warmup, self.min_ratio = int(total), int(warmup), float(min_ratio)

    def __call__(self, step: int) -> float:
        """The factor of the base learning rate at ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str, local_rank: int = 0, nproc: int = 1) -> torch.device:
    """The torch device for ``run.device`` ("auto", "cpu", "cuda") and this process's local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA GPU is available (torch.cuda.is_available() is False); "
                          "use run.device=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if nproc > torch.cuda.device_count():
        raise ConfigError(f"{nproc} processes but {torch.cuda.device_count()} CUDA devices: use --nproc "
                          f"<= {torch.cuda.device_count()}, or run.device=cpu")
    return torch.device("cuda", local_rank)


def build_datasets(cfg: TrainConfig) -> tuple[TianchiDataset | ChipDataset, TianchiDataset | ChipDataset]:
    """The training (augmented) and validation (whole tiles) datasets of ``cfg.data``."""
    data = cfg.data
    common: dict[str, Any] = dict(val_fraction=data.val_fraction, seed=data.seed, folds=data.folds, fold=data.fold)
    if data.source == "tianchi":
        common.update(root=data.root, mask_csv=data.mask_csv, image_dir=data.image_dir, size=data.tile_size)
        kind: type[TianchiDataset] | type[ChipDataset] = TianchiDataset
    else:
        common.update(indexes=data.chips)
        kind = ChipDataset
    val = kind(split="val", **common)
    aug = data.augment
    train = kind(split="train", transform=TrainTransform(
        d4=aug.d4, crop=aug.crop, brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation,
        hue=aug.hue, max_value=val.max_value), **common)
    if not len(val):
        raise DatasetError(f"the validation split of {_source(cfg)['path']} is empty: raise data.val_fraction "
                           "or use data.folds")
    if aug.crop is not None and aug.crop > val.size:
        raise ConfigError(f"data.augment.crop={aug.crop} is larger than the {val.size}-pixel tiles")
    return train, val


def _per_rank_batch(cfg: TrainConfig, world: int, n_train: int) -> int:
    batch = cfg.data.batch_size
    if batch % world:
        raise ConfigError(f"data.batch_size={batch} (the global batch) must be a multiple of the {world} processes")
    if n_train < batch:
        raise DatasetError(f"the training split has {n_train} images, fewer than one batch ({batch}); "
                           "add images or lower data.batch_size")
    return batch // world


def _resume_path(cfg: TrainConfig) -> Path | None:
    last = Path(cfg.run.out_dir) / "last.pt"
    if not last.exists():
        return None
    if cfg.run.resume:
        return last
    if cfg.run.overwrite:
        return None
    raise FileExistsError(f"{cfg.run.out_dir} already holds a run (last.pt); set run.resume=true to continue it "
                          "or run.overwrite=true to start afresh")


def _source(cfg: TrainConfig) -> dict[str, Any]:
    paths = [str(cfg.data.root)] if cfg.data.source == "tianchi" else [str(p) for p in cfg.data.chips]
    return {"source": cfg.data.source, "path": paths[0] if len(paths) == 1 else paths}


def _rsseg_version() -> str:
    try:
        return metadata.version("rsseg")
    except metadata.PackageNotFoundError:
        return "unknown"


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and lists (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached], "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Trainer:
    """One process's share of a run: model, optimizer, loaders and the per-epoch bookkeeping."""

    def __init__(self, cfg: TrainConfig, env: _Dist, device: torch.device, train_ds: Dataset, val_ds: Dataset,
                 per_rank: int) -> None:
        self.cfg, self.env, self.device = cfg, env, device
        self.out = Path(cfg.run.out_dir)
        self.bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
        self.memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        self.train_ds, self.val_ds = train_ds, val_ds
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        reserved = {"arch", "encoder", "encoder_weights", "in_channels", "mean", "std"} & set(cfg.model.kwargs)
        if reserved:
            raise ConfigError(f"model.kwargs repeats {sorted(reserved)}: set them in the model section itself")
        kwargs = dict(arch=cfg.model.arch, encoder=cfg.model.encoder, encoder_weights=cfg.model.encoder_weights,
                      in_channels=train_ds.bands, mean=cfg.model.mean, std=cfg.model.std, **cfg.model.kwargs)
        self.module = create_model(**kwargs).to(device, memory_format=self.memory_format)
        self.model_cfg = model_config(self.module, **{k: v for k, v in kwargs.items() if k not in ("mean", "std")})
        self.model = self.module
        if env.world > 1:
            self.model = DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda"
                                                 else None)
        self.criterion = DiceBCELoss(cfg.loss.dice_weight, cfg.loss.bce_weight, cfg.loss.per_image, cfg.loss.smooth)
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else (
            0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 1) // env.world)))
        self.sampler = DistributedSampler(train_ds, num_replicas=env.world, rank=env.rank, shuffle=True,
                                          seed=cfg.data.seed, drop_last=True)
        pin = device.type == "cuda"
        self.loader = DataLoader(train_ds, batch_size=per_rank, sampler=self.sampler, num_workers=workers,
                                 drop_last=True, pin_memory=pin)
        self.val_loader = DataLoader(val_ds, batch_size=cfg.data.val_batch_size, num_workers=workers, pin_memory=pin)
        self.steps_per_epoch = len(self.loader)
        total = self.steps_per_epoch * cfg.run.epochs
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(
            total, round(cfg.optim.warmup_fraction * total), cfg.optim.min_lr_ratio))
        self.epoch, self.step, self.best_dice, self.best_epoch = 0, 0, -1.0, 0
        self.history: list[dict[str, Any]] = []

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def _batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return (image, batch["mask"].to(self.device, non_blocking=True),
                batch["valid"].to(self.device, non_blocking=True))

    def resume(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, counters, history and RNG states from ``path`` (a last.pt)."""
        ckpt = load_checkpoint(path)
        if ckpt["model"] != self.model_cfg:
            raise CheckpointError(f"{path} holds a {ckpt['model'].get('arch')}/{ckpt['model'].get('encoder')} model "
                                  f"unlike this config's {self.model_cfg['arch']}/{self.model_cfg['encoder']} "
                                  "(or other model settings differ); set run.overwrite=true to start afresh")
        self.module.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["train_state"]
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_dice, self.best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        self.history = [dict(r) for r in state["history"]]
        rngs = state["rng"]
        _set_rng_state(rngs[self.env.rank] if len(rngs) == self.env.world else rngs[0])
        if self.env.main:
            log.info("resumed %s at epoch %d, step %d (best Dice %.4f)", path, self.epoch, self.step, self.best_dice)

    def run(self) -> Path:
        """Train until ``run.epochs`` (or ``run.stop_after`` more epochs); returns the best checkpoint's path."""
        run = self.cfg.run
        if self.env.main:
            with atomic_path(self.out / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
            log.info("training %s/%s on %s (%d process(es), %s%s): %d train / %d validation images, %d steps/epoch",
                     self.model_cfg["arch"], self.model_cfg["encoder"], self.device, self.env.world,
                     "bf16" if self.bf16 else "fp32", ", channels_last" if run.channels_last else "",
                     len(self.train_ds), len(self.val_ds), self.steps_per_epoch)
        last = run.epochs if run.stop_after is None else min(run.epochs, self.epoch + run.stop_after)
        while self.epoch < last:
            record = self._train_epoch()
            rngs = [None] * self.env.world
            if self.env.world > 1:
                dist.all_gather_object(rngs, _rng_state())
            else:
                rngs = [_rng_state()]
            if self.env.main:
                record.update(self._validate())
                self._save(record, rngs)
            if self.env.world > 1:
                dist.barrier()
        return self.out / "best.pt"

    def _train_epoch(self) -> dict[str, Any]:
        self.train_ds.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        self.model.train()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss * images, images
        start = time.perf_counter()
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{self.cfg.run.epochs}", unit="batch", leave=False,
                   disable=not (self.env.main and self.cfg.run.progress) or None)
        for i, batch in enumerate(bar):
            image, mask, valid = self._batch(batch)
            with self._autocast():
                logits = self.model(image)
            loss = self.criterion(logits, mask, valid)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            sums += torch.stack([loss.detach().double() * image.shape[0], sums.new_tensor(image.shape[0])])
            if i % 10 == 0:
                bar.set_postfix(loss=f"{float(sums[0] / sums[1]):.4f}")
        if self.env.world > 1:
            dist.all_reduce(sums)
        elapsed = time.perf_counter() - start
        self.epoch += 1
        return {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": float(sums[0] / sums[1].clamp_min(1)), "train_images_per_s": float(sums[1]) / elapsed,
                "train_s": elapsed}

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        self.module.eval()
        scores = ThresholdDice(self.cfg.run.thresholds + [0.5], self.device)
        loss_sum, images, start = 0.0, 0, time.perf_counter()
        for batch in tqdm(self.val_loader, desc="validation", unit="batch", leave=False,
                          disable=not self.cfg.run.progress or None):
            image, mask, valid = self._batch(batch)
            with self._autocast():
                logits = self.module(image)
            loss_sum += float(self.criterion(logits, mask, valid)) * image.shape[0]
            images += image.shape[0]
            scores.update(torch.sigmoid(logits.float()), mask, valid)
        by_threshold = scores.scores()
        chosen = {t: by_threshold[round(t, 6)] for t in self.cfg.run.thresholds}
        threshold = max(chosen, key=lambda t: (chosen[t], -t))
        return {"val_loss": loss_sum / max(images, 1), "val_dice": chosen[threshold], "threshold": threshold,
                "val_dice_at_0.5": by_threshold[0.5], "val_s": time.perf_counter() - start}

    def _save(self, record: dict[str, Any], rngs: list[dict[str, Any]]) -> None:
        improved = record["val_dice"] > self.best_dice
        if improved:
            self.best_dice, self.best_epoch = record["val_dice"], self.epoch
        self.history.append(record)
        val = self.val_ds
        meta = {"epoch": self.epoch, "step": self.step, "val_dice": record["val_dice"],
                "threshold": record["threshold"], "best_dice": self.best_dice, "best_epoch": self.best_epoch,
                "data": _source(self.cfg), "rsseg_version": _rsseg_version(), "in_channels": val.bands,
                "tile_size": val.size, "train_crop": self.cfg.data.augment.crop, "world_size": self.env.world,
                "precision": "bf16" if self.bf16 else "fp32"}
        state = {"epoch": self.epoch, "step": self.step, "best_dice": self.best_dice, "best_epoch": self.best_epoch,
                 "history": self.history, "rng": rngs}
        last = save_checkpoint(self.out / "last.pt", self.module, self.model_cfg, meta,
                               optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                               train_state=state)
        if improved:
            with atomic_path(self.out / "best.pt") as tmp:
                shutil.copyfile(last, tmp)
        write_metrics(self.history, self.out / "metrics.csv")
        write_curves(self.history, self.out / "curves.png")
        log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val Dice %.4f at threshold %.2f (best %.4f, "
                 "epoch %d), %.1f train images/s", self.epoch, self.cfg.run.epochs, record["train_loss"],
                 record["val_loss"], record["val_dice"], record["threshold"], self.best_dice, self.best_epoch,
                 record["train_images_per_s"])


def fit(cfg: TrainConfig) -> Path:
    """Train as configured, in this process (or as one DDP rank under torchrun); returns ``best.pt``'s path.

    Raises:
        ConfigError: a device that is not there, or a batch that does not split across processes.
        DatasetError: missing or wrongly sized images, an empty split.
        FileExistsError: ``run.out_dir`` holds a run and neither ``run.resume`` nor ``run.overwrite`` is set.
    """
    env = _Dist.from_env()
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device, env.local_rank, env.world)
    train_ds, val_ds = build_datasets(cfg)
    per_rank = _per_rank_batch(cfg, env.world, len(train_ds))
    resume_from = _resume_path(cfg)
    if env.world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world)
    try:
        trainer = _Trainer(cfg, env, device, train_ds, val_ds, per_rank)
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


def launch(config: str | os.PathLike[str] | Mapping[str, Any] | TrainConfig, nproc: int = 1,
           overrides: Mapping[str, str] | None = None) -> Path:
    """Train from a config file, mapping or :class:`TrainConfig`; ``nproc > 1`` runs DDP via torchrun.

    With ``nproc > 1`` the config, device and data are checked here first (so bad input fails with one
    message before any worker starts), then ``python -m torch.distributed.run --nproc_per_node N -m
    rsseg.train CONFIG`` runs on a free local port and this call waits for it.

    Returns:
        The path of ``best.pt``.

    Raises:
        PipelineError: a worker process failed (its own message is in the log above).
    """
    if isinstance(config, TrainConfig):
        cfg = load_config(config.model_dump(mode="json"), overrides) if overrides else config
    else:
        cfg = load_config(config, overrides)
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: expected 1 or more processes")
    if nproc == 1:
        return fit(cfg)
    device = resolve_device(cfg.run.device, 0, nproc)
    train_ds, _ = build_datasets(cfg)
    _per_rank_batch(cfg, nproc, len(train_ds))
    _resume_path(cfg)
    env = dict(os.environ)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    with tempfile.TemporaryDirectory(prefix="rsseg-train-") as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "rsseg.train", str(resolved)]
        log.info("starting %d training processes: %s", nproc, " ".join(cmd))
        result = subprocess.run(cmd, env=env, check=False)
    if result.returncode != 0:
        raise PipelineError(f"training with {nproc} processes failed (exit status {result.returncode}); "
                            "the workers' own messages are above")
    return Path(cfg.run.out_dir) / "best.pt"


def main(argv: list[str] | None = None) -> None:
    """Entry point of one training process: ``python -m rsseg.train CONFIG [--set key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m rsseg.train", description=main.__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    rank = _Dist.from_env().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    overrides = dict(item.split("=", 1) for item in args.sets)
    try:
        best = fit(load_config(args.config, overrides))
    except (RssegError, FileNotFoundError, FileExistsError) as exc:
        print(f"rsseg: error (rank {rank}): {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if rank == 0:
        print(best)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's, so that log records are named rsseg.train.
    from rsseg.train import main as _main

    _main()
