"""Where Dask work runs: the current client, a scheduler address, or a LocalCluster of our own."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future
from typing import Any

import dask
from distributed import Client, LocalCluster, default_client, get_worker
from distributed.comm import get_address_host

from rsseg.pipeline.process import available_cores, worker_environ

__all__ = ["dask_client", "dask_executor", "local_cluster", "task_threads", "threads_by_host"]

log = logging.getLogger(__name__)


def _current_client() -> Client | None:
    try:
        return default_client()
    except ValueError:
        return None


@contextlib.contextmanager
def dask_client(scheduler: str | Client | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """Yield a Dask client, closing only what this call started.

    Args:
        scheduler: a :class:`distributed.Client` to use as is, a scheduler address (``tcp://host:8786``),
            or None: the client already current in this process if there is one, else a new
            :class:`~distributed.LocalCluster` of single-threaded worker processes.
        n_workers: workers of a new LocalCluster (default: the number of CPUs).
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
    with local_cluster(workers) as cluster, Client(cluster) as client:
        log.info("started a LocalCluster of %d workers (dashboard %s)", workers, client.dashboard_link)
        yield client


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


def local_cluster(workers: int) -> LocalCluster:
    """A LocalCluster of ``workers`` single-threaded processes, each set up as an entry point.

    Each worker gets its share of this host's cores (:func:`rsseg.pipeline.process.available_cores`) for
    torch, OpenMP and GDAL, glibc's allocator tuning and a passive OpenMP wait policy through its
    environment (:func:`rsseg.pipeline.process.worker_environ`, Dask's ``distributed.nanny.pre-spawn-environ``,
    which replaces Dask's own ``OMP_NUM_THREADS=1`` and 64 KiB heap trim), and runs
    :func:`rsseg.pipeline.process.configure_process` when it starts (the module is a worker preload; a
    separate ``dask worker`` can take ``--preload rsseg.pipeline.process`` too).
    """
    environ = worker_environ(available_cores(workers))
    with _environ(environ), dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                            preload=["rsseg.pipeline.process"])


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
