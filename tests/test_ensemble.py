"""Ensembles of checkpoints: probabilities averaged over members and TTA views, ensemble files, fold pooling.

Members are the stand-in TinyNet (fast) and conftest's small U-Net; every expected value is computed
independently (each member's own Predictor, a hand-pooled table of made-up tuning scores).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from rsseg.errors import CheckpointError, OutputExistsError
from rsseg.inference.ensemble import members_digest, read_ensemble, read_members, write_ensemble
from rsseg.inference.folds import fold_ensemble
from rsseg.inference.loading import load_model
from rsseg.inference.tta import Predictor
from rsseg.models import create_model, model_config, save_checkpoint
from rsseg.tianchi.files import iter_masks

CPU = torch.device("cpu")


def _tiny(path: Path, seed: int, in_channels: int = 3, **meta: object) -> Path:
    """A TinyNet checkpoint with weights from ``seed`` (the stand_ins fixture makes ``stand_ins`` importable)."""
    from stand_ins import TINY_ARCH

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = create_model(TINY_ARCH, in_channels=in_channels)
    torch.random.set_rng_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, model, model_config(model, arch=TINY_ARCH, in_channels=in_channels, classes=1),
                           meta=meta)


def _mean_probs(paths: list[Path], pixels: torch.Tensor, tta: str) -> torch.Tensor:
    """The mean of each member's own TTA probabilities, computed member by member."""
    probs = [Predictor(load_model(p, CPU).model, CPU, tta)(pixels) for p in paths]
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("tta", ["none", "d4"])
def test_ensemble_probabilities_are_the_mean_of_its_members(tmp_path, stand_ins, tta):
    paths = [_tiny(tmp_path / "a.pt", 1), _tiny(tmp_path / "b.pt", 2)]
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = _mean_probs(paths, pixels, tta)
    alone = [Predictor(load_model(p, CPU).model, CPU, tta)(pixels) for p in paths]
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # two different members
    loaded = load_model(paths, CPU)
    got = Predictor(loaded.model, CPU, tta)(pixels)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert loaded.name == "ensemble of 2" and loaded.in_channels == 3
    assert loaded.digest == members_digest(read_members(paths)) and len(loaded.digest) == 64
    assert [name for name, _ in loaded.members] == [f"{tmp_path.name}/a.pt", f"{tmp_path.name}/b.pt"]


def test_one_checkpoint_in_a_list_is_that_checkpoint(checkpoint):
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    alone, listed = load_model(checkpoint, CPU), load_model([checkpoint], CPU)
    assert torch.equal(Predictor(listed.model, CPU, "flip")(pixels), Predictor(alone.model, CPU, "flip")(pixels))
    assert (listed.digest, listed.name, listed.meta) == (alone.digest, alone.name, alone.meta)


def test_predict_with_two_checkpoints_writes_the_thresholded_mean(tianchi_dir, tmp_path, stand_ins, rsseg_cli):
    test_dir = tianchi_dir / "test_a"
    names = sorted(p.name for p in test_dir.glob("*.jpg"))
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(test_dir / n).convert("RGB")).transpose(2, 0, 1)
                                        for n in names]))
    paths = [_tiny(tmp_path / "a.pt", 1), _tiny(tmp_path / "b.pt", 2)]
    probs = _mean_probs(paths, pixels, "flip").numpy()
    threshold = round(float(np.median(probs)), 4)  # masks of about half the pixels
    # the members' thresholds average to `threshold`; the smallest min_pixels (0) applies
    _tiny(tmp_path / "a.pt", 1, threshold=threshold - 0.01, min_pixels=0)
    _tiny(tmp_path / "b.pt", 2, threshold=threshold + 0.01, min_pixels=50)
    out = tmp_path / "sub.csv"
    done = rsseg_cli("predict", *paths, test_dir, out, "--sample", tianchi_dir / "test_a_samplesubmit.csv",
                     "--tta", "flip", "--device", "cpu")
    assert done.exit_code == 0, done.stderr
    assert "valid" in rsseg_cli("validate", out, tianchi_dir / "test_a_samplesubmit.csv").stdout
    masks = dict(iter_masks(out))
    assert sorted(masks) == names
    for name, prob in zip(names, probs, strict=True):
        clear = np.abs(prob - threshold) > 1e-5  # float rounding may flip pixels right at the threshold
        assert np.array_equal(masks[name][clear], (prob > threshold)[clear])
        assert 0 < masks[name].sum() < masks[name].size


def test_ensemble_file_round_trip(scenes_dir, tmp_path, stand_ins, rsseg_cli):
    paths = [_tiny(tmp_path / "runs" / f"fold{i}" / "best.pt", i, tile_size=256) for i in range(2)]
    meta = {"threshold": 0.55, "min_pixels": 12, "threshold_tta": "d4", "tuned_on": "out-of-fold"}
    ens = write_ensemble(tmp_path / "ens" / "ensemble.json", paths, meta)
    doc = json.loads(ens.read_text())
    assert doc["format"] == "rsseg-ensemble/1" and doc["meta"] == meta
    assert [m["path"] for m in doc["members"]] == ["../runs/fold0/best.pt", "../runs/fold1/best.pt"]
    assert [m["bands"] for m in doc["members"]] == [3, 3] and doc["members"][0]["arch"] == "stand_ins:TinyNet"
    with pytest.raises(OutputExistsError):
        write_ensemble(ens, paths, meta)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "runs", moved / "runs")
    shutil.copytree(tmp_path / "ens", moved / "ens")
    found, found_meta = read_ensemble(moved / "ens" / "ensemble.json")  # relative paths: the tree moves whole
    assert found == [moved / "ens" / "../runs/fold0/best.pt", moved / "ens" / "../runs/fold1/best.pt"]
    assert found_meta == meta
    loaded = load_model(ens, CPU)
    assert loaded.meta == {**meta, "tile_size": 256} and loaded.digest == members_digest(read_members(paths))
    out = tmp_path / "mask.tif"
    done = rsseg_cli("predict", ens, scenes_dir / "scene_000.tif", out, "--tile", "128", "--overlap", "32",
                     "--tta", "none", "--device", "cpu", "--output-kind", "mask")
    assert done.exit_code == 0, done.stderr
    with rasterio.open(out) as src:
        tags = src.tags(ns="rsseg")
    assert tags["threshold"] == "0.55" and tags["checkpoint_sha256"] == loaded.digest
    assert [m["checkpoint"] for m in json.loads(tags["members"])] == ["fold0/best.pt", "fold1/best.pt"]
    _tiny(paths[1], 7, tile_size=256)  # the member changed since the file was written
    with pytest.raises(CheckpointError, match=r"member 2 .*fold1/best.pt changed"):
        load_model(ens, CPU)
    done = rsseg_cli("predict", ens, scenes_dir / "scene_000.tif", tmp_path / "m2.tif", "--device", "cpu")
    assert done.exit_code == 2 and len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "m2.tif").exists()


@pytest.mark.parametrize("other", ["unet", "bands", "tile"])
def test_members_of_different_models_are_refused_in_one_line(other, checkpoint, tianchi_dir, scenes_dir, tmp_path,
                                                             stand_ins, rsseg_cli):
    first = _tiny(tmp_path / "a.pt", 1, tile_size=512)
    second = {"unet": lambda: checkpoint, "bands": lambda: _tiny(tmp_path / "b.pt", 2, in_channels=4),
              "tile": lambda: _tiny(tmp_path / "b.pt", 2, tile_size=256)}[other]()
    what = {"unet": "architecture", "bands": "band count", "tile": "tile size"}[other]
    for inputs, out in ((tianchi_dir / "test_a", tmp_path / "sub.csv"), (scenes_dir / "scene_000.tif",
                                                                          tmp_path / "m.tif")):
        done = rsseg_cli("predict", first, second, inputs, out, "--device", "cpu")
        assert done.exit_code == 2
        assert len(done.stderr.strip().splitlines()) == 1
        assert f"{first} and {second} differ in {what}" in done.stderr
        assert not out.exists() and not list(tmp_path.glob(".*"))  # nothing written, not even a temporary
    with pytest.raises(CheckpointError, match=what):
        write_ensemble(tmp_path / "ensemble.json", [first, second])
    assert not (tmp_path / "ensemble.json").exists()


def test_a_checkpoint_name_where_the_input_should_be_is_one_line(checkpoint, tmp_path, rsseg_cli):
    done = rsseg_cli("predict", checkpoint, checkpoint, tmp_path / "out.tif")
    assert done.exit_code == 2 and "CHECKPOINT... INPUT... OUTPUT" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ fold pooling
#: Made-up out-of-fold scores: (images, {(threshold, min_pixels): mean Dice}). Each fold's own best is another
#: setting, and none of them is the pooled best (0.5, 10).
FOLDS = [
    (10, {(0.4, 0): 0.90, (0.4, 10): 0.70, (0.5, 0): 0.75, (0.5, 10): 0.80, (0.6, 0): 0.60, (0.6, 10): 0.65}),
    (20, {(0.4, 0): 0.70, (0.4, 10): 0.72, (0.5, 0): 0.74, (0.5, 10): 0.86, (0.6, 0): 0.90, (0.6, 10): 0.70}),
    (30, {(0.4, 0): 0.70, (0.4, 10): 0.75, (0.5, 0): 0.76, (0.5, 10): 0.84, (0.6, 0): 0.72, (0.6, 10): 0.88}),
]


def _fold_run(folder: Path, seed: int, images: int, scores: dict, tta: str = "d4", epoch: int = 3) -> Path:
    _tiny(folder / "best.pt", seed, epoch=epoch, threshold=0.5, precision="fp32")
    best = max(scores, key=scores.get)
    (folder / "tuning.json").write_text(json.dumps({
        "tta": tta, "precision": "fp32", "images": images, "thresholds": [0.4, 0.5, 0.6], "min_pixels": [0, 10],
        "scores": [{"threshold": t, "min_pixels": m, "mean_dice": d} for (t, m), d in scores.items()],
        "best": {"threshold": best[0], "min_pixels": best[1], "mean_dice": scores[best]},
        "checkpoint": "best.pt", "checkpoint_epoch": epoch}))
    return folder


def test_fold_ensemble_pools_the_folds_out_of_fold_scores(tmp_path, stand_ins):
    runs = [_fold_run(tmp_path / f"train@{i}", i, n, s) for i, (n, s) in enumerate(FOLDS)]
    ens = fold_ensemble(runs, tmp_path / "ensemble" / "ensemble.json")
    meta = json.loads(ens.read_text())["meta"]
    # by hand: (0.5, 10) pools to (10 * 0.80 + 20 * 0.86 + 30 * 0.84) / 60 = 50.4 / 60; the folds' own bests
    # pool lower: (0.4, 0) 44 / 60, (0.6, 0) 45.6 / 60, (0.6, 10) 46.9 / 60
    assert (meta["threshold"], meta["min_pixels"]) == (0.5, 10)
    assert meta["tuned_dice"] == pytest.approx(50.4 / 60)
    assert meta["tuned_dice_at_0.5"] == pytest.approx((7.5 + 14.8 + 22.8) / 60)
    assert (meta["threshold_tta"], meta["threshold_precision"], meta["precision"]) == ("d4", "fp32", "fp32")
    assert (meta["tuned_on"], meta["folds"], meta["tuned_images"]) == ("out-of-fold", 3, 60)
    own = [(f["run"], f["threshold"], f["min_pixels"], f["dice"]) for f in meta["per_fold"]]
    assert own == [("train@0", 0.4, 0, pytest.approx(0.90)), ("train@1", 0.6, 0, pytest.approx(0.90)),
                   ("train@2", 0.6, 10, pytest.approx(0.88))]
    assert [p.parent.name for p in read_ensemble(ens)[0]] == ["train@0", "train@1", "train@2"]
    loaded = load_model(ens, CPU)
    assert (loaded.meta["threshold"], loaded.meta["min_pixels"]) == (0.5, 10)
    assert loaded.name == "ensemble.json (ensemble of 3)"


def test_fold_ensemble_refuses_untuned_or_mismatched_folds(tmp_path, stand_ins):
    runs = [_fold_run(tmp_path / f"f{i}", i, n, s) for i, (n, s) in enumerate(FOLDS[:2])]
    _fold_run(tmp_path / "f1", 1, *FOLDS[1], tta="none")
    with pytest.raises(CheckpointError, match=r"f1 was tuned with TTA none in fp32, .*f0 with TTA d4"):
        fold_ensemble(runs, tmp_path / "e.json")
    (tmp_path / "f1" / "tuning.json").unlink()
    with pytest.raises(CheckpointError, match="f1: no tuning.json; the run did not finish tuning"):
        fold_ensemble(runs, tmp_path / "e.json")
    _fold_run(tmp_path / "f1", 1, *FOLDS[1], epoch=5)
    _tiny(tmp_path / "f1" / "best.pt", 1, epoch=6)  # trained on after tuning
    with pytest.raises(CheckpointError, match="scored epoch 5 but best.pt is epoch 6"):
        fold_ensemble(runs, tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()


def test_ensemble_stage_then_prediction_in_a_pipeline(tianchi_dir, tmp_path, stand_ins, dask_cluster):
    from distributed import Client

    from rsseg.pipeline.runner import load_pipeline, run

    runs = [_fold_run(tmp_path / "runs" / f"train@{i}", i, n, s) for i, (n, s) in enumerate(FOLDS)]
    spec = {"name": "folds", "workdir": str(tmp_path / "work"), "vars": {"data": str(tianchi_dir)}, "stages": {
        "ensemble": {"uses": "ensemble", "with": {"runs": [str(r) for r in runs]}},
        "predict": {"uses": "predict_tianchi", "with": {
            "checkpoint": "${ensemble}/ensemble.json", "images": "${data}/test_a",
            "sample": "${data}/test_a_samplesubmit.csv", "tta": "none", "device": "cpu"}},
    }}
    with Client(dask_cluster) as client:
        summary = run(load_pipeline(spec), scheduler=client, report=False)
    ensemble = summary["stages"]["ensemble"]
    assert (ensemble["folds"], ensemble["threshold"], ensemble["min_pixels"]) == (3, 0.5, 10)
    assert [f["run"] for f in ensemble["per_fold"]] == ["train@0", "train@1", "train@2"]
    written = tmp_path / "work" / "ensemble" / "ensemble.json"
    assert read_ensemble(written)[1]["tuned_dice"] == pytest.approx(50.4 / 60)
    assert summary["stages"]["predict"]["rows"] == 2
