"""Pipelines through the CLI on tiny generated data, on real Dask clusters.

Fast tier: loading and validating pipelines, fingerprints, device checks, failures (in-process, on the
session's LocalCluster). Slow tier (``-m slow``): whole runs, every file of ``pipelines/`` as the README
writes it, kill -9 and resume, a separate scheduler; two of them through the console script.
"""

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
from rsseg.pipeline.runner import load_pipeline
from rsseg.pipeline.stages import STAGES
from rsseg.synth.generate import make_tianchi


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


def test_unknown_key_and_wrong_type_are_named(tmp_path: Path, checkpoint: Path, rsseg_cli) -> None:
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
    done = rsseg_cli("run", path, "--set", "chips.sizee=3")
    assert done.exit_code == 2
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


@pytest.mark.slow
def test_run_on_local_cluster_then_resume(tmp_path: Path, checkpoint: Path, rsseg_cli) -> None:
    path = _pipeline_file(tmp_path, checkpoint)
    spec = yaml.safe_load(path.read_text())  # plus Tianchi tiles, rendered in chunks on the workers
    spec["stages"]["data"] = {"uses": "synth_tianchi", "with": {"n_train": 21, "n_test": 2, "seed": 4}}
    path.write_text(yaml.safe_dump(spec))
    done = rsseg_cli("run", path)
    assert done.exit_code == 0, done.stderr
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
    again = json.loads(rsseg_cli("run", path).stdout.split("\n", 1)[1])
    assert all(s["skipped"] for s in again["stages"].values())
    changed = json.loads(rsseg_cli("run", path, "--set", "vectorize.min_area=5").stdout.split("\n", 1)[1])
    assert [n for n, s in changed["stages"].items() if not s["skipped"]] == ["vectorize", "evaluate"]


@pytest.mark.slow
def test_kill_mid_stage_then_resume_matches_uninterrupted(tmp_path: Path, checkpoint: Path) -> None:
    path = _pipeline_file(tmp_path, checkpoint)
    work = tmp_path / "work"
    assert _rsseg("run", path).returncode == 0
    uninterrupted = _digest(work), _vectors(work)
    shutil.rmtree(work)
    _run_and_kill_when(path, work, ".predict.tmp-*", timeout=120)
    assert not (work / "predict").exists() and (work / "scenes" / "manifest.json").exists()
    resumed = _rsseg("run", path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.split("\n", 1)[1])
    assert summary["stages"]["scenes"]["skipped"] and not summary["stages"]["predict"]["skipped"]
    assert not list(work.glob(".*.tmp-*"))
    assert (_digest(work), _vectors(work)) == uninterrupted


def test_failing_stage_is_named_and_leaves_no_partial_output(tmp_path: Path, dask_cluster: str, rsseg_cli) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    path = _pipeline_file(tmp_path, bogus, vars={"checkpoint": str(bogus), "size": 128})
    spec = yaml.safe_load(path.read_text())
    del spec["stages"]["chips"]  # small and quick: scenes, then the failing predict
    path.write_text(yaml.safe_dump(spec))
    done = rsseg_cli("run", path, "--set", "retries=0", "--scheduler", dask_cluster)
    assert done.exit_code == 2
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


@pytest.mark.slow
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


# ------------------------------------------------------------------------------- chips, fingerprints, devices
def test_chips_source_takes_a_folder_of_chip_folders_a_list_or_a_glob(tmp_path: Path) -> None:
    from rsseg.pipeline.context import expand_chip_folders

    for stem in ("a", "b"):
        (tmp_path / "chips" / stem).mkdir(parents=True)
        (tmp_path / "chips" / stem / "index.csv").write_text("image,label\n")
    a, b = tmp_path / "chips" / "a", tmp_path / "chips" / "b"
    assert expand_chip_folders([tmp_path / "chips"]) == [a, b]  # the tile stage's folder: one per scene
    assert expand_chip_folders([str(b), a / "index.csv"]) == [b, a / "index.csv"]
    assert expand_chip_folders([f"{tmp_path}/chips/*"]) == [a, b]
    with pytest.raises(ConfigError, match="does not exist"):
        expand_chip_folders([f"{tmp_path}/nothing*"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no index.csv"):
        expand_chip_folders([tmp_path / "empty"])


def _globbed_pipeline(tmp_path: Path, scenes: Path, checkpoint: Path) -> dict:
    """tile (footprints behind {stem}), predict and vectorize, on scenes behind a glob."""
    return {
        "name": "globbed", "workdir": str(tmp_path / "work"),
        "vars": {"scenes": f"{scenes}/*.tif", "footprints": f"{scenes}/{{stem}}.buildings.geojson"},
        "stages": {
            "chips": {"uses": "tile", "with": {"scenes": "${scenes}", "labels": "${footprints}", "size": 128,
                                               "overlap": 0}},
            "predict": {"uses": "predict_scenes", "with": {"checkpoint": str(checkpoint), "scenes": "${scenes}",
                                                           "tile": 128, "overlap": 32, "tta": "none",
                                                           "device": "cpu"}},
            "vectorize": {"uses": "vectorize", "with": {"masks": "${predict}", "block": 128}},
        },
    }


def _changed(before: dict, after: dict) -> list[str]:
    return [name for name in before if before[name]["fingerprint"] != after[name]["fingerprint"]]


def test_fingerprints_follow_files_behind_globs_and_stem_patterns(tmp_path: Path, scenes_dir: Path,
                                                                  checkpoint: Path) -> None:
    from rsseg.pipeline.fingerprint import fingerprints, source_hash

    scenes = tmp_path / "scenes"
    shutil.copytree(scenes_dir, scenes)
    pipe = load_pipeline(_globbed_pipeline(tmp_path, scenes, checkpoint))
    first = fingerprints(pipe)
    assert {Path(i["path"]).name for i in first["predict"]["inputs"]} >= {"scene_000.tif", "scene_001.tif"}
    assert first["chips"]["rsseg_sources"] == source_hash() and len(source_hash()) == 64
    assert _changed(first, fingerprints(pipe)) == []  # nothing changed: every stage would be skipped
    shutil.copy(scenes / "scene_000.tif", scenes / "scene_001.tif")  # a scene behind the glob replaced
    second = fingerprints(pipe)
    assert _changed(first, second) == ["chips", "predict", "vectorize"]
    footprints = scenes / "scene_000.buildings.geojson"  # a footprint file behind {stem} edited
    footprints.write_text(footprints.read_text().replace('"type"', '"type" ', 1))
    assert _changed(second, fingerprints(pipe)) == ["chips"]


def test_cuda_without_a_gpu_worker_fails_fast_with_the_fix(tmp_path: Path, checkpoint: Path, dask_cluster: str,
                                                           rsseg_cli) -> None:
    path = _pipeline_file(tmp_path, checkpoint)
    start = time.monotonic()
    done = rsseg_cli("run", path, "--set", "predict.device=cuda", "--scheduler", dask_cluster)
    assert time.monotonic() - start < 30
    assert done.exit_code == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rsseg: error: stage predict: device=cuda but no Dask worker")
    assert "--resources GPU=1" in lines[0] and "device=cpu" in lines[0]
    assert not (tmp_path / "work" / "scenes").exists()  # refused before anything was submitted


def test_auto_device_is_resolved_where_the_task_runs(tmp_path: Path) -> None:
    from rsseg.pipeline.context import StageContext

    cpu_only = StageContext("predict", None, tmp_path, gpu_workers=[])
    with_gpus = StageContext("predict", None, tmp_path, gpu_workers=["tcp://gpu-node:1234"])
    assert not cpu_only.wants_gpu("auto") and not cpu_only.wants_gpu("cpu")  # the worker picks, no GPU asked
    assert with_gpus.wants_gpu("auto") and with_gpus.wants_gpu("cuda:1") and not with_gpus.wants_gpu("cpu")


def test_failing_stage_cancels_only_its_own_runs_tasks(tmp_path: Path, dask_cluster: str) -> None:
    from distributed import Client

    from rsseg.errors import PipelineError
    from rsseg.pipeline.runner import run

    spec = {"name": "fails", "workdir": str(tmp_path / "work"), "retries": 0, "stages": {
        "scenes": {"uses": "synth_scene", "with": {"size": 2048, "count": 2, "seed": 1}},  # tasks of seconds
        "score": {"uses": "score", "with": {"submission": str(tmp_path / "missing.csv"),
                                            "truth": str(tmp_path / "missing.csv")}},
    }}
    with Client(dask_cluster) as client:
        theirs = client.submit(time.sleep, 4, key="callers-own-work", pure=False)
        start = time.monotonic()
        with pytest.raises(PipelineError, match="stage score"):
            run(load_pipeline(spec), scheduler=client, report=False)
        assert time.monotonic() - start < 30  # the scene tasks were cancelled, not awaited
        assert not theirs.cancelled()
        assert theirs.result(timeout=60) is None  # the caller's work went on
        assert theirs.status == "finished"
    assert not (tmp_path / "work" / "scenes").exists()


# ------------------------------------------------------------------------- every file of pipelines/, as shipped
PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def _crs(path: Path) -> str:
    info = pyogrio.read_info(path)
    return info["crs"]


def _run_shipped(rsseg_cli, name: str, work: Path, *sets: str) -> dict:
    """``rsseg run pipelines/NAME.yaml --workdir WORK --set ...`` in this process; its JSON summary."""
    args = [a for s in sets for a in ("--set", s)]
    done = rsseg_cli("run", PIPELINES / f"{name}.yaml", "--workdir", work, *args)
    assert done.exit_code == 0, done.stderr
    first, rest = done.stdout.split("\n", 1)
    assert first.startswith(f"rsseg run {name}: Dask dashboard at ")
    return json.loads(rest)


@pytest.mark.slow
def test_readme_workflow_2_train_on_scenes_then_scenes_to_buildings(tmp_path: Path, scenes_dir: Path,
                                                                    rsseg_cli) -> None:
    import rasterio

    # README, workflow 2, footprints given as a {stem} pattern; shrunk: 128-px chips, 1 epoch, no TTA.
    trained = _run_shipped(rsseg_cli, "train_on_scenes", tmp_path / "train",
                           f"scenes={scenes_dir}", f"footprints={scenes_dir}/{{stem}}.buildings.geojson",
                           "epochs=1", "chips.size=128", "chips.overlap=0", "train.config.data.batch_size=4",
                           "train.config.model.encoder=resnet18")
    assert trained["stages"]["chips"]["chips"] == 8  # 2 scenes x 2x2 windows of 128 over 256 px
    assert trained["stages"]["train"]["epoch"] == 1 and 0 <= trained["stages"]["train"]["best_dice"] <= 1
    best = tmp_path / "train" / "train" / "best.pt"
    assert best.exists()
    config = yaml.safe_load((tmp_path / "train" / "train" / "train_config.yaml").read_text())
    assert sorted(Path(c).name for c in config["data"]["chips"]) == ["scene_000", "scene_001"]

    found = _run_shipped(rsseg_cli, "scenes_to_buildings", tmp_path / "find", f"scenes={scenes_dir}",
                         f"checkpoint={best}", "tta=none", "predict.tile=128", "predict.overlap=32")
    out = tmp_path / "find"
    assert found["stages"]["predict"]["scenes"] == 2
    for stem in ("scene_000", "scene_001"):
        with rasterio.open(out / "predict" / f"{stem}.tif") as mask, rasterio.open(scenes_dir / f"{stem}.tif") as src:
            assert mask.crs == src.crs and mask.transform == src.transform and mask.shape == src.shape
        assert _crs(out / "vectorize" / f"{stem}.geojson").endswith("4326")
        assert _crs(out / "vectorize" / f"{stem}.gpkg").endswith("32650")
    merged = pyogrio.read_dataframe(out / "vectorize" / "buildings.gpkg")
    per_scene = found["stages"]["vectorize"]["per_scene"]
    assert len(merged) == found["stages"]["vectorize"]["buildings"] == sum(per_scene.values())
    assert merged.groupby("scene").size().to_dict() == {k: v for k, v in per_scene.items() if v}
    assert merged.geometry.is_valid.all()


# tianchi_submission.yaml, with its folds: tests/test_pipeline_foreach.py


@pytest.mark.slow
def test_demo_pipeline(tmp_path: Path, rsseg_cli) -> None:
    summary = _run_shipped(rsseg_cli, "demo", tmp_path / "demo",
                           "data.n_train=12", "data.n_test=2", "scenes.size=384", "chips.size=128",
                           "chips.overlap=0", "train_tianchi.config.run.epochs=1",
                           "train_tianchi.config.data.batch_size=4", "train_chips.config.data.batch_size=4",
                           "predict.tile=128", "predict.overlap=32")
    stages = summary["stages"]
    assert stages["data"]["n_train"] == 12 and stages["scenes"]["scenes"] == 2
    assert stages["chips"]["chips"] == 9  # 3x3 windows of 128 over 384 px
    assert 0 <= stages["score"]["mean_dice"] <= 1 and stages["score"]["images"] == 2
    assert stages["predict_tianchi"]["rows"] == 2
    evaluation = stages["evaluate"]["scene_001"]
    truth = pyogrio.read_info(tmp_path / "demo" / "scenes" / "scene_001.buildings.geojson")["features"]
    assert evaluation["n_truth"] == truth and 0 <= evaluation["f1"] <= 1 and 0 <= evaluation["area_iou"] <= 1
    vectors = tmp_path / "demo" / "vectorize"
    assert _crs(vectors / "scene_001.geojson").endswith("4326") and _crs(vectors / "scene_001.gpkg").endswith("32650")
    assert (tmp_path / "demo" / "report.html").exists()


@pytest.mark.slow
def test_resume_reruns_what_changed_behind_globs_and_stem_patterns(tmp_path: Path, scenes_dir: Path,
                                                                   checkpoint: Path, dask_cluster: str) -> None:
    import rasterio

    from rsseg.pipeline.runner import run

    scenes = tmp_path / "scenes"
    shutil.copytree(scenes_dir, scenes)
    spec = _globbed_pipeline(tmp_path, scenes, checkpoint)

    def ran() -> list[str]:
        summary = run(load_pipeline(spec), scheduler=dask_cluster, report=False)
        return [name for name, s in summary["stages"].items() if not s["skipped"]]

    assert ran() == ["chips", "predict", "vectorize"]
    assert ran() == []  # nothing changed: all skipped
    shutil.copy(scenes / "scene_000.tif", scenes / "scene_001.tif")  # a scene behind the glob replaced
    assert ran() == ["chips", "predict", "vectorize"]
    with rasterio.open(tmp_path / "work" / "predict" / "scene_000.tif") as a, \
            rasterio.open(tmp_path / "work" / "predict" / "scene_001.tif") as b:
        assert (a.read() == b.read()).all()  # scene_001's prediction is that of its new content
    footprints = scenes / "scene_000.buildings.geojson"  # a footprint file behind {stem} edited
    footprints.write_text(footprints.read_text().replace('"type"', '"type" ', 1))
    assert ran() == ["chips"]


# ------------------------------------------------------------------------------------ training in a pipeline
def _train_pipeline(tmp_path: Path, data: Path, arch: str, epochs: int = 3, **run: object) -> Path:
    """One train stage on a Tianchi folder: the stand-in net, CPU, fp32, deterministic, ``epochs`` epochs."""
    spec = {"name": "train_only", "workdir": str(tmp_path / "work"), "retries": 1, "stages": {"train": {
        "uses": "train", "with": {"config": {
            "data": {"source": "tianchi", "root": str(data), "val_fraction": 0.25, "seed": 0, "batch_size": 3,
                     "num_workers": 0},
            "model": {"arch": arch},
            "run": {"epochs": epochs, "device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1,
                    **run}}}}}}
    path = tmp_path / "train_only.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _weights(path: Path) -> dict:
    from rsseg.models import load_checkpoint

    return load_checkpoint(path)["state_dict"]


def _kill_tree(pid: int) -> None:
    """kill -9 a process and everything it started (Dask nannies, workers, the trainer child)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _run_and_kill_when(path: Path, work: Path, pattern: str, timeout: float = 300) -> None:
    """``rsseg run path``, killed with everything it started (kill -9) as soon as ``work`` holds ``pattern``."""
    proc = subprocess.Popen([sys.executable, "-m", "rsseg.cli", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not list(work.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    _kill_tree(proc.pid)
    proc.wait()


@pytest.mark.slow
def test_killed_training_resumes_from_its_partial_folder(tmp_path: Path, tianchi_dir: Path, stand_ins) -> None:
    import torch

    ref = tmp_path / "ref"
    ref.mkdir()
    done = _rsseg("run", _train_pipeline(ref, tianchi_dir, stand_ins))
    assert done.returncode == 0, done.stderr
    uninterrupted = _weights(ref / "work" / "train" / "last.pt")

    path = _train_pipeline(tmp_path, tianchi_dir, stand_ins)
    work = tmp_path / "work"
    _run_and_kill_when(path, work, ".train.*.partial/last.pt")  # epoch 1 written, epoch 2 under way
    partial = list(work.glob(".train.*.partial"))
    assert len(partial) == 1 and not (work / "train").exists()
    assert torch.load(partial[0] / "last.pt", weights_only=True)["meta"]["epoch"] == 1

    resumed = _rsseg("run", path)
    assert resumed.returncode == 0, resumed.stderr
    assert "stage train: resumed at epoch 2/3" in resumed.stderr
    # the trainer's epochs show as they come (log lines from the runner) and its whole log is kept
    assert "stage train: epoch 3/3: train loss" in resumed.stderr and "val Dice" in resumed.stderr
    assert "epoch 2/3: train loss" in (work / "train" / "train.log").read_text()
    assert not list(work.glob(".train.*"))  # the partial folder became the stage's folder
    summary = json.loads(resumed.stdout.split("\n", 1)[1])
    assert 1 <= summary["stages"]["train"]["epoch"] <= 3  # best.pt's epoch
    assert torch.load(work / "train" / "last.pt", weights_only=True)["meta"]["epoch"] == 3
    final = _weights(work / "train" / "last.pt")
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)


@pytest.mark.slow
def test_failed_training_shows_the_trainers_own_error(tmp_path: Path, tianchi_dir: Path, stand_ins) -> None:
    # 9 training images in batches of 3: the 5th training step (in epoch 2, after last.pt) fails; the retry
    # continues that last.pt and fails the same way (not with "already holds a run").
    path = _train_pipeline(tmp_path, tianchi_dir, "stand_ins:FailingNet")
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["train"]["with"]["config"]["model"]["kwargs"] = {"fail_after": 4}
    path.write_text(yaml.safe_dump(spec))
    done = _rsseg("run", path)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("rsseg: error: stage train (train, task train-torchrun-0) failed: ")
    assert line.endswith("RuntimeError: CUDA out of memory (stand-in failure)")
    assert "already holds a run" not in done.stderr
    assert "stage train: training failed; the last lines of train.log:" in done.stderr
    assert "stage train: epoch 1/3: train loss" in done.stderr
    partial = list((tmp_path / "work").glob(".train.*.partial"))
    assert len(partial) == 1 and (partial[0] / "last.pt").exists()
    assert "Traceback" in (partial[0] / "train.log").read_text()


# ------------------------------------------------------------------------------------------------- packaging
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["demo", "scenes_to_buildings", "tianchi_submission", "train_on_scenes"]


def test_pyproject_lists_every_package_and_maps_the_yaml_folders() -> None:
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rsseg").rglob("__init__.py")}
    assert set(tool["packages"]) == tree | {"rsseg.pipelines", "rsseg.configs"}
    assert tool["package-dir"] == {"rsseg.pipelines": "pipelines", "rsseg.configs": "configs"}
    assert tool["package-data"] == {"rsseg.pipelines": ["*.yaml"], "rsseg.configs": ["*.yaml"]}


def test_shipped_pipelines_load_by_name_and_unknown_names_list_them(rsseg_cli) -> None:
    from rsseg.shipped import shipped_names

    assert shipped_names("pipelines") == SHIPPED
    assert {"train_tianchi", "train_chips"} <= set(shipped_names("configs"))
    # tianchi_submission.yaml needs the ensemble stage kind and run.tune_tta (issue 16 item 4, another branch)
    loadable = [name for name in SHIPPED if name != "tianchi_submission" or "ensemble" in STAGES]
    assert [load_pipeline(name).name for name in loadable] == loadable
    done = rsseg_cli("run", "nosuch")
    assert done.exit_code == 2 and done.stderr.strip().endswith(f"expected a YAML file or one of {', '.join(SHIPPED)}")


_WHEEL_CHECK = """
import sys
from pathlib import Path
import rsseg
from rsseg.pipeline.runner import load_pipeline
from rsseg.pipeline.stages import STAGES
from rsseg.shipped import shipped_folder, shipped_names
assert Path(rsseg.__file__).is_relative_to(sys.prefix), rsseg.__file__
assert sys.prefix + "/" in str(shipped_folder("pipelines")), shipped_folder("pipelines")  # the wheel's data
print(shipped_names("pipelines"), shipped_names("configs"))
print([load_pipeline(name).name for name in shipped_names("pipelines")])
"""


@pytest.mark.slow
def test_built_wheel_ships_the_pipelines_and_configs(tmp_path: Path) -> None:
    import sysconfig

    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".*cache", "demo-run", "runs"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            tmp_path / "dist", source], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("rsseg-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, GDAL...) from this interpreter's site-packages, without its .pth files
    (Path(site) / "rsseg_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checked = subprocess.run([python, "-c", _WHEEL_CHECK], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert checked.returncode == 0, checked.stderr
    names, loaded = checked.stdout.splitlines()[:2]
    assert names.startswith(str(SHIPPED)) and "train_tianchi" in names and loaded == str(SHIPPED)
    for args in (["run", "--help"], ["demo", "--help"], ["run", "nosuch"]):
        done = subprocess.run([venv / "bin" / "rsseg", *args], capture_output=True, text=True, cwd=elsewhere, env=env)
        assert done.returncode == (2 if "nosuch" in args else 0), done.stderr
    assert done.stderr.strip().endswith(f"one of {', '.join(SHIPPED)}")


# ---------------------------------------------------------------------------------------- a lost worker
def _start_dask_cluster(port: int) -> list[subprocess.Popen]:
    """``dask scheduler`` and two single-worker ``dask worker`` processes (no nanny: kill -9 loses the worker)."""
    bin_dir = Path(sys.executable).parent
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], **quiet)]
    procs += [subprocess.Popen([bin_dir / "dask", "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                "--no-nanny", "--dashboard-address", ":0", "--preload", "rsseg.pipeline.process"],
                               **quiet) for _ in range(2)]
    return procs


@pytest.mark.slow
def test_separate_cluster_survives_a_lost_worker(tmp_path: Path, scenes_dir: Path, checkpoint: Path,
                                                 rsseg_cli) -> None:
    from distributed import Client

    sets = [f"scenes={scenes_dir}", f"checkpoint={checkpoint}", "predict.tile=128", "predict.overlap=32"]
    work = tmp_path / "work"  # the same folder for both runs: the vector files record their mask's path
    _run_shipped(rsseg_cli, "scenes_to_buildings", work, *sets)  # on a LocalCluster
    reference = _digest(work), _vectors(work)
    shutil.rmtree(work)

    port = _free_port()
    procs = _start_dask_cluster(port)
    address = f"tcp://127.0.0.1:{port}"
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            pids = client.run(os.getpid)
            args = [a for s in sets for a in ("--set", s)]
            run = subprocess.Popen([sys.executable, "-m", "rsseg.cli", "run", "scenes_to_buildings", "--workdir",
                                    str(work), "--scheduler", address, *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            lost = None
            deadline = time.monotonic() + 300
            while lost is None and run.poll() is None and time.monotonic() < deadline:
                busy = client.processing()
                lost = next((w for w, keys in busy.items() if any(k.startswith("predict-") for k in keys)), None)
                time.sleep(0.02)
            assert lost is not None, "no predict task was seen running"
            os.kill(pids[lost], signal.SIGKILL)  # a worker lost in the middle of a predict task
            out, err = run.communicate(timeout=600)
            assert run.returncode == 0, err
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(timeout=30)
    summary = json.loads(out.split("\n", 1)[1])
    assert summary["stages"]["predict"]["scenes"] == 2 and not list(work.glob(".*.tmp-*"))
    assert (_digest(work), _vectors(work)) == reference


def test_stale_temporary_and_partial_folders_are_removed(tmp_path: Path) -> None:
    from rsseg.pipeline.runner import _remove_stale, fingerprints

    spec = {"name": "t", "workdir": str(tmp_path / "w"), "stages": {"train": {"uses": "train", "with": {
        "config": {"data": {"source": "tianchi", "root": str(tmp_path)}, "run": {"device": "cpu"}}}}}}
    pipe = load_pipeline(spec)
    heads = fingerprints(pipe)
    mine = pipe.workdir / f".train.{heads['train']['fingerprint'][:12]}.partial"
    stale = [pipe.workdir / ".train.0123456789ab.partial", pipe.workdir / ".chips.tmp-1234abcd"]
    for folder in (mine, *stale):
        folder.mkdir(parents=True)
    _remove_stale(pipe, heads, resume=True)
    assert mine.exists() and not any(p.exists() for p in stale)  # the same stage's crashed attempt stays
    _remove_stale(pipe, heads, resume=False)
    assert not mine.exists()  # --no-resume: from scratch
