"""Where Dask work runs: the current client, a scheduler address, or a LocalCluster of our own."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future
from typing import Any

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, default_client, get_worker
from distributed.comm import get_address_host

from rsseg.errors import ConfigError
from rsseg.pipeline.process import available_cores, worker_environ

__all__ = [
    "dask_client", "dask_executor", "gpu_count", "gpu_layout", "local_cluster", "task_threads", "threads_by_host",
]

log = logging.getLogger(__name__)


def _current_client() -> Client | None:
    try:
        return default_client()
    except ValueError:
        return None


@contextlib.contextmanager
def dask_client(scheduler: str | Client | None = None, n_workers: int | None = None,
                gpu_group: int = 1) -> Iterator[Client]:
    """Yield a Dask client, closing only what this call started.

    Args:
        scheduler: a :class:`distributed.Client` to use as is, a scheduler address (``tcp://host:8786``),
            or None: the client already current in this process if there is one, else a new local cluster
            (:func:`local_cluster`: single-threaded worker processes, one per GPU if there are GPUs).
        n_workers: workers of a new local cluster (default: the number of CPUs).
        gpu_group: GPUs of the first GPU worker of a new local cluster (a DDP training's ``nproc``).
    """
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler:
        with Client(scheduler) as client:
            log.info("connected to Dask scheduler %s (dashboard %s)", scheduler, client.dashboard_link)
            yield client
        return
    current = _current_client()
    if current is not None:
        yield current
        return
    workers = n_workers or os.cpu_count() or 1
    with local_cluster(workers, gpu_group=gpu_group) as cluster, Client(cluster) as client:
        log.info("started a local cluster of %d workers (dashboard %s)", len(cluster.worker_spec),
                 client.dashboard_link)
        yield client


def gpu_count() -> int:
    """CUDA devices on this machine: ``RSSEG_FAKE_GPUS`` if set (tests fake a GPU box on a CPU), else torch's count."""
    fake = os.environ.get("RSSEG_FAKE_GPUS", "").strip()
    if fake:
        if not fake.isdigit():
            raise ConfigError(f"RSSEG_FAKE_GPUS={fake!r}: expected a number of GPUs, e.g. 2")
        return int(fake)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_layout(gpus: int, gpu_group: int = 1) -> list[list[int]]:
    """The GPUs of each GPU worker: the first ``gpu_group`` together (for a DDP training), then one each."""
    first = max(1, min(gpu_group, gpus))
    return ([list(range(first))] if gpus else []) + [[i] for i in range(first, gpus)]


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for a block, then restore them (Dask's nanny copies its own over them)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def local_cluster(workers: int, gpus: int | None = None, gpu_group: int = 1, threads: int = 1) -> SpecCluster:
    """A local cluster of worker processes (single-threaded unless ``threads``), each set up as an entry point.

    Each worker gets its share of this host's cores (:func:`rsseg.pipeline.process.available_cores`), divided
    among its ``threads`` Dask threads, for torch, OpenMP and GDAL, glibc's allocator tuning and a passive
    OpenMP wait policy through its environment (:func:`rsseg.pipeline.process.worker_environ`, Dask's
    ``distributed.nanny.pre-spawn-environ``, which replaces Dask's own ``OMP_NUM_THREADS=1`` and 64 KiB heap
    trim), and runs
    :func:`rsseg.pipeline.process.configure_process` when it starts (the module is a worker preload; a
    separate ``dask worker`` can take ``--preload rsseg.pipeline.process`` too).

    On a GPU box (``gpus``, default :func:`gpu_count`) the GPUs are laid out by :func:`gpu_layout`: one worker
    per GPU (``CUDA_VISIBLE_DEVICES`` pinned to it, ``resources={"GPU": 1}``), except that the first holds
    ``gpu_group`` GPUs (``resources={"GPU": gpu_group}``) when a DDP training asks for that many: its task
    then holds all of them, and no other GPU task runs on them meanwhile. The other ``workers`` are CPU
    workers (``CUDA_VISIBLE_DEVICES`` empty); CPU tasks run on any worker. ``threads`` applies to CPU workers:
    work whose tasks release the GIL (tiling's reads, histograms and writes) runs several tasks per process so.
    """
    gpus = gpu_count() if gpus is None else gpus
    layout = gpu_layout(gpus, gpu_group)
    total = len(layout) + max(0, workers - len(layout))
    environ = worker_environ(max(1, available_cores(total) // threads))
    with _environ(environ), dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        if not gpus:
            return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                dashboard_address=":0", preload=["rsseg.pipeline.process"])
        options = {"nthreads": 1, "host": "127.0.0.1", "dashboard_address": ":0",
                   "preload": ["rsseg.pipeline.process"], "silence_logs": logging.ERROR}
        specs = {f"gpu-{i}": {"cls": Nanny, "options": {**options, "resources": {"GPU": len(devices)},
                                                        "env": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}}}
                 for i, devices in enumerate(layout)}
        specs |= {f"cpu-{i}": {"cls": Nanny, "options": {**options, "nthreads": threads,
                                                        "env": {"CUDA_VISIBLE_DEVICES": ""}}}
                  for i in range(total - len(layout))}
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
        return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.ERROR, name="rsseg-gpu-box")


class _OnFirstSubmit(Executor):
    """A Dask client's executor, started when the first block is submitted.

    A stage checks its input first, so bad input fails before a LocalCluster starts.
    """

    def __init__(self, scheduler: str | Client | None, n_workers: int | None, stack: contextlib.ExitStack) -> None:
        self._scheduler, self._n_workers, self._stack = scheduler, n_workers, stack
        self._executor: Executor | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Start the client if this is the first block, then submit ``fn(*args, **kwargs)`` to it."""
        if self._executor is None:
            client = self._stack.enter_context(dask_client(self._scheduler, self._n_workers))
            self._executor = client.get_executor()
        return self._executor.submit(fn, *args, **kwargs)


@contextlib.contextmanager
def dask_executor(scheduler: str | Client | None = None, n_workers: int | None = None) -> Iterator[Executor | None]:
    """The executor a stage's blocks run on from the CLI: None (in this process) for ``"sync"``, else a Dask client's.

    The client starts on the first submitted block and closes on exit.

    Args:
        scheduler: ``"sync"``, or what :func:`dask_client` takes (a client, an address, None for a LocalCluster).
        n_workers: workers of a new LocalCluster.
    """
    if scheduler == "sync":
        yield None
        return
    with contextlib.ExitStack() as stack:
        yield _OnFirstSubmit(scheduler, n_workers, stack)


def threads_by_host(client: Client) -> dict[str, int]:
    """Worker threads the cluster runs on each host (by the host of each worker's address)."""
    counts: dict[str, int] = {}
    for address, nthreads in client.nthreads().items():
        host = get_address_host(address)
        counts[host] = counts.get(host, 0) + nthreads
    return counts


def task_threads(threads_on: Mapping[str, int], tasks: int | None = None) -> int:
    """Threads a task may use for its own parallel work (GDAL decoding, torch): this machine's cores shared out.

    In a Dask worker, the cores this process may run on (affinity and cgroup quota) divided by the worker
    threads on its host (``threads_on``, from :func:`threads_by_host`), at least 1: one worker on a machine uses
    all cores, a worker per core uses one each instead of every worker starting a thread per core. Outside a
    worker, all the cores.

    Args:
        threads_on: worker threads per host.
        tasks: how many such tasks the cluster runs at once, when that may be fewer than its threads (they
            then share a host's cores among fewer); None: at least one per thread.
    """
    cores = available_cores()
    try:
        host = get_address_host(get_worker().address)
    except ValueError:  # not running in a Dask worker
        return cores
    sharing = threads_on.get(host, 1)
    if tasks is not None:  # the host's part of the tasks, spread like the threads
        sharing = min(sharing, max(1, -(-tasks * sharing // (sum(threads_on.values()) or 1))))
    return max(1, cores // sharing)
