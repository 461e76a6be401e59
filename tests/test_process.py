"""Entry-point process settings (rsseg.pipeline.process): glibc keeps freed memory for reuse, threads sized to
the cores a process has, OpenMP waits passively; checked in fresh processes where they are process-wide."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsseg import cores
from rsseg.pipeline.process import available_cores, cpu_quota, torch_threads, worker_environ

PROBE = """
from probes import fresh_block_faults
from rsseg.pipeline.process import retain_freed_memory

fresh_block_faults()
default = fresh_block_faults()
applied = retain_freed_memory()
fresh_block_faults()
print(applied, default, fresh_block_faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults, not a parent's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    applied, default, retained = done.stdout.split()
    assert applied == "True"
    assert int(default) > 10_000  # 64 MiB of 4 KiB pages, faulted in on every allocation by default
    assert int(retained) < 100  # served from the kept heap


THREADS_PROBE = """
import json, os, sys
from rsseg.pipeline.process import configure_process
threads, tasks = (int(a) if a != "-" else None for a in (sys.argv[1:] + ["-", "-"])[:2])
settings = configure_process(threads, tasks)
import torch  # after the entry point's settings, as in `rsseg`
print(json.dumps({"set": settings.threads, "torch": torch.get_num_threads(), "passive": settings.passive_wait,
                  "cores": len(os.sched_getaffinity(0))}))
"""


def _probe(*args: str, **environ: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "OPENBLAS_", "GDAL_"))}
    env.update(environ)
    done = subprocess.run([sys.executable, "-c", THREADS_PROBE, *args], capture_output=True, text=True, check=True,
                          env=env)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="affinity masks")
def test_configure_process_sets_a_share_or_every_core() -> None:
    one = _probe("1")
    assert one["set"] == 1 and one["torch"] == 1
    every = _probe()
    cores = min(every["cores"], max(1, math.ceil(cpu_quota() or every["cores"])))
    assert every["set"] == cores and every["torch"] == cores
    assert every["passive"]  # torch was not imported yet: OpenMP waits passively
    assert _probe(OMP_NUM_THREADS="3")["set"] == 3  # a user's (or a Dask nanny's) choice wins
    shared = _probe("-", "2", OMP_NUM_THREADS="3")  # ranks sharing the host: their share, not the parent's
    assert shared["set"] == shared["torch"] == max(1, cores // 2)


def test_available_cores_divides_among_tasks_and_respects_the_quota(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cores, "usable_cores", lambda: 8)
    monkeypatch.setattr(cores, "cpu_quota", lambda: None)
    assert available_cores() == 8 and available_cores(3) == 2 and available_cores(16) == 1
    monkeypatch.setattr(cores, "cpu_quota", lambda: 1.5)
    assert available_cores() == 2 and available_cores(2) == 1


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path) is None
    assert cpu_quota(tmp_path / "missing") is None


def test_torch_threads_sets_and_restores() -> None:
    import torch

    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_worker_environ_replaces_dasks_single_thread_and_heap_trim() -> None:
    env = worker_environ(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["GDAL_NUM_THREADS"] == "3"
    assert env["MALLOC_MMAP_MAX_"] == "0" and int(env["MALLOC_TRIM_THRESHOLD_"]) == 2**31 - 1
    assert env["OMP_WAIT_POLICY"] in ("PASSIVE", os.environ.get("OMP_WAIT_POLICY"))


def _worker_state() -> dict:
    import torch
    from probes import fresh_block_faults
    from rasterio.env import get_gdal_config

    fresh_block_faults()  # the first block of a process is fresh under any setting
    return {"torch": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY"),
            "gdal_cache": get_gdal_config("GDAL_CACHEMAX"), "faults": fresh_block_faults()}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_local_cluster_workers_are_set_up_as_entry_points() -> None:
    from rsseg.pipeline.cluster import dask_client

    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "MALLOC_TRIM_THRESHOLD_", "GDAL_NUM_THREADS")
    before = {k: os.environ.get(k) for k in names}
    with dask_client(n_workers=2) as client:
        states = list(client.run(_worker_state).values())
        assert {k: os.environ.get(k) for k in names} == before  # this process keeps its own settings
    assert len(states) == 2
    for state in states:
        assert state["torch"] == available_cores(2)
        assert state["wait"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        assert state["gdal_cache"] == 64 << 20
        assert state["faults"] < 100
