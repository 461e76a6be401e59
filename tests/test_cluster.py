"""Where the work runs: rsseg's own local cluster on a GPU box (faked on a CPU with ``RSSEG_FAKE_GPUS``).

Fast tier: the layout of GPU workers, their resources and environment, GPU-annotated tasks, a DDP training's
worker holding all its GPUs, and the device check of ``nproc``.
"""

import os
import time
from pathlib import Path

import pytest

from rsseg.errors import ConfigError
from rsseg.pipeline.cluster import dask_client, gpu_count, gpu_layout


def _visible() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _wait_policy() -> str | None:
    return os.environ.get("OMP_WAIT_POLICY")


def _held(seconds: float) -> tuple[str | None, float, float]:
    start = time.time()
    time.sleep(seconds)
    return _visible(), start, time.time()


def test_gpu_layout_and_fake_count(monkeypatch) -> None:
    assert gpu_layout(0) == [] and gpu_layout(2) == [[0], [1]] and gpu_layout(4, 2) == [[0, 1], [2], [3]]
    assert gpu_layout(2, 8) == [[0, 1]]  # never more than there are
    monkeypatch.setenv("RSSEG_FAKE_GPUS", "3")
    assert gpu_count() == 3
    monkeypatch.setenv("RSSEG_FAKE_GPUS", "two")
    with pytest.raises(ConfigError, match="RSSEG_FAKE_GPUS='two': expected a number"):
        gpu_count()


def test_gpu_box_gets_a_worker_per_gpu_plus_cpu_workers(monkeypatch) -> None:
    monkeypatch.setenv("RSSEG_FAKE_GPUS", "2")
    with dask_client(None, n_workers=3) as client:
        client.wait_for_workers(3, timeout=120)
        info = client.scheduler_info(n_workers=-1)["workers"]
        resources = {a: w.get("resources") or {} for a, w in info.items()}
        visible = client.run(_visible)
        gpu_workers = sorted(a for a, r in resources.items() if r.get("GPU"))
        assert len(info) == 3 and len(gpu_workers) == 2
        assert all(resources[a] == {"GPU": 1} for a in gpu_workers)
        assert sorted(visible[a] for a in gpu_workers) == ["0", "1"]
        assert [visible[a] for a in info if a not in gpu_workers] == [""]  # CPU workers see no GPU
        assert all(w["nthreads"] == 1 for w in info.values())
        assert set(client.run(_wait_policy).values()) == {"PASSIVE"}  # the workers' entry-point settings
        # GPU-annotated tasks run, one per GPU worker at a time, each on its worker's device
        futures = [client.submit(_held, 0.5, resources={"GPU": 1}, pure=False) for _ in range(4)]
        results = client.gather(futures)
        assert {r[0] for r in results} == {"0", "1"}
        assert client.submit(_visible, pure=False).result() in {"0", "1", ""}  # CPU tasks run anywhere


def test_ddp_training_holds_all_its_gpus(monkeypatch) -> None:
    monkeypatch.setenv("RSSEG_FAKE_GPUS", "3")
    with dask_client(None, n_workers=3, gpu_group=2) as client:
        client.wait_for_workers(3, timeout=120)
        info = client.scheduler_info(n_workers=-1)["workers"]
        visible = client.run(_visible)
        gpus = {visible[a]: (w.get("resources") or {}).get("GPU") for a, w in info.items()}
        assert gpus == {"0,1": 2, "2": 1, "": None}  # one worker with the training's 2 GPUs
        train = client.submit(_held, 2.0, resources={"GPU": 2}, pure=False)
        deadline = time.monotonic() + 60
        while not any(train.key in keys for keys in client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        others = [client.submit(_held, 0.1, resources={"GPU": 1}, pure=False) for _ in range(3)]
        held, _, t_end = train.result()
        assert held == "0,1"
        for device, start, _end in client.gather(others):
            # on the training's GPUs only once it is done; meanwhile on the other GPU
            assert device == "2" or start >= t_end


def test_nproc_beyond_every_workers_gpus_fails_fast(tmp_path: Path, monkeypatch) -> None:
    from rsseg.pipeline.context import check_devices
    from rsseg.pipeline.runner import load_pipeline

    spec = {"name": "ddp", "workdir": str(tmp_path / "w"), "stages": {"train": {"uses": "train", "with": {
        "nproc": 2, "config": {"data": {"source": "tianchi", "root": str(tmp_path)}, "run": {"device": "cuda"}}}}}}
    pipe = load_pipeline(spec)
    monkeypatch.setenv("RSSEG_FAKE_GPUS", "2")
    with dask_client(None, n_workers=2) as client:  # one GPU per worker: no worker holds 2
        client.wait_for_workers(2, timeout=120)
        with pytest.raises(ConfigError, match=r"nproc=2 holds 2 GPUs in one task, but the largest Dask worker "
                                              r"offers 1; .*--resources GPU=2"):
            check_devices(list(pipe.stages), client)
