"""The end-of-training tuning: best.pt's threshold and min_pixels chosen with the prediction's TTA and precision."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import TINY_ARCH

from rsseg.inference.tta import Predictor
from rsseg.inference.tuned import tuned_with
from rsseg.metrics import mean_image_dice
from rsseg.models import load_checkpoint, model_from_checkpoint
from rsseg.training.config import load_config
from rsseg.training.datasets import TianchiDataset
from rsseg.training.launch import fit
from rsseg.training.tuning import probs_file_names

THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7]
MIN_PIXELS = [0, 16, 64, 256]


def tiny_config(root, out, **run):
    """3 validation images; fp32, so that the checkpoint's precision is the one predicted in on any CPU.

    Three epochs take the tiny network past empty predictions: the settings score differently.
    """
    return {"data": {"source": "tianchi", "root": str(root), "batch_size": 4, "val_fraction": 0.3,
                     "val_batch_size": 2, "augment": {"crop": 128}},
            "model": {"arch": TINY_ARCH},
            "optim": {"lr": 0.05, "warmup_fraction": 0.0},
            "run": {"out_dir": str(out), "epochs": 3, "progress": False, "device": "cpu", "precision": "fp32",
                    "thresholds": THRESHOLDS, "min_pixels": MIN_PIXELS, **run}}


@pytest.fixture(scope="module")
def tuned_run(tianchi, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "run"
    fit(load_config(tiny_config(tianchi, out, tune_tta="d4", keep_val_probs=True)))
    return out


def _val_items(run):
    with open(run / "split.csv", newline="") as fh:
        return [row["item"] for row in csv.DictReader(fh) if row["side"] == "val"]


def _recomputed(tianchi, run, tta):
    """Validation probabilities of best.pt with ``tta`` (fp32) and every setting's mean Dice, by hand."""
    model, _ = model_from_checkpoint(run / "best.pt")
    val = TianchiDataset(tianchi, "val", val_fraction=0.3)
    assert val.names == sorted(_val_items(run))
    items = [val[i] for i in range(len(val))]
    predictor = Predictor(model, torch.device("cpu"), tta, "fp32")
    probs = predictor(torch.stack([item["image"] for item in items])).numpy()
    truth = np.stack([item["mask"][0].numpy() > 0 for item in items])
    scores = {}
    for t in THRESHOLDS:
        for m in MIN_PIXELS:
            pred = probs > t
            pred[pred.sum((1, 2)) < m] = False
            scores[(t, m)] = mean_image_dice(pred, truth)
    return val.names, probs, scores


def test_best_pt_is_tuned_with_the_tta_and_its_scores_are_in_tuning_json(tianchi, tuned_run):
    ckpt = load_checkpoint(tuned_run / "best.pt")
    meta = ckpt["meta"]
    assert meta["threshold_tta"] == "d4" and meta["threshold_precision"] == "fp32" == meta["precision"]
    assert tuned_with(meta) == ("d4", "fp32")
    assert meta["val_threshold"] in THRESHOLDS and meta["val_min_pixels"] in MIN_PIXELS  # single view, kept
    last = load_checkpoint(tuned_run / "last.pt")["meta"]
    if last["epoch"] == meta["epoch"]:
        assert (meta["val_threshold"], meta["val_min_pixels"]) == (last["threshold"], last["min_pixels"])

    _, _, scores = _recomputed(tianchi, tuned_run, "d4")
    best = max(scores, key=lambda k: (scores[k], -k[1], -abs(k[0] - 0.5)))  # ThresholdDice.best's ties
    assert (meta["threshold"], meta["min_pixels"]) == best
    assert meta["tuned_dice"] == pytest.approx(scores[best], abs=1e-6) and meta["tuned_images"] == 3

    record = json.loads((tuned_run / "tuning.json").read_text())
    assert {k: record[k] for k in ("tta", "precision", "images", "thresholds", "min_pixels", "checkpoint")} == {
        "tta": "d4", "precision": "fp32", "images": 3, "thresholds": THRESHOLDS, "min_pixels": MIN_PIXELS,
        "checkpoint": "best.pt"}
    assert record["checkpoint_epoch"] == meta["epoch"] == meta["best_epoch"]
    assert record["best"] == {"threshold": meta["threshold"], "min_pixels": meta["min_pixels"],
                              "mean_dice": meta["tuned_dice"]}
    got = {(s["threshold"], s["min_pixels"]): s["mean_dice"] for s in record["scores"]}
    assert set(got) == set(scores)  # 0.5 and 0 are in the grid: no extra reference setting
    for key, value in scores.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert not list(tuned_run.glob(".*"))  # no temporaries left


def test_kept_validation_probabilities_are_the_recomputed_ones(tianchi, tuned_run):
    names, probs, _ = _recomputed(tianchi, tuned_run, "d4")
    files = sorted(p.name for p in (tuned_run / "val_probs").iterdir())
    assert files == sorted(f"{name}.png" for name in names)
    assert json.loads((tuned_run / "tuning.json").read_text())["val_probs"] == {f"{n}.png": n for n in names}
    for name, prob in zip(names, probs, strict=True):
        with Image.open(tuned_run / "val_probs" / f"{name}.png") as img:
            kept = np.asarray(img)
        assert kept.dtype == np.uint8 and kept.shape == (512, 512)
        assert np.abs(kept / 255.0 - prob).max() <= 1 / 255 + 1e-6


def test_predicting_with_the_tuned_tta_logs_no_mismatch(tuned_run, tianchi, tmp_path, rsseg_cli, caplog):
    args = ["predict", tuned_run / "best.pt", tianchi / "train", "--device", "cpu", "--precision", "auto"]
    with caplog.at_level("INFO", logger="rsseg.inference.tuned"):
        assert rsseg_cli(*args, tmp_path / "d4.csv", "--tta", "d4").exit_code == 0
    assert "was tuned with" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="rsseg.inference.tuned"):
        assert rsseg_cli(*args, tmp_path / "none.csv", "--tta", "none").exit_code == 0
    assert "was tuned with TTA d4 in fp32; predicting with TTA none in fp32" in caplog.text


def test_a_resumed_run_tunes_once(tuned_run, tianchi, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(tuned_run, out)
    before = (out / "tuning.json").read_bytes(), (out / "best.pt").stat().st_mtime_ns
    cfg = load_config(tiny_config(tianchi, out, tune_tta="d4", keep_val_probs=True, resume=True))
    with caplog.at_level("INFO", logger="rsseg.training.tuning"):
        assert fit(cfg) == out / "best.pt"
    assert "tuned best.pt" not in caplog.text
    assert ((out / "tuning.json").read_bytes(), (out / "best.pt").stat().st_mtime_ns) == before

    # all epochs done but the tuning not (e.g. killed during it): the resumed run tunes, keeping single-view values
    (out / "tuning.json").unlink()
    shutil.rmtree(out / "val_probs")
    single = load_checkpoint(out / "best.pt")["meta"]
    with caplog.at_level("INFO", logger="rsseg.training.tuning"):
        fit(cfg)
    assert "tuned best.pt" in caplog.text and (out / "val_probs").is_dir()
    meta = load_checkpoint(out / "best.pt")["meta"]
    assert json.loads((out / "tuning.json").read_bytes()) == json.loads(before[0])
    assert {k: meta[k] for k in ("val_threshold", "val_min_pixels", "threshold", "min_pixels")} == {
        k: single[k] for k in ("val_threshold", "val_min_pixels", "threshold", "min_pixels")}

    # a run started afresh over the folder: its new best.pt is tuned, whatever the old tuning.json says
    caplog.clear()
    with caplog.at_level("INFO", logger="rsseg.training.tuning"):
        fit(load_config(tiny_config(tianchi, out, tune_tta="d4", overwrite=True, seed=1)))
    assert "tuned best.pt" in caplog.text and not (out / "val_probs").exists()  # not kept this time
    record = json.loads((out / "tuning.json").read_bytes())
    assert record["best"]["mean_dice"] == load_checkpoint(out / "best.pt")["meta"]["tuned_dice"]


def test_stopping_early_does_not_tune_and_tta_none_is_the_single_view_choice(tianchi, tmp_path):
    out = tmp_path / "none"
    fit(load_config(tiny_config(tianchi, out, tune_tta="none", stop_after=1)))
    assert not (out / "tuning.json").exists() and "threshold_tta" not in load_checkpoint(out / "best.pt")["meta"]
    fit(load_config(tiny_config(tianchi, out, tune_tta="none", resume=True)))
    meta = load_checkpoint(out / "best.pt")["meta"]
    assert tuned_with(meta) == ("none", "fp32") and not (out / "val_probs").exists()
    assert (meta["threshold"], meta["min_pixels"]) == (meta["val_threshold"], meta["val_min_pixels"])
    assert meta["tuned_dice"] == pytest.approx(meta["val_dice"], abs=1e-6)
    _, _, scores = _recomputed(tianchi, out, "none")
    assert scores[(meta["threshold"], meta["min_pixels"])] == pytest.approx(meta["val_dice"], abs=1e-6)


def test_probability_file_names_are_safe_and_unique():
    assert probs_file_names(["a.jpg", "b.jpg"]) == ["a.jpg.png", "b.jpg.png"]
    assert probs_file_names(["/w/chips/s1/img/0_0.tif", "/w/chips/s2/img/0_0.tif"]) == [
        "s1_img_0_0.tif.png", "s2_img_0_0.tif.png"]
    assert probs_file_names(["/w/img/a b.tif", "/w/img/a_b.tif", "/w/img/.x"]) == [
        "a_b.tif.png", "a_b.tif-1.png", "x.png"]


@pytest.mark.slow  # torchrun with two gloo processes
def test_two_ddp_ranks_tune_once_on_rank_0(tianchi, tmp_path, stand_ins):
    from rsseg.training.launch import launch

    out = tmp_path / "ddp"
    best = launch(tiny_config(tianchi, out, tune_tta="flip", keep_val_probs=True, epochs=1), nproc=2)
    meta = load_checkpoint(best)["meta"]
    assert meta["world_size"] == 2 and tuned_with(meta) == ("flip", "fp32")
    record = json.loads((out / "tuning.json").read_text())
    assert record["images"] == 3 and record["best"]["mean_dice"] == meta["tuned_dice"]
    assert len(list((out / "val_probs").glob("*.png"))) == 3 and not list(out.glob(".*"))
