"""One process's share of a training run: model, optimizer, schedule, loaders, epochs and checkpoints.

:class:`Trainer` is what :func:`rsseg.training.launch.fit` drives, in a single process or as one DDP rank (its
:class:`Rank`). Rank 0 alone validates and writes, and after the last epoch tunes ``best.pt`` as prediction will
run it (:mod:`rsseg.training.tuning`); every rank's RNG state goes into ``last.pt`` so that a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from rsseg.errors import CheckpointError, ConfigError
from rsseg.fileio import atomic_path
from rsseg.models import create_model, load_checkpoint, load_weights, model_config, model_name, save_checkpoint
from rsseg.training import devices
from rsseg.training.bandstats import normalisation
from rsseg.training.config import TrainConfig
from rsseg.training.losses import DiceBCELoss
from rsseg.training.report import write_curves, write_metrics
from rsseg.training.splits import write_split
from rsseg.training.tuning import score_validation, tune_run, tuning_done

__all__ = ["Rank", "Trainer", "WarmupCosine", "data_source"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rank:
    """This process's place in a run: global rank, rank on this machine, processes in all and on this machine."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that logs, validates and writes."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Rank:
        """The rank torchrun gave this process (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), or a single one.

        Without LOCAL_WORLD_SIZE (launchers other than torchrun) this process is alone on its machine.
        """
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]),
                   int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


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


def data_source(cfg: TrainConfig) -> dict[str, Any]:
    """Where a run's data comes from, for checkpoints' meta: ``{"source": ..., "path": ...}``."""
    if cfg.data.source == "images":
        return {"source": "images", "path": str(cfg.data.images), "masks": str(cfg.data.masks)}
    paths = [str(cfg.data.root)] if cfg.data.source == "tianchi" else [str(p) for p in cfg.data.chips]
    return {"source": cfg.data.source, "path": paths[0] if len(paths) == 1 else paths}


def _rsseg_version() -> str:
    try:
        return metadata.version("rsseg")
    except metadata.PackageNotFoundError:
        return "unknown"


def _initial_rng(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The states of a run's own RNG streams (CPU, and the GPU's where it trains on one) seeded with ``seed``."""
    state = {"torch": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return state


class Trainer:
    """One process's share of a run: model, optimizer, loaders and the per-epoch bookkeeping.

    Args:
        cfg: the run's configuration.
        env: this process's rank (``Rank()`` for a single process; the process group must be up for more).
        device: where the model runs.
        train_ds: the training dataset (with ``set_epoch``); ``bands`` gives the model's input channels.
        val_ds: the validation dataset (whole images); ``size`` is recorded as the checkpoint's ``tile_size``.
        per_rank: this rank's batch size (the global batch divided by the number of processes).
    """

    def __init__(self, cfg: TrainConfig, env: Rank, device: torch.device, train_ds: Dataset, val_ds: Dataset,
                 per_rank: int) -> None:
        self.cfg, self.env, self.device = cfg, env, device
        self.out = Path(cfg.run.out_dir)
        self.precision = devices.choose_precision(cfg.run.precision, devices.device_facts(device))
        # fp16 needs loss scaling (its range is small); a disabled scaler passes losses and steps through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        self.train_ds, self.val_ds = train_ds, val_ds
        self.rng = _initial_rng(cfg.run.seed, device)
        reserved = {"arch", "encoder", "encoder_weights", "in_channels", "mean", "std"} & set(cfg.model.kwargs)
        if reserved:
            raise ConfigError(f"model.kwargs repeats {sorted(reserved)}: set them in the model section itself")
        mean, std = self._normalisation(train_ds)
        kwargs = dict(arch=cfg.model.arch, encoder=cfg.model.encoder, encoder_weights=cfg.model.encoder_weights,
                      in_channels=train_ds.bands, mean=mean, std=std, **cfg.model.kwargs)
        with self.session():
            self.module = create_model(**kwargs)
        if cfg.model.init:
            load_weights(self.module, cfg.model.init)
            log.info("starting from the weights of %s", cfg.model.init)
        self.module = self.module.to(device, memory_format=self.memory_format)
        self.model_cfg = model_config(self.module, **{k: v for k, v in kwargs.items() if k not in ("mean", "std")})
        self.sync_bn = devices.sync_batchnorm(cfg.run.sync_batchnorm, device, env.world, per_rank)
        if self.sync_bn:
            self.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.model = self.module
        if env.world > 1:
            self.model = DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda"
                                                 else None)
        self.model = devices.compile_model(self.model, cfg.run.compile, device)
        if devices.uint8_batches(device, (train_ds, val_ds)):  # before any DataLoader worker starts
            train_ds.uint8_items = val_ds.uint8_items = True
        self.criterion = DiceBCELoss(cfg.loss.dice_weight, cfg.loss.bce_weight, cfg.loss.per_image, cfg.loss.smooth)
        self._loaders(per_rank)
        self.accumulate = cfg.optim.accumulate
        self.steps_per_epoch = len(self.loader) // self.accumulate  # optimizer steps; a remainder is left out
        total = self.steps_per_epoch * cfg.run.epochs
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(
            total, round(cfg.optim.warmup_fraction * total), cfg.optim.min_lr_ratio))
        self.epoch, self.step, self.best_dice, self.best_epoch = 0, 0, -1.0, 0
        self.history: list[dict[str, Any]] = []

    def _normalisation(self, train_ds: Dataset) -> tuple[list[float] | None, list[float] | None]:
        """``model.mean/std`` where the config sets them, else the training data's band statistics.

        Sources without statistics (Tianchi JPGs) give None: the model's default.
        """
        self.band_stats = getattr(train_ds, "band_stats", None)
        mean, std = self.cfg.model.mean, self.cfg.model.std
        if self.band_stats is not None and (mean is None or std is None):
            stats_mean, stats_std = normalisation(self.band_stats)
            mean, std = mean if mean is not None else stats_mean, std if std is not None else stats_std
        return mean, std

    def data_meta(self) -> dict[str, Any]:
        """What inference needs to know of the training data: source bands, band statistics, GSD in metres."""
        return {"bands": getattr(self.train_ds, "source_bands", None), "band_stats": self.band_stats,
                "gsd_m": getattr(self.train_ds, "gsd", None)}

    def _loaders(self, per_rank: int) -> None:
        """The training loader (this rank's shard, ``per_rank`` images a batch) and the validation loader."""
        cfg, device, env = self.cfg, self.device, self.env
        workers = devices.loader_workers(cfg.data.num_workers, device, env.local_world)
        if workers and multiprocessing.current_process().daemon:  # e.g. a Dask worker: no child processes
            log.warning("data.num_workers=%d ignored: this process is a daemon and cannot start workers", workers)
            workers = 0
        self.sampler = DistributedSampler(self.train_ds, num_replicas=env.world, rank=env.rank, shuffle=True,
                                          seed=cfg.data.seed, drop_last=True)
        pin = device.type == "cuda"
        # Loaders draw their workers' base seed from these generators, not from torch's global RNG.
        self.loader_rng = torch.Generator()
        # Persistent workers live across epochs (the datasets share their epoch with them: set_epoch reaches them).
        self.loader = DataLoader(self.train_ds, batch_size=per_rank, sampler=self.sampler, num_workers=workers,
                                 drop_last=True, pin_memory=pin, generator=self.loader_rng,
                                 persistent_workers=workers > 0)
        self.val_loader = DataLoader(self.val_ds, batch_size=cfg.data.val_batch_size, num_workers=workers,
                                     pin_memory=pin, generator=torch.Generator().manual_seed(cfg.run.seed),
                                     persistent_workers=workers > 0)

    @contextmanager
    def session(self) -> Iterator[None]:
        """Run with this run's own RNG streams (model init, dropout) and cuDNN autotuning in effect.

        Torch's global RNG state and ``cudnn.benchmark`` are the caller's again on exit: a run is reproducible
        from ``run.seed`` and a resumed run continues its streams, without seeding the process.
        """
        cuda = self.device.type == "cuda"
        benchmark = torch.backends.cudnn.benchmark
        with torch.random.fork_rng(devices=[self.device.index or 0] if cuda else []):
            torch.set_rng_state(self.rng["torch"])
            if cuda:
                torch.cuda.set_rng_state(self.rng["cuda"], self.device)
                torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
            try:
                yield
            finally:
                self.rng = {"torch": torch.get_rng_state()}
                if cuda:
                    self.rng["cuda"] = torch.cuda.get_rng_state(self.device)
                torch.backends.cudnn.benchmark = benchmark

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def _batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return (image, batch["mask"].to(self.device, non_blocking=True).float(),  # uint8 items: 0/1 -> float
                batch["valid"].to(self.device, non_blocking=True).float())

    def resume(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, counters, history and RNG states from ``path`` (a last.pt)."""
        ckpt = load_checkpoint(path)
        if ckpt["model"] != self.model_cfg:
            raise CheckpointError(f"{path} holds a {model_name(ckpt['model'])} model unlike this config's "
                                  f"{model_name(self.model_cfg)} (or other model settings differ); set "
                                  "run.overwrite=true to start afresh")
        self.module.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        schedule = self.scheduler.lr_lambdas[0]
        wanted = dict(vars(schedule))  # this config's: LambdaLR's state would bring back the old run's length
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if vars(schedule) != wanted:  # e.g. run.epochs raised: anneal over the new total from this step on
            log.info("learning-rate schedule %s -> %s from step %d", vars(schedule), wanted,
                     self.scheduler.last_epoch)
            vars(schedule).update(wanted)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["lr"] = base * schedule(self.scheduler.last_epoch)
        state = ckpt["train_state"]
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_dice, self.best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        self.history = [dict(r) for r in state["history"]]
        if "scaler" in ckpt and self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.rng.update(devices.saved_rng(state["rng"], self.env.rank, self.env.world, self.device))
        if self.env.main:
            log.info("resumed %s at epoch %d, step %d (best Dice %.4f)", path, self.epoch, self.step, self.best_dice)

    def run(self) -> Path:
        """Train until ``run.epochs`` (or ``run.stop_after`` more epochs), then :meth:`tune`; returns best.pt's path."""
        run = self.cfg.run
        if self.env.main:
            with atomic_path(self.out / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
            write_split(getattr(self.train_ds, "sides", {}), self.out / "split.csv")
            log.info("training %s on %s (%d process(es), %s%s): %d train / %d validation images, %d steps/epoch",
                     model_name(self.model_cfg), self.device, self.env.world,
                     self.precision, ", channels_last" if run.channels_last else "",
                     len(self.train_ds), len(self.val_ds), self.steps_per_epoch)
        last = run.epochs if run.stop_after is None else min(run.epochs, self.epoch + run.stop_after)
        while self.epoch < last:
            record = self.train_epoch()
            rngs: list[Any] = [None] * self.env.world
            if self.env.world > 1:
                dist.all_gather_object(rngs, self.rng)
            else:
                rngs = [dict(self.rng)]
            if self.env.main:
                with self.session():  # cuDNN autotuning for validation too; it draws no random numbers
                    record.update(self.validate())
                self._save(record, rngs)
            if self.env.world > 1:
                dist.barrier()
        if self.epoch >= run.epochs:  # complete: tune best.pt as prediction will run it (the others wait)
            if self.env.main:
                self.tune()
            if self.env.world > 1:
                dist.barrier()
        return self.out / "best.pt"

    def train_epoch(self) -> dict[str, Any]:
        """One pass over this rank's shard of the training split; returns the epoch's training record."""
        self.train_ds.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        self.loader_rng.manual_seed(self.cfg.run.seed + self.epoch)
        self.model.train()
        start = time.perf_counter()
        with self.session():
            sums = self._train_steps()
        if self.env.world > 1:
            dist.all_reduce(sums)
        elapsed = time.perf_counter() - start
        self.epoch += 1
        return {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": float(sums[0] / sums[1].clamp_min(1)), "train_images_per_s": float(sums[1]) / elapsed,
                "train_s": elapsed}

    def _train_steps(self) -> torch.Tensor:
        """The steps of one epoch; returns this rank's (sum of loss * images, images).

        With ``optim.accumulate: K`` each optimizer step sums the gradients of K batches (each loss divided
        by K; DDP synchronises only the last one's), so K batches of B images step as one batch of K * B.
        """
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        k = self.accumulate
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{self.cfg.run.epochs}", unit="batch", leave=False,
                   total=self.steps_per_epoch * k, disable=not (self.env.main and self.cfg.run.progress) or None)
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            if i == self.steps_per_epoch * k:
                break
            image, mask, valid = self._batch(batch)
            last = (i + 1) % k == 0
            with nullcontext() if last or self.env.world == 1 else self.model.no_sync():
                with self._autocast():
                    logits = self.model(image)
                loss = self.criterion(logits, mask, valid)
                self.scaler.scale(loss / k if k > 1 else loss).backward()
            if last:
                self._optimizer_step()
            sums += torch.stack([loss.detach().double() * image.shape[0], sums.new_tensor(image.shape[0])])
            if i % 10 == 0:
                bar.set_postfix(loss=f"{float(sums[0] / sums[1]):.4f}")
        return sums

    def _optimizer_step(self) -> None:
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _progress(self, loader: DataLoader, desc: str) -> Any:
        return tqdm(loader, desc=desc, unit="batch", leave=False, disable=not self.cfg.run.progress or None)

    def validate(self) -> dict[str, Any]:
        """Validation loss and mean per-image Dice per threshold on whole images (rank 0, unwrapped model)."""
        run = self.cfg.run
        batches = map(self._batch, self._progress(self.val_loader, "validation"))
        return score_validation(self.module, batches, self.criterion, self._autocast, run.thresholds, run.min_pixels,
                                self.device)

    def tune(self) -> None:
        """Tune ``best.pt``'s threshold and ``min_pixels`` with ``run.tune_tta`` in the training precision, once."""
        run = self.cfg.run
        settings = (run.tune_tta, self.precision, run.thresholds, run.min_pixels)
        if tuning_done(self.out, *settings, run.keep_val_probs):
            return
        bar = self._progress(self.val_loader, f"tuning ({run.tune_tta})")
        with self.session():  # the model is built with the run's RNG streams, not the caller's
            tune_run(self.out, ((b["image"], b["mask"], b["valid"]) for b in bar), self.val_ds.item_names,
                     self.device, *settings, max_views=self.cfg.data.val_batch_size, keep_probs=run.keep_val_probs)

    def _save(self, record: dict[str, Any], rngs: list[dict[str, Any]]) -> None:
        improved = record["val_dice"] > self.best_dice
        if improved:
            self.best_dice, self.best_epoch = record["val_dice"], self.epoch
        self.history.append(record)
        val = self.val_ds
        meta = {"epoch": self.epoch, "step": self.step, "val_dice": record["val_dice"],
                "threshold": record["threshold"], "min_pixels": record["min_pixels"], "best_dice": self.best_dice,
                "best_epoch": self.best_epoch, "data": data_source(self.cfg), "rsseg_version": _rsseg_version(),
                "in_channels": val.bands,
                "tile_size": val.size, "train_crop": self.cfg.data.augment.crop, "world_size": self.env.world,
                "precision": self.precision, **self.data_meta()}
        state = {"epoch": self.epoch, "step": self.step, "best_dice": self.best_dice, "best_epoch": self.best_epoch,
                 "history": self.history, "rng": rngs}
        last = save_checkpoint(self.out / "last.pt", self.module, self.model_cfg, meta,
                               optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                               scaler=self.scaler.state_dict(),
                               train_state=state)
        if improved:
            with atomic_path(self.out / "best.pt") as tmp:
                shutil.copyfile(last, tmp)
        write_metrics(self.history, self.out / "metrics.csv")
        write_curves(self.history, self.out / "curves.png")
        log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val Dice %.4f at threshold %.2f, min_pixels %d "
                 "(best %.4f, epoch %d), %.1f train images/s", self.epoch, self.cfg.run.epochs, record["train_loss"],
                 record["val_loss"], record["val_dice"], record["threshold"], record["min_pixels"], self.best_dice,
                 self.best_epoch, record["train_images_per_s"])
