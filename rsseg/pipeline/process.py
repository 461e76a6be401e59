"""Process settings for ENTRY POINTS: the allocator, thread counts, OpenMP's wait policy and the GDAL cache.

Library functions never change these (a library call must leave the process as it found it); the places
that own a process call :func:`configure_process` once, as early as possible:

* the ``rsseg`` command (:func:`rsseg.cli.main`), before any command imports torch;
* the workers of the LocalCluster that :mod:`rsseg.pipeline.cluster` starts: their environment comes from
  :func:`worker_environ` (Dask's ``distributed.nanny.pre-spawn-environ``) and each worker calls
  :func:`configure_process` when it starts (a worker plugin);
* the trainer: ``rsseg train`` (also the pipeline's trainer child, ``python -m rsseg.cli train``) is the CLI.
  Processes it starts (torchrun ranks, DataLoader workers) inherit the settings through the environment
  exported here (allocator tunables, ``OMP_WAIT_POLICY``, ``GDAL_CACHEMAX``, ``OMP_NUM_THREADS``); a rank that
  shares the host with others sizes its threads with ``configure_process(threads=cfg.run.threads,
  tasks=local_world_size)`` in an entry outside the stage packages (which never import ``rsseg.pipeline``),
  or its launcher sets ``OMP_NUM_THREADS`` to the share.

What it sets, and why:

* **Allocator** (:func:`retain_freed_memory`): a forward pass on the CPU allocates and frees activations of
  tens to hundreds of megabytes per batch. glibc serves every block above its mmap threshold (at most 32 MB)
  with a fresh ``mmap`` and unmaps it on free, so each batch pays page faults to zero the same memory again;
  Dask workers make it worse by trimming the heap above 64 KiB (their ``MALLOC_TRIM_THRESHOLD_=65536``).
  Measured on the 2-core development machine with the demo's MobileNetV2 U-Net: a batch of 8 windows of
  512x512 in bf16 took 0.69 s instead of 1.17 s on one thread (0.38 s instead of 0.69 s on two), and a
  training step under Dask's setting 0.49 s instead of 0.89 s. glibc then keeps freed memory in the process
  for reuse, which is what jemalloc or tcmalloc (recommended by PyTorch's CPU tuning guide) would do.
* **Threads** (:func:`available_cores`): torch, OpenMP and GDAL get the cores this process really has: its
  affinity mask, capped by the cgroup CPU quota (containers), divided among the tasks sharing the host. On
  a 2-core host with another process keeping one core busy, ``rsseg train`` ran at 0.9 images/s with
  torch's default 2 threads and at 7.7 images/s on the free core alone.
* **Passive OpenMP waiting** (``OMP_WAIT_POLICY=PASSIVE``): idle OpenMP threads sleep instead of spinning
  against other work (the reader and writer threads, other processes). OpenMP reads it when it loads,
  i.e. when torch is first imported: it takes effect only where :func:`configure_process` runs first.
* **GDAL cache** (``GDAL_CACHEMAX``, :data:`rsseg.fileio.GDAL_CACHEMAX_MB` by default): process-wide in GDAL.

Explicit environment variables (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``GDAL_CACHEMAX``) win over
these defaults, so a user can still override each.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from rsseg.cores import available_cores, cpu_quota, usable_cores
from rsseg.fileio import GDAL_CACHEMAX_MB

__all__ = [
    "ProcessSettings",
    "available_cores",
    "configure_process",
    "cpu_quota",
    "retain_freed_memory",
    "torch_threads",
    "usable_cores",
    "worker_environ",
]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ProcessSettings:
    """What :func:`configure_process` applied."""

    threads: int
    allocator: bool
    passive_wait: bool
    gdal_cache_mb: int


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc reuse freed memory: no ``mmap`` per large block, no trimming of the heap. Idempotent.

    Irreversible for the process, which keeps the memory of its largest working set until it exits: entry
    points only (:func:`configure_process`).

    Returns:
        True where applied (Linux with glibc); False elsewhere, where nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    log.debug("glibc keeps freed memory for reuse: %s", applied)
    return applied


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def worker_environ(threads: int) -> dict[str, str]:
    """Environment of a worker process that will use ``threads`` threads (Dask's ``pre-spawn-environ``).

    glibc reads the ``MALLOC_*`` tunables at start, so the worker's allocator is set before any task runs.
    """
    return {
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "GDAL_CACHEMAX": os.environ.get("GDAL_CACHEMAX", str(GDAL_CACHEMAX_MB)),
        "GDAL_NUM_THREADS": str(threads),
        **{name: str(threads) for name in THREAD_VARIABLES},
    }


def configure_process(threads: int | None = None, tasks: int | None = None) -> ProcessSettings:
    """Apply the entry-point settings of the module docstring to this process. Idempotent; entry points only.

    Args:
        threads: torch/OpenMP/GDAL threads; None: :func:`available_cores` for ``tasks``, or without ``tasks``
            ``OMP_NUM_THREADS`` where set (a user's choice, or a parent's: Dask workers get their share so).
        tasks: processes or tasks sharing this host's cores (e.g. the local ranks of a torchrun job). It
            overrides an inherited ``OMP_NUM_THREADS``, which a parent that ran this function sized for itself.
    """
    threads = threads or (available_cores(tasks) if tasks else _env_threads() or available_cores())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    passive = os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE" and "torch" not in sys.modules
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)  # for torch when it is imported later, and for child processes
    allocator = retain_freed_memory()
    if allocator:  # child processes (torchrun ranks, a trainer child) start with the same allocator settings
        os.environ.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM)})
    os.environ["GDAL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHEMAX_MB))
    cache_mb = int(os.environ["GDAL_CACHEMAX"]) if os.environ["GDAL_CACHEMAX"].isdigit() else GDAL_CACHEMAX_MB
    if "rasterio" in sys.modules:  # GDAL already loaded: it may have read the cache size already
        from rasterio.env import set_gdal_config

        set_gdal_config("GDAL_CACHEMAX", cache_mb << 20)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    settings = ProcessSettings(threads, allocator, passive, cache_mb)
    log.debug("process settings: %s", settings)
    return settings


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run a block of work (e.g. one Dask task) with torch on ``threads`` intra-op threads, then restore them.

    For the side that starts a task (:mod:`rsseg.pipeline.stages`), never inside the library.
    """
    import torch

    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def dask_setup(worker: object) -> None:
    """Dask's preload hook (``--preload rsseg.pipeline.process``): a worker process is an entry point too."""
    configure_process()
