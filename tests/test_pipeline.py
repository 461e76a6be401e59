"""Pipelines through the CLI on tiny generated data, on real Dask clusters."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyogrio
import pytest
import yaml

from rsseg.errors import ConfigError
from rsseg.models import create_model, model_config, save_checkpoint
from rsseg.pipeline.runner import load_pipeline
from rsseg.synth.generate import make_tianchi


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (but fixed) U-Net: the pipeline is about plumbing, not accuracy."""
    import torch

    torch.manual_seed(0)
    small = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    model = create_model(encoder="resnet18", **small)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_checkpoint(path, model, model_config(model, arch="unet", encoder="resnet18", in_channels=3,
                                                     classes=1, **small), meta={"threshold": 0.5})


def _pipeline_file(tmp_path: Path, checkpoint: Path, name: str = "tiny.yaml", **changes: object) -> Path:
    spec = {
        "name": "tiny",
        "workdir": str(tmp_path / "work"),
        "vars": {"checkpoint": str(checkpoint), "size": 384},
        "stages": {
            "scenes": {"uses": "synth_scene", "with": {"size": "${size}", "count": 2, "seed": 3}},
            "chips": {"uses": "tile", "with": {"scenes": "${scenes}", "size": 256, "overlap": 32,
                                               "labels": "${scenes}/{stem}.buildings.geojson"}},
            "predict": {"uses": "predict_scenes", "with": {"checkpoint": "${checkpoint}", "scenes": "${scenes}",
                                                           "tile": 256, "overlap": 64, "tta": "none",
                                                           "device": "cpu"}},
            "vectorize": {"uses": "vectorize", "with": {"masks": "${predict}", "scenes": "${scenes}",
                                                        "block": 200}},
            "evaluate": {"uses": "evaluate", "with": {"pred": "${vectorize}/{stem}.gpkg",
                                                      "truth": "${scenes}/{stem}.buildings.geojson",
                                                      "scenes": "${scenes}"}},
        },
    }
    spec.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _rsseg(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rsseg.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def _digest(workdir: Path) -> dict[str, str]:
    """Content of every output but the manifests and vector files (checked separately), by path."""
    out = {}
    for p in sorted(workdir.rglob("*")):
        if p.is_file() and p.suffix not in {".json", ".gpkg", ".html"} and "quicklook" not in p.name:
            out[str(p.relative_to(workdir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _vectors(workdir: Path) -> dict[str, list[str]]:
    return {p.name: sorted(g.wkb_hex for g in pyogrio.read_dataframe(p).geometry.normalize())
            for p in sorted((workdir / "vectorize").glob("*.gpkg"))}


def test_unknown_key_and_wrong_type_are_named(tmp_path: Path, checkpoint: Path) -> None:
    path = _pipeline_file(tmp_path, checkpoint)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["chips"]["with"]["overlapp"] = 3
    with pytest.raises(ConfigError, match=r"stages\.chips\.with\.overlapp: Extra inputs are not permitted"):
        load_pipeline(raw)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["chips"]["with"]["size"] = "big"
    with pytest.raises(ConfigError, match=r"stages\.chips\.with\.size: Input should be a valid integer"):
        load_pipeline(raw)
    raw = yaml.safe_load(path.read_text())
    raw["retires"] = 2
    with pytest.raises(ConfigError, match="retires: Extra inputs"):
        load_pipeline(raw)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["chips"]["uses"] = "tiles"
    with pytest.raises(ConfigError, match="unknown stage kind 'tiles'; expected one of"):
        load_pipeline(raw)
    done = _rsseg("run", path, "--set", "chips.sizee=3")
    assert done.returncode == 2
    assert done.stderr.strip() == "rsseg: error: tiny.yaml: stages.chips.with.sizee: Extra inputs are not permitted"


def test_overrides_interpolation_and_dependencies(tmp_path: Path, checkpoint: Path) -> None:
    pipe = load_pipeline(_pipeline_file(tmp_path, checkpoint), {"size": "512", "chips.overlap": "16"})
    stages = {s.name: s for s in pipe.stages}
    assert stages["scenes"].params.size == 512  # a whole-string variable keeps its type
    assert stages["chips"].params.overlap == 16
    assert stages["chips"].needs == ("scenes",)
    assert stages["evaluate"].needs == ("scenes", "vectorize")
    assert stages["vectorize"].params.masks == str(tmp_path / "work" / "predict")
    assert [s.name for s in pipe.stages].index("predict") < [s.name for s in pipe.stages].index("vectorize")
    cyclic = yaml.safe_load(_pipeline_file(tmp_path, checkpoint).read_text())
    cyclic["stages"]["scenes"]["after"] = ["evaluate"]
    with pytest.raises(ConfigError, match="cycle"):
        load_pipeline(cyclic)


def test_run_on_local_cluster_then_resume(tmp_path: Path, checkpoint: Path) -> None:
    path = _pipeline_file(tmp_path, checkpoint)
    spec = yaml.safe_load(path.read_text())  # plus Tianchi tiles, rendered in chunks on the workers
    spec["stages"]["data"] = {"uses": "synth_tianchi", "with": {"n_train": 21, "n_test": 2, "seed": 4}}
    path.write_text(yaml.safe_dump(spec))
    done = _rsseg("run", path)
    assert done.returncode == 0, done.stderr
    assert "Dask dashboard at" in done.stdout
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    work = tmp_path / "work"
    assert summary["stages"]["scenes"]["buildings"] > 0
    direct = make_tianchi(tmp_path / "direct", n_train=21, n_test=2, seed=4, progress=False)
    assert (work / "data" / "tianchi" / "train_mask.csv").read_bytes() == direct["train_mask"].read_bytes()
    assert summary["stages"]["chips"]["chips"] == 8  # 2 scenes x 2x2 windows of 256 over 384 px
    assert sorted(p.name for p in (work / "predict").glob("*.tif")) == [
        "scene_000.prob.tif", "scene_000.tif", "scene_001.prob.tif", "scene_001.tif"]
    assert (work / "vectorize" / "buildings.gpkg").exists()
    evaluation = json.loads((work / "evaluate" / "evaluation.json").read_text())
    assert set(evaluation) == {"scene_000", "scene_001"}
    manifest = json.loads((work / "chips" / "manifest.json").read_text())
    assert manifest["needs"] == {"scenes": json.loads((work / "scenes" / "manifest.json").read_text())["fingerprint"]}
    report = (work / "report.html").read_text()
    assert "data:image/png;base64," in report and "predict_scenes" in report
    # A second run skips everything; changing a parameter re-runs that stage and those after it.
    again = json.loads(_rsseg("run", path).stdout.split("\n", 1)[1])
    assert all(s["skipped"] for s in again["stages"].values())
    changed = json.loads(_rsseg("run", path, "--set", "vectorize.min_area=5").stdout.split("\n", 1)[1])
    assert [n for n, s in changed["stages"].items() if not s["skipped"]] == ["vectorize", "evaluate"]


def test_kill_mid_stage_then_resume_matches_uninterrupted(tmp_path: Path, checkpoint: Path) -> None:
    path = _pipeline_file(tmp_path, checkpoint)
    work = tmp_path / "work"
    assert _rsseg("run", path).returncode == 0
    uninterrupted = _digest(work), _vectors(work)
    shutil.rmtree(work)
    proc = subprocess.Popen([sys.executable, "-m", "rsseg.cli", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(work.glob(".predict.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "predict").exists() and (work / "scenes" / "manifest.json").exists()
    resumed = _rsseg("run", path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.split("\n", 1)[1])
    assert summary["stages"]["scenes"]["skipped"] and not summary["stages"]["predict"]["skipped"]
    assert not list(work.glob(".*.tmp-*"))
    assert (_digest(work), _vectors(work)) == uninterrupted


def test_failing_stage_is_named_and_leaves_no_partial_output(tmp_path: Path, checkpoint: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    path = _pipeline_file(tmp_path, bogus)
    done = _rsseg("run", path, "--set", "retries=0")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("rsseg: error: stage predict (predict_scenes, task predict-")
    assert "is not a loadable torch checkpoint" in line
    assert line.count(" task ") == 1 and "PipelineError" not in line  # the task and the real error, once
    work = tmp_path / "work"
    assert (work / "scenes" / "manifest.json").exists()  # completed stages stay
    assert not (work / "predict").exists() and not list(work.glob(".predict.tmp-*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_on_separate_scheduler_and_worker(tmp_path: Path, checkpoint: Path) -> None:
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    scheduler = subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", ":0"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([bin_dir / "dask", "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2",
                               "--nthreads", "1", "--dashboard-address", ":0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        path = _pipeline_file(tmp_path, checkpoint)
        done = _rsseg("run", path, "--scheduler", f"tcp://127.0.0.1:{port}")
        assert done.returncode == 0, done.stderr
        assert "127.0.0.1" in done.stdout
        assert (tmp_path / "work" / "vectorize" / "buildings.gpkg").exists()
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
            proc.wait(timeout=30)
