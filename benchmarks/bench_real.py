"""Real-data benchmark: SpaceNet-1 Rio, train on 10 tiles, tile -> predict -> vectorize -> evaluate on the other 5.

Everything goes through the library API: ``rsseg.tiling.write_chips`` with the mask rasters as labels,
``rsseg.training`` (``load_config`` + ``fit``, ``data.source: chips``) on the CPU for ``--epochs`` epochs,
``rsseg.inference.predict_raster`` on each held-out tile, ``rsseg.vector.vectorize`` / ``write_vectors``
and ``rsseg.vector.evaluate_vectors`` against truth polygons vectorised from the held-out masks.

Prints one JSON line: pixel IoU and Dice over the 5 held-out tiles (pixels pooled), object precision,
recall and F1 (SpaceNet's rule: a match needs IoU >= 0.5; polygons under 20 pixels, converted to m2 at the
tiles' ground sampling distance, are left out on both sides), epochs and seconds per phase, and a baseline
scored in the same run: an all-background prediction (what a model that never says "building" gets).

Split: the 15 tiles sorted by name, every third one from the third (img52, img55, img58, img61, img64: three
with buildings, two empty) held out; the other 10 train (chips of 256 px, 64 px overlap; validation on chips
of one training tile, chosen by the chips source's split).

Data: ``--data``, else ``$RSSEG_REALDATA``, else ``shared/realdata/spacenet1_rio`` beside the repository (or
beside its folder of worktrees). Absent data: prints ``{"benchmark": "real", "skipped": "..."}`` and exits 0.

Usage: PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_real.py [--epochs 25] [--data DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACENET_MIN_PIXELS = 20  # SpaceNet-2 scoring leaves out buildings under 20 pixels


def find_data(arg: str | None) -> Path | None:
    """``--data``, ``$RSSEG_REALDATA``, or ``shared/realdata/spacenet1_rio`` beside the repository."""
    if arg:
        return Path(arg)
    if os.environ.get("RSSEG_REALDATA"):
        return Path(os.environ["RSSEG_REALDATA"])
    for parent in (REPO.parent, REPO.parent.parent):
        candidate = parent / "shared" / "realdata" / "spacenet1_rio"
        if (candidate / "images").is_dir():
            return candidate
    return None


def split(data: Path) -> tuple[list[Path], list[Path]]:
    """(train, held-out) image paths: every third tile from the third is held out (5 of 15)."""
    images = sorted((data / "images").glob("*.tif"))
    held = images[2::3]
    return [p for p in images if p not in held], held


def mask_of(image: Path) -> Path:
    return image.parent.parent / "masks" / image.name


def pixel_m2(path: Path) -> float:
    """Ground area of one pixel in m2 (geographic CRSs through the local scale at the tile's centre)."""
    import rasterio

    with rasterio.open(path) as src:
        dx, dy = abs(src.transform.a), abs(src.transform.e)
        if not src.crs.is_geographic:
            return dx * dy
        lat = math.radians((src.bounds.top + src.bounds.bottom) / 2)
    # metres per degree (WGS84, first terms of the series)
    m_lat = 111132.92 - 559.82 * math.cos(2 * lat) + 1.175 * math.cos(4 * lat)
    m_lon = 111412.84 * math.cos(lat) - 93.5 * math.cos(3 * lat)
    return dx * m_lon * dy * m_lat


def tile_training(train: list[Path], out: Path) -> tuple[list[Path], int]:
    """Chips of 256 px with their label chips (the masks read as class maps); (chip folders, chip count)."""
    from rsseg.tiling import write_chips

    folders, chips = [], 0
    for image in train:
        folder = out / image.stem  # the masks' nodata=0 is their background: rsseg logs one warning a tile
        index = write_chips(image, folder, size=256, overlap=64, labels=mask_of(image))
        chips += len(index.read_text().splitlines()) - 1
        folders.append(folder)
    return folders, chips


def train_model(folders: list[Path], out: Path, epochs: int, encoder: str) -> Path:
    """A light U-Net trained from scratch on the chips, on the CPU; returns best.pt."""
    from rsseg.training import fit, load_config

    cfg = load_config({
        "data": {"source": "chips", "chips": [str(f) for f in folders], "val_fraction": 0.1, "seed": 0,
                 "batch_size": 8, "val_batch_size": 8,
                 "augment": {"d4": True, "crop": None, "brightness": 0.1, "contrast": 0.1, "saturation": 0.1}},
        "model": {"arch": "unet", "encoder": encoder, "encoder_weights": None,
                  "kwargs": {"decoder_channels": [128, 64, 32, 16, 8]}},
        "optim": {"lr": 3.0e-3, "weight_decay": 1.0e-4, "warmup_fraction": 0.05},
        "run": {"out_dir": str(out), "epochs": epochs, "device": "cpu", "precision": "auto", "progress": False,
                "seed": 0},
    })
    return fit(cfg)


def pixel_counts(pred: Path | None, truth: Path) -> tuple[int, int, int]:
    """(intersection, predicted, true) building pixel counts of one tile; ``pred`` None: all background."""
    import numpy as np
    import rasterio

    with rasterio.open(truth) as src:
        t = src.read(1) > 0
    if pred is None:
        return 0, 0, int(t.sum())
    with rasterio.open(pred) as src:
        p = src.read(1) > 0
    return int(np.logical_and(p, t).sum()), int(p.sum()), int(t.sum())


def pixel_scores(counts: list[tuple[int, int, int]]) -> dict:
    inter, pred, true = (sum(c[i] for c in counts) for i in range(3))
    union = pred + true - inter
    return {"pixel_iou": round(inter / union, 4) if union else 1.0,
            "pixel_dice": round(2 * inter / (pred + true), 4) if pred + true else 1.0}


def object_scores(pred, truth, min_area: float) -> dict:
    """SpaceNet-rule object scores of the pooled polygons (IoU >= 0.5, polygons under ``min_area`` m2 left out)."""
    from rsseg.vector import evaluate_vectors

    result = evaluate_vectors(pred, truth, iou=0.5, min_area=min_area)
    return {key: (round(result[key], 4) if isinstance(result[key], float) else result[key])
            for key in ("precision", "recall", "f1", "tp", "fp", "fn", "n_pred", "n_truth")}


def predict_held_out(held: list[Path], checkpoint: Path, out: Path) -> tuple[list, list, list]:
    """Predict, vectorise and write each held-out tile; (pixel counts, predicted polygons, truth polygons)."""
    from rsseg.inference import predict_raster, prob_path
    from rsseg.vector import vectorize, write_vectors

    counts, preds, truths = [], [], []
    for image in held:
        mask = predict_raster(checkpoint, image, out / f"{image.stem}_mask.tif", window=256, overlap=64,
                              tta="none", device="cpu")
        polygons = vectorize(mask, prob=prob_path(mask))
        write_vectors(polygons, out / f"{image.stem}.gpkg")
        counts.append(pixel_counts(mask, mask_of(image)))
        preds.append(polygons.assign(tile=image.stem))
        truths.append(vectorize(mask_of(image)).assign(tile=image.stem))
    return counts, preds, truths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the spacenet1_rio folder (default: $RSSEG_REALDATA or ../shared/realdata)")
    parser.add_argument("--epochs", type=int, default=25, help="training epochs (default 25: ~5 min on 2 cores)")
    parser.add_argument("--encoder", default="mobilenet_v2", help="smp encoder of the U-Net (random init)")
    parser.add_argument("--keep", help="write chips, run and outputs here instead of a temporary folder")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, data: Path, work: Path) -> dict:
    import geopandas as gpd
    import pandas as pd

    train, held = split(data)
    min_area = round(SPACENET_MIN_PIXELS * pixel_m2(held[0]), 2)
    times, start = {}, time.perf_counter()
    folders, n_chips = tile_training(train, work / "chips")
    times["tile_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    checkpoint = train_model(folders, work / "run", args.epochs, args.encoder)
    times["train_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    (work / "out").mkdir()
    counts, preds, truths = predict_held_out(held, checkpoint, work / "out")
    times["predict_vectorize_s"] = round(time.perf_counter() - start, 1)
    crs = truths[0].crs
    pred_all = gpd.GeoDataFrame(pd.concat(preds, ignore_index=True), geometry="geometry", crs=crs)
    truth_all = gpd.GeoDataFrame(pd.concat(truths, ignore_index=True), geometry="geometry", crs=crs)
    empty = truth_all.iloc[0:0]
    model = {**pixel_scores(counts), **object_scores(pred_all, truth_all, min_area)}
    baseline = {**pixel_scores([pixel_counts(None, mask_of(p)) for p in held]),
                **object_scores(empty, truth_all, min_area)}
    return {"benchmark": "real", "data": "SpaceNet-1 Rio (CC BY-SA 4.0)",
            "train_tiles": [p.stem.rsplit("_", 1)[-1] for p in train],
            "held_out_tiles": [p.stem.rsplit("_", 1)[-1] for p in held], "train_chips": n_chips,
            "model": f"unet/{args.encoder} random init", "epochs": args.epochs,
            "rule": f"object IoU >= 0.5, polygons under {SPACENET_MIN_PIXELS} px = {min_area} m2 left out",
            "min_area_m2": min_area, **model, "baseline_all_background": baseline, **times,
            "seconds": round(sum(times.values()), 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = find_data(args.data)
    if data is None or not (data / "images").is_dir() or not (data / "masks").is_dir():
        print(json.dumps({"benchmark": "real", "skipped": (
            f"SpaceNet-1 Rio tiles not found ({data or '../shared/realdata/spacenet1_rio'}): pass --data DIR or "
            "set RSSEG_REALDATA to the spacenet1_rio folder (images/ and masks/)")}))
        return 0
    from rsseg.pipeline.process import configure_process

    configure_process()  # an entry point: threads, allocator and GDAL cache are set here, not by the library
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=False)
        result = run(args, data, work)
    else:
        with tempfile.TemporaryDirectory(prefix="rsseg-bench-real-") as tmp:
            result = run(args, data, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
