"""The CPU cores a process has: its affinity mask, capped by the cgroup CPU quota (containers).

Shared by the pipeline (thread counts of entry points and Dask workers) and training (DataLoader workers,
torchrun children's threads); stages may not import :mod:`rsseg.pipeline`, so it lives here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cores", "cpu_quota", "usable_cores"]


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one, else all; at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), or None without a quota (cgroup v2 ``cpu.max``, else v1)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores(tasks: int | None = None) -> int:
    """Cores for one of ``tasks`` processes or tasks sharing this host; at least 1.

    The affinity mask (:func:`usable_cores`), capped by the cgroup quota (:func:`cpu_quota`, rounded up),
    divided by ``tasks``.
    """
    cores = usable_cores()
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores // max(1, tasks or 1))
