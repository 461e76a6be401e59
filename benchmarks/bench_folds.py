"""Benchmark: one model against a K-fold ensemble at the same total epochs, both with D4 TTA (issue 16, item 6).

On generated Tianchi data (``rsseg synth tianchi``: ``--train`` training images, ``--test`` test images with
their true masks), with the quick CPU recipe of ``configs/train_tianchi_quick.yaml`` (light U-Net, 256-px
crops, bf16 where the CPU has it):

* **single**: one model trained ``K x E`` epochs on a random 90/10 split; its threshold and ``min_pixels``
  are tuned at the end of training on its validation split with D4 TTA (``run.tune_tta: d4``).
* **folds**: K models of ``E`` epochs each (``data.folds: K``, ``data.fold: k``, stratified by building
  fraction), each tuned with D4 on its own fold; :func:`rsseg.inference.folds.fold_ensemble` pools the K
  folds' scores into the out-of-fold (OOF) setting of ``ensemble.json``.

Scored on the test set: the mean per-image Dice (the competition's score, :func:`rsseg.tianchi.files.score`'s
rule) of the D4-averaged probabilities, for the single model at its validation setting, and for the ensemble
at the OOF setting and at the setting tuned on one validation split (fold 0's own), plus both at threshold
0.5 / no ``min_pixels`` and the best setting on the test set itself (an oracle, for reference only). With
``--check-cli`` the ensemble's submission is also made and scored as a user would (``rsseg predict
fold*.pt...``-equivalent library calls :func:`~rsseg.inference.predict.predict_images` and
:func:`~rsseg.tianchi.files.score`), which must give the same OOF figure.

Quality figures do not depend on the machine's load; the seconds do. Prints one JSON line.

    python benchmarks/bench_folds.py [--train 250] [--test 60] [--folds 5] [--epochs 4] [--work /tmp/rsseg-folds]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rsseg.pipeline.process import configure_process

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "train_tianchi_quick.yaml"


def train(root: Path, out: Path, epochs: int, fold: int | None, folds: int) -> Path:
    """One training run of the recipe (tuned with D4 at the end); resumes a finished run as is."""
    from rsseg.training.config import load_config
    from rsseg.training.launch import fit

    overrides = {"data.root": str(root), "run.out_dir": str(out), "run.epochs": str(epochs), "run.tune_tta": "d4",
                 "run.device": "cpu", "run.progress": "false", "run.resume": "true"}
    if fold is not None:
        overrides |= {"data.folds": str(folds), "data.fold": str(fold)}
    return fit(load_config(RECIPE, overrides))


def test_batches(root: Path, batch: int = 4) -> Any:
    """``(pixels, truth, None)`` batches of the generated test set (``test_a/`` and ``test_a_mask.csv``)."""
    import numpy as np
    import torch
    from PIL import Image

    from rsseg.tianchi.files import read_masks_csv

    with read_masks_csv(root / "test_a_mask.csv") as truth:
        names = list(truth)
        for start in range(0, len(names), batch):
            chunk = names[start : start + batch]
            pixels = np.stack([np.asarray(Image.open(root / "test_a" / n).convert("RGB")).transpose(2, 0, 1)
                               for n in chunk])
            masks = np.stack([truth.mask(n) for n in chunk])[:, None]
            yield torch.from_numpy(pixels), torch.from_numpy(masks.astype(np.float32)), None


def test_scores(model: Any, root: Path, thresholds: list[float], min_pixels: list[int]) -> tuple[dict, float]:
    """Mean per-image test Dice of ``model`` (checkpoint, list or ensemble.json) with D4, per setting; seconds."""
    import torch

    from rsseg.inference.loading import load_model
    from rsseg.inference.tta import Predictor
    from rsseg.inference.tuned import inference_precision
    from rsseg.training.tuning import tune

    device = torch.device("cpu")
    loaded = load_model(model, device)
    precision = inference_precision("auto", loaded.meta, device)
    start = time.perf_counter()
    scores = tune(Predictor(loaded.model, device, "d4", precision), test_batches(root), thresholds, min_pixels)
    return scores.scores(), time.perf_counter() - start


def at(scores: dict, meta: dict[str, Any]) -> float:
    return round(scores[(round(float(meta["threshold"]), 6), int(meta["min_pixels"]))], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=250, help="generated training images")
    parser.add_argument("--test", type=int, default=60, help="generated test images (with true masks)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fold (the single model gets folds x this)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rsseg-folds"),
                        help="data and runs (kept: a rerun resumes them)")
    parser.add_argument("--check-cli", action="store_true", help="also predict and score the ensemble's submission")
    args = parser.parse_args()
    configure_process()  # the settings `rsseg train` / `rsseg predict` start with
    from rsseg.inference import fold_ensemble
    from rsseg.models import load_checkpoint
    from rsseg.synth.generate import make_tianchi
    from rsseg.training.config import load_config

    root = args.work / "tianchi"
    if not (root / "train_mask.csv").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_tianchi(root, n_train=args.train, n_test=args.test, seed=0, progress=False)
    run_cfg = load_config(RECIPE, {"data.root": str(root)}).run
    grid = (list(run_cfg.thresholds), list(run_cfg.min_pixels))
    start = time.perf_counter()
    single = train(root, args.work / "single", args.folds * args.epochs, None, args.folds)
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    runs = [train(root, args.work / f"fold{k}", args.epochs, k, args.folds).parent for k in range(args.folds)]
    folds_s = time.perf_counter() - start
    ensemble = fold_ensemble(runs, args.work / "ensemble" / "ensemble.json", overwrite=True)
    ens_meta = json.loads(ensemble.read_text())["meta"]
    one_split = json.loads((runs[0] / "tuning.json").read_text())["best"]
    single_meta = load_checkpoint(single)["meta"]
    single_scores, single_pred_s = test_scores(single, root, *grid)
    ens_scores, ens_pred_s = test_scores(ensemble, root, *grid)
    result = {
        "benchmark": "folds", "train_images": args.train, "test_images": args.test, "folds": args.folds,
        "epochs_per_fold": args.epochs, "single_epochs": args.folds * args.epochs, "tta": "d4",
        "single_test_dice": at(single_scores, single_meta),
        "ensemble_test_dice_oof_tuned": at(ens_scores, ens_meta),
        "ensemble_test_dice_one_split_tuned": at(ens_scores, one_split),
        "ensemble_gain": round(at(ens_scores, ens_meta) - at(single_scores, single_meta), 4),
        "oof_tuning_gain": round(at(ens_scores, ens_meta) - at(ens_scores, one_split), 4),
        "single_test_dice_at_0.5": round(single_scores[(0.5, 0)], 4),
        "ensemble_test_dice_at_0.5": round(ens_scores[(0.5, 0)], 4),
        "single_test_best_oracle": round(max(single_scores.values()), 4),
        "ensemble_test_best_oracle": round(max(ens_scores.values()), 4),
        "single_test_best_setting": list(max(single_scores, key=single_scores.get)),
        "ensemble_test_best_setting": list(max(ens_scores, key=ens_scores.get)),
        "single_setting": [single_meta["threshold"], single_meta["min_pixels"], single_meta.get("threshold_tta")],
        "oof_setting": [ens_meta["threshold"], ens_meta["min_pixels"], ens_meta["threshold_tta"]],
        "one_split_setting": [one_split["threshold"], one_split["min_pixels"]],
        "oof_dice": round(ens_meta["tuned_dice"], 4), "single_val_dice_d4": round(single_meta["tuned_dice"], 4),
        "train_s": {"single": round(single_s, 1), "folds": round(folds_s, 1)},
        "test_predict_s": {"single": round(single_pred_s, 1), "ensemble": round(ens_pred_s, 1)},
    }
    if args.check_cli:
        from rsseg.inference.predict import predict_images
        from rsseg.tianchi.files import score

        sub = predict_images(ensemble, root / "test_a", args.work / "ensemble" / "submission.csv", tta="d4",
                             overwrite=True)
        result["ensemble_cli_score"] = round(score(sub, root / "test_a_mask.csv")["mean_dice"], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
