"""Training throughput: images/s of training steps (per model and precision) and of the data loader.

Prints one JSON line. The baseline is the issue's reference setting, a resnet34 U-Net at 256x256, batch 8,
fp32 (measured by the issue author at ~3.9 images/s on 2 CPU cores); it is compared with bf16 autocast +
channels_last and with the fast CPU recipe of configs/train_tianchi.yaml. On a CUDA machine the same script
measures the GPU (bf16 + channels_last is what `rsseg train` uses there). The loader figure is the
TianchiDataset + TrainTransform (256 crop, D4, photometric) through a DataLoader on generated tiles, so the
two figures show which one limits training.

Usage: .venv/bin/python benchmarks/bench_train.py [--steps 3] [--device auto] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from rsseg.models import create_model
from rsseg.pipeline.process import configure_process
from rsseg.synth.generate import make_tianchi
from rsseg.training.augment import TrainTransform
from rsseg.training.datasets import TianchiDataset
from rsseg.training.launch import resolve_device
from rsseg.training.losses import DiceBCELoss

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "train_tianchi.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(model_kwargs: dict, device: torch.device, bf16: bool, channels_last: bool, size: int, batch: int,
               steps: int) -> float:
    """Images/s of full training steps (forward, Dice+BCE loss, backward, AdamW) on a fixed random batch."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(**model_kwargs).to(device, memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = DiceBCELoss()
    image = (torch.rand(batch, 3, size, size, device=device) * 255).contiguous(memory_format=fmt)
    mask = (torch.rand(batch, 1, size, size, device=device) > 0.8).float()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            logits = model(image)
        loss = criterion(logits, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, oneDNN/cuDNN kernel choice
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def loader_rate(root: Path, batch: int, workers: int, batches: int) -> float:
    """Images/s delivered by the training DataLoader (JPEG decode, RLE decode, crop, D4, photometric)."""
    transform = TrainTransform(crop=256, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)
    dataset = TianchiDataset(root, "all", transform=transform)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    n, start = 0, time.perf_counter()
    while n < batches * batch:
        for item in loader:
            n += item["image"].shape[0]
            if n >= batches * batch:
                break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the loader figure")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    configure_process()  # the process settings `rsseg train` starts with
    device = resolve_device(args.device)
    recipe = yaml.safe_load(RECIPE.read_text())["model"]
    recipe_kwargs = {"arch": recipe["arch"], "encoder": recipe["encoder"], **recipe.get("kwargs", {})}
    baseline = {"arch": "unet", "encoder": "resnet34"}
    settings = {
        "resnet34_fp32": (baseline, False, False),
        "resnet34_bf16_channels_last": (baseline, True, True),
        "recipe_fp32": (recipe_kwargs, False, False),
        "recipe_bf16_channels_last": (recipe_kwargs, True, True),
    }
    rates = {name: round(train_rate(kw, device, bf16, cl, 256, args.batch, args.steps), 3)
             for name, (kw, bf16, cl) in settings.items()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tianchi"
        make_tianchi(root, n_train=4 * args.batch, n_test=0, seed=0, progress=False)
        loader = round(loader_rate(root, args.batch, args.workers, batches=8), 2)
    best = max(rates.values())
    print(json.dumps({
        "device": str(device), "cpu_threads": torch.get_num_threads(), "size": 256, "batch": args.batch,
        "recipe": recipe_kwargs, "train_images_per_s": rates, "baseline": "resnet34_fp32",
        "ratios_to_baseline": {k: round(v / rates["resnet34_fp32"], 2) for k, v in rates.items()},
        "loader_images_per_s": loader, "loader_workers": args.workers,
        "loader_to_fastest_train_ratio": round(loader / best, 2),
        "limit": "loader" if loader < best else "model", "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
