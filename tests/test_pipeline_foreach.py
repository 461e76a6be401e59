"""``foreach`` stages: expansion into ``<stage>@<item>``, ``${item}``, list references, errors, fingerprints,
and how trainers share the machine (one at a time on the CPU, side by side on GPU workers).

Fast tier: loading on tiny stages, and runs of a stand-in stage kind (a task that sleeps) on the session's
LocalCluster and on a faked GPU box. Slow tier: two real fold trainings (with a kill -9 and a resume), and
the shipped ``tianchi_submission.yaml`` end to end.
"""

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from rsseg.errors import ConfigError
from rsseg.pipeline.context import Params, StageContext, StageKind
from rsseg.pipeline.fingerprint import fingerprints
from rsseg.pipeline.runner import load_pipeline, run
from rsseg.pipeline.stages import STAGES


def _spec(tmp_path: Path, **stages: dict) -> dict:
    """A pipeline of tiny stages: ``scenes`` (3 generated 64-px scenes, seed = item) plus ``stages``."""
    return {"name": "fe", "workdir": str(tmp_path / "work"), "vars": {"folds": 3}, "stages": {
        "scenes": {"uses": "synth_scene", "foreach": "${folds}", "with": {"size": 64, "seed": "${item}"}},
        **stages}}


def _chips_train(chips: Any, **extra: Any) -> dict:
    return {"uses": "train", **extra, "with": {"config": {"data": {"source": "chips", "chips": chips},
                                                          "run": {"device": "cpu"}}}}


def test_foreach_expands_into_one_stage_per_item(tmp_path: Path) -> None:
    pipe = load_pipeline(_spec(tmp_path, tiles={"uses": "tile", "foreach": ["a", "b"], "with": {
        "scenes": "${scenes@1}/x_${item}.tif", "size": 64, "overlap": "${folds}"}}))
    stages = {s.name: s for s in pipe.stages}
    work = tmp_path / "work"
    assert list(stages) == ["scenes@0", "scenes@1", "scenes@2", "tiles@a", "tiles@b"]
    assert [stages[f"scenes@{i}"].params.seed for i in range(3)] == [0, 1, 2]  # ${item} keeps its int type
    assert stages["tiles@b"].params.scenes == f"{work}/scenes@1/x_b.tif"  # in a longer string: text
    assert stages["tiles@a"].params.overlap == 3
    assert stages["tiles@a"].needs == ("scenes@1",) and stages["scenes@2"].needs == ()
    assert stages["scenes@0"].foreach == "scenes" and stages["tiles@a"].foreach == "tiles"
    for items in (2, [0, 1], "${folds}"):  # a number, a list of them, or a variable giving one
        loaded = load_pipeline(_spec(tmp_path, more={"uses": "synth_scene", "foreach": items, "with": {}}),
                               {"folds": "2"})
        assert [s.name for s in loaded.stages if s.foreach == "more"] == ["more@0", "more@1"]


def test_whole_reference_is_the_list_of_instance_folders_and_after_needs_all(tmp_path: Path) -> None:
    pipe = load_pipeline(_spec(tmp_path, train=_chips_train("${scenes}"),
                               one=_chips_train(["${scenes@2}"]),
                               late={"uses": "synth_scene", "after": ["scenes"], "with": {"size": 64}}))
    stages = {s.name: s for s in pipe.stages}
    work = tmp_path / "work"
    instances = ("scenes@0", "scenes@1", "scenes@2")
    assert stages["train"].params.config["data"]["chips"] == [str(work / n) for n in instances]
    assert stages["train"].needs == instances and stages["late"].needs == instances
    assert stages["one"].needs == ("scenes@2",) and stages["train"].foreach is None
    assert [s.name for s in pipe.stages][-3:] == ["train", "one", "late"]


def test_set_applies_to_every_instance_and_changes_the_count(tmp_path: Path) -> None:
    pipe = load_pipeline(_spec(tmp_path), {"scenes.size": "96", "folds": "5"})
    assert [s.name for s in pipe.stages] == [f"scenes@{i}" for i in range(5)]
    assert {s.params.size for s in pipe.stages} == {96}


@pytest.mark.parametrize(("change", "message"), [
    ({"train": _chips_train("${scenes}/chips")},
     r"stages\.train\.with\.config\.data\.chips: \$\{scenes\} inside a longer string, but stage scenes has "
     r"foreach \(3 instances\); use \$\{scenes@<item>\}"),
    ({"plain": {"uses": "synth_scene", "with": {"seed": "${item}"}}},
     r"stages\.plain\.with\.seed: \$\{item\} is only defined in a stage with foreach"),
    ({"none": {"uses": "synth_scene", "foreach": 0}},
     r"pipeline: stages\.none\.foreach: 0 gives no items; expected a number >= 1"),
    ({"empty": {"uses": "synth_scene", "foreach": []}}, r"stages\.empty\.foreach: \[\] gives no items"),
    ({"odd": {"uses": "synth_scene", "foreach": {"a": 1}}},
     r"stages\.odd\.foreach: \{'a': 1\} is neither a number of items nor a list"),
    ({"text": {"uses": "synth_scene", "foreach": "many"}}, r"stages\.text\.foreach: 'many' is neither"),
    ({"spaced": {"uses": "synth_scene", "foreach": ["a b"]}},
     r"stages\.spaced\.foreach: item 'a b' cannot name a stage; expected numbers or names"),
    ({"twice": {"uses": "synth_scene", "foreach": [1, "1"]}}, r"stages\.twice\.foreach: item '1' appears twice"),
    ({"far": {"uses": "synth_scene", "with": {"seed": "${scenes@7}"}}},
     r"stages\.far\.with\.seed: \$\{scenes@7\} is neither a variable nor a stage"),
    ({"item": {"uses": "synth_scene"}}, r"'item' is reserved for a foreach stage's item"),
    ({"a@b": {"uses": "synth_scene"}}, r"stages\.a@b: '@' is kept for the instances of foreach stages"),
    ({"selfish": {"uses": "synth_scene", "foreach": 2, "after": ["selfish"]}},
     r"stages\.selfish: selfish@0 would depend on itself"),
])
def test_foreach_errors_are_one_line_naming_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_pipeline(_spec(tmp_path, **change))
    assert "\n" not in str(info.value)


def test_cli_foreach_error_is_one_line_and_exit_2(tmp_path: Path, rsseg_cli) -> None:
    path = tmp_path / "fe.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path)))
    done = rsseg_cli("run", path, "--set", "folds=0")
    assert done.exit_code == 2
    assert done.stderr.strip() == "rsseg: error: fe.yaml: stages.scenes.foreach: 0 gives no items; " \
                                  "expected a number >= 1 or a non-empty list"


def test_fingerprints_are_per_instance(tmp_path: Path) -> None:
    def heads(items: list[int], **sets: str) -> dict:
        spec = _spec(tmp_path, tiles={"uses": "tile", "with": {"scenes": "${scenes@0}", "size": 64, "overlap": 0},
                                      "after": ["scenes"]})
        spec["stages"]["scenes"]["foreach"] = items
        return {k: v["fingerprint"] for k, v in fingerprints(load_pipeline(spec, sets)).items()}

    first = heads([0, 1])
    assert heads([0, 1]) == first
    grown = heads([0, 1, 2])  # one more item: the others keep their fingerprint, what needs them all changes
    assert {k for k in first if first[k] != grown[k]} == {"tiles"}
    changed = heads([0, 5])
    assert changed["scenes@0"] == first["scenes@0"] and "scenes@1" not in changed
    sized = heads([0, 1], **{"scenes.size": "80"})
    assert all(sized[k] != first[k] for k in first)


def test_second_run_skips_every_instance_and_a_new_item_runs_alone(tmp_path: Path, dask_cluster: str) -> None:
    spec = _spec(tmp_path, tiles={"uses": "tile", "with": {"scenes": "${scenes@0}", "size": 64, "overlap": 0},
                                  "after": ["scenes"]})
    spec["stages"]["scenes"]["foreach"] = "${folds}"

    def ran(folds: int) -> list[str]:
        summary = run(load_pipeline(spec, {"folds": str(folds)}), scheduler=dask_cluster, report=False)
        return [name for name, s in summary["stages"].items() if not s["skipped"]]

    assert ran(2) == ["scenes@0", "scenes@1", "tiles"]
    work = tmp_path / "work"
    assert (work / "scenes@1" / "scene.tif").is_file() and (work / "scenes@1" / "manifest.json").is_file()
    assert ran(2) == []
    assert ran(3) == ["scenes@2", "tiles"]


# -------------------------------------------------------------------------------- sharing the machine
class NapParams(Params):
    """A stand-in stage: one task that sleeps, on a GPU worker when ``device`` asks for one."""

    seconds: float = 2.0
    device: str = "cpu"


def _nap(p: NapParams, ctx: StageContext) -> dict[str, Any]:
    ctx.gather([ctx.submit(time.sleep, p.seconds, gpu=ctx.wants_gpu(p.device), label="nap")])
    return {"slept": p.seconds}


@pytest.fixture
def nap_kinds(monkeypatch):
    """Stage kinds ``nap_train`` (exclusive on the CPU, as ``train``) and ``nap`` (not), for this test."""
    monkeypatch.setitem(STAGES, "nap_train", StageKind("nap_train", NapParams, _nap, exclusive_on_cpu=True))
    monkeypatch.setitem(STAGES, "nap", StageKind("nap", NapParams, _nap))
    assert STAGES["train"].exclusive_on_cpu


def _spans(work: Path, names: list[str]) -> list[tuple[datetime, datetime]]:
    """Each stage's (start, finish) from its manifest, in the order of ``names``."""
    spans = []
    for name in names:
        manifest = json.loads((work / name / "manifest.json").read_text())
        spans.append((datetime.fromisoformat(manifest["started"]), datetime.fromisoformat(manifest["finished"])))
    return spans


def _overlap(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_cpu_trainers_run_one_at_a_time_beside_other_stages(tmp_path: Path, dask_cluster: str,
                                                            nap_kinds) -> None:
    spec = {"name": "naps", "workdir": str(tmp_path / "work"), "stages": {
        "train": {"uses": "nap_train", "foreach": 3, "with": {"seconds": 1.5, "device": "auto"}},
        "other": {"uses": "nap", "with": {"seconds": 2.0}}}}
    run(load_pipeline(spec), scheduler=dask_cluster, report=False)  # no GPU worker: auto is the CPU
    trains = _spans(tmp_path / "work", ["train@0", "train@1", "train@2"])
    assert not any(_overlap(a, b) for i, a in enumerate(trains) for b in trains[i + 1:])
    assert trains[0][1] <= trains[1][0] and trains[1][1] <= trains[2][0]  # in item order
    other = _spans(tmp_path / "work", ["other"])[0]
    assert _overlap(other, trains[0])  # a stage of another kind ran beside the first trainer


def test_gpu_trainers_start_together_on_gpu_workers(tmp_path: Path, monkeypatch, nap_kinds) -> None:
    from rsseg.pipeline.cluster import dask_client

    spec = {"name": "naps", "workdir": str(tmp_path / "work"), "stages": {
        "train": {"uses": "nap_train", "foreach": 2, "with": {"seconds": 3.0, "device": "auto"}}}}
    monkeypatch.setenv("RSSEG_FAKE_GPUS", "2")
    with dask_client(None, n_workers=2) as client:  # two workers, one GPU resource each
        client.wait_for_workers(2, timeout=120)
        run(load_pipeline(spec), scheduler=client, report=False)
    first, second = _spans(tmp_path / "work", ["train@0", "train@1"])
    assert _overlap(first, second)


# ------------------------------------------------------------------------------------- fold training
def _folds_pipeline(tmp_path: Path, data: Path, arch: str) -> Path:
    """Two folds of a Tianchi folder, stand-in net, CPU, fp32, 3 epochs each."""
    spec = {"name": "folds", "workdir": str(tmp_path / "work"), "vars": {"folds": 2}, "stages": {"train": {
        "uses": "train", "foreach": "${folds}", "with": {"config": {
            "data": {"source": "tianchi", "root": str(data), "folds": "${folds}", "fold": "${item}", "seed": 0,
                     "batch_size": 3, "num_workers": 0},
            "model": {"arch": arch},
            "run": {"epochs": 3, "device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1}}}}}}
    path = tmp_path / "folds.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_killed_fold_resumes_and_cpu_folds_train_one_after_another(tmp_path: Path, tianchi_dir: Path,
                                                                   stand_ins) -> None:
    import torch
    from test_pipeline import _run_and_kill_when

    path = _folds_pipeline(tmp_path, tianchi_dir, stand_ins)
    work = tmp_path / "work"
    # fold 0: epoch 1 written, epoch 2 under way; fold 1 waits its turn on the CPU
    _run_and_kill_when(path, work, ".train@0.*.partial/last.pt")
    assert [p.name[:9] for p in work.glob(".train*.partial")] == [".train@0."]
    assert not (work / "train@0").exists() and not (work / "train@1").exists()

    resumed = subprocess.run([sys.executable, "-m", "rsseg.cli", "run", str(path)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "stage train@0: resumed at epoch 2/3" in resumed.stderr
    assert "stage train@1: resumed" not in resumed.stderr and "stage train@1: epoch 3/3" in resumed.stderr
    summary = json.loads(resumed.stdout.split("\n", 1)[1])
    assert set(summary["stages"]) == {"train@0", "train@1"}
    first, second = _spans(work, ["train@0", "train@1"])
    assert first[1] <= second[0]  # one trainer at a time on the CPU
    for fold in (0, 1):
        folder = work / f"train@{fold}"
        assert torch.load(folder / "last.pt", weights_only=True)["meta"]["epoch"] == 3
        assert (folder / "best.pt").is_file() and not list(work.glob(f".train@{fold}.*"))
        config = yaml.safe_load((folder / "train_config.yaml").read_text())
        assert config["data"]["folds"] == 2 and config["data"]["fold"] == fold


@pytest.mark.slow
@pytest.mark.skipif("ensemble" not in STAGES, reason="the ensemble stage kind (issue 16 item 4) is not merged yet")
def test_tianchi_submission_pipeline_trains_folds_and_submits_their_ensemble(tmp_path: Path, tianchi_dir: Path,
                                                                             rsseg_cli) -> None:
    from test_pipeline import _run_shipped

    from rsseg.tianchi.files import score, validate_submission

    summary = _run_shipped(rsseg_cli, "tianchi_submission", tmp_path / "work", f"data_dir={tianchi_dir}",
                           "folds=2", "epochs=1", "encoder=resnet18", "tta=none", "train.config.data.batch_size=4")
    work = tmp_path / "work"
    assert [n for n in summary["stages"] if n.startswith("train")] == ["train@0", "train@1"]
    for fold in ("train@0", "train@1"):
        assert (work / fold / "best.pt").is_file() and (work / fold / "tuning.json").is_file()
        assert list((work / fold / "val_probs").glob("*.png"))
        assert 0 <= summary["stages"][fold]["threshold"] <= 1
    assert (work / "ensemble" / "ensemble.json").is_file()
    submission = work / "predict" / "submission.csv"
    assert summary["stages"]["predict"]["rows"] == 2
    assert validate_submission(submission, tianchi_dir / "test_a_samplesubmit.csv") == []
    assert 0 <= score(submission, tianchi_dir / "test_a_mask.csv")["mean_dice"] <= 1
    masks = summary["stages"]["masks"]
    assert masks["images"] == 12 and 0 <= masks["empty_share"] <= 1 and masks["bad_rows"] == 0
    for name in ("masks.csv", "bad_rows.csv", "summary.json", "mosaic.png"):
        assert (work / "masks" / name).is_file()
