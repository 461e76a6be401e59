"""What a stage runs with: its parameters' base model, its context (client, output folder, tasks), its kind.

Kept apart from the stage kinds themselves (:mod:`rsseg.pipeline.stages`) so the runner and every stage
share one definition of the plumbing.
"""

from __future__ import annotations

import glob
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client, Future
from pydantic import BaseModel, ConfigDict

from rsseg.errors import ConfigError, PipelineError

__all__ = [
    "Params", "StageContext", "StageKind", "check_devices", "expand_chip_folders", "gpus_by_worker",
    "stage_devices", "workers_with_gpu",
]


class Params(BaseModel):
    """Base of every stage's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def gpus_by_worker(client: Client) -> dict[str, float]:
    """The ``GPU`` resource of each worker that offers one (``dask worker --resources GPU=1``), by address."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    offered = {a: (w.get("resources") or {}).get("GPU", 0) for a, w in workers.items()}
    return {a: n for a, n in sorted(offered.items()) if n > 0}


def workers_with_gpu(client: Client) -> list[str]:
    """Addresses of the workers that offer a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    return list(gpus_by_worker(client))


@dataclass
class StageContext:
    """What a running stage may use: the Dask client, its output folder, task retries and the cluster's GPUs.

    Work goes through :meth:`submit` (one task) or :meth:`executor` (a library call's blocks), so that
    :meth:`cancel` stops this stage's tasks and nothing else on the client.
    """

    name: str
    client: Client
    out_dir: Path
    retries: int = 1
    gpu_workers: bool | list[str] = False
    task_keys: list[str] = field(default_factory=list)
    failed_task: str | None = None
    futures: list[Future] = field(default_factory=list)
    executors: list[Executor] = field(default_factory=list)
    cancelled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _check_running(self) -> None:
        if self.cancelled:
            raise PipelineError(f"stage {self.name} was cancelled: another stage of its run failed")

    def wants_gpu(self, device: str) -> bool:
        """Whether a task for ``device`` asks for a ``GPU`` resource.

        ``cuda``/``cuda:N`` do; ``auto`` does when the cluster has GPU workers (the task then lands on one and
        resolves ``auto`` there); ``cpu`` never does. :func:`check_devices` refuses
        ``cuda`` on a cluster without GPU workers before anything is submitted.
        """
        return device.startswith("cuda") or (device == "auto" and bool(self.gpu_workers))

    def submit(self, fn: Callable[..., Any], *args: Any, gpu: bool | int = False, label: str = "",
               **kwargs: Any) -> Future:
        """Submit one task of this stage (named after it, retried, holding ``gpu`` GPUs: ``True`` is one)."""
        with self._lock:
            self._check_running()
            key = f"{self.name}-{label or fn.__name__}-{len(self.task_keys)}"
            self.task_keys.append(key)
            fut = self.client.submit(fn, *args, key=key, retries=self.retries, pure=False,
                                     resources={"GPU": int(gpu)} if gpu else None, **kwargs)
            self.futures.append(fut)
        return fut

    def executor(self, gpu: bool = False) -> Executor:
        """A ``concurrent.futures`` executor on the client for a library call's blocks (tracked for :meth:`cancel`)."""
        extra = {"resources": {"GPU": 1}} if gpu else {}
        with self._lock:
            self._check_running()
            executor = self.client.get_executor(retries=self.retries, pure=False, **extra)
            self.executors.append(executor)
        return executor

    def cancel(self) -> None:
        """Cancel this stage's tasks (those of :meth:`submit` and :meth:`executor`), leaving the client's others.

        Later calls of :meth:`submit` and :meth:`executor` raise, so a stage that had not submitted yet stops too.
        """
        with self._lock:
            self.cancelled = True
            for executor in self.executors:
                executor.shutdown(wait=False)
            if self.futures:
                self.client.cancel(self.futures)

    def gather(self, futures: list[Future]) -> list[Any]:
        """Results of ``futures``; a failure is re-raised with the failed task kept in :attr:`failed_task`."""
        results = []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception:
                self.failed_task = fut.key
                raise
        return results


@dataclass(frozen=True)
class StageKind:
    """A kind of stage: its name in YAML, its parameters and the function that runs it."""

    name: str
    params: type[Params]
    run: Callable[[Any, StageContext], dict[str, Any]]
    #: The stage continues a crashed attempt: its in-progress folder (``WORKDIR/.<stage>.<fp12>.partial``)
    #: survives a failure or a kill, and the next run with the same fingerprint works on in it (``train``).
    resumable: bool = False
    #: Its work uses every core of the machine (a trainer process): on the CPU, the runner starts such a stage
    #: only when no other one runs (on GPU workers they run side by side, one per free GPU).
    exclusive_on_cpu: bool = False


def expand_chip_folders(entries: list[str | Path]) -> list[Path]:
    """Chip folders (each holding the ``index.csv`` of ``rsseg tile``) from folders, index files and globs.

    Each entry is a chip folder, an ``index.csv``, a folder of chip folders (the ``tile`` stage writes one
    per scene: ``chips/<stem>/index.csv``) or a glob of any of these; the result lists each chip folder
    (or index file) once, sorted within an entry.

    Raises:
        ConfigError: an entry that matches nothing, or a folder without any ``index.csv`` in it or one below.
    """
    found: list[Path] = []
    for entry in entries:
        text = str(entry)
        matches = sorted(Path(p) for p in glob.glob(text)) if set("*?[") & set(text) else [Path(entry)]
        if not matches or not matches[0].exists():
            raise ConfigError(f"data.chips: {text} does not exist; expected a chip folder written by "
                              "`rsseg tile`, an index.csv, a folder of chip folders or a glob")
        for path in matches:
            if path.is_file() or (path / "index.csv").exists():
                found.append(path)
                continue
            below = sorted(p.parent for p in path.glob("*/index.csv"))
            if not below:
                raise ConfigError(f"data.chips: {path} holds no index.csv, neither itself nor in a subfolder; "
                                  "expected a folder written by `rsseg tile` or the tile stage")
            found += below
    return list(dict.fromkeys(found))


def _devices(params: Any) -> set[str]:
    """Every ``device`` value in a stage's parameters (training configs included)."""
    found: set[str] = set()
    if isinstance(params, dict):
        for key, value in params.items():
            if key == "device" and isinstance(value, str):
                found.add(value)
            else:
                found |= _devices(value)
    elif isinstance(params, list):
        for value in params:
            found |= _devices(value)
    return found


def stage_devices(stage: Any) -> set[str]:
    """Every device a stage's parameters name (``device`` keys, and a training config's ``run.device``)."""
    config = stage.params.train_config(Path(".")) if hasattr(stage.params, "train_config") else None
    return _devices(stage.params.model_dump(mode="json")) | ({config.run.device} if config else set())


def check_devices(stages: list[Any], client: Client) -> None:
    """Refuse, before anything is submitted, stages that would wait for ever for GPUs no worker offers.

    Raises:
        ConfigError: a stage's device is ``cuda`` (or ``cuda:N``) and no worker offers a ``GPU`` resource, or a
            training's ``nproc`` exceeds the GPUs of every worker (its one task holds ``nproc`` GPUs).
    """
    most = max(gpus_by_worker(client).values(), default=0)
    for st in stages:
        devices = stage_devices(st)
        cuda = sorted(d for d in devices if d.startswith("cuda"))
        nproc = getattr(st.params, "nproc", 1)
        if most and nproc > most and hasattr(st.params, "train_config") and devices != {"cpu"}:
            raise ConfigError(
                f"stage {st.name}: nproc={nproc} holds {nproc} GPUs in one task, but the largest Dask worker offers "
                f"{most:g}; start one with CUDA_VISIBLE_DEVICES listing {nproc} GPUs and `dask worker ... "
                f"--resources GPU={nproc}` (rsseg's own local cluster does so by itself), or lower nproc")
        if cuda and not most:
            raise ConfigError(
                f"stage {st.name}: device={cuda[0]} but no Dask worker offers a GPU resource; start GPU workers "
                "with `dask worker tcp://SCHEDULER:8786 --resources GPU=1` (one per GPU) and pass --scheduler "
                "tcp://SCHEDULER:8786, or use --set device=auto (the worker decides) or device=cpu")
