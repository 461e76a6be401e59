"""Benchmark: Tianchi RLE decode/encode against the competition notebook's reference code.

Realistic masks (10-30% building pixels, hundreds to thousands of runs), the same masks for both, outputs
checked equal; then the rows of a 30,000-row ``train_mask.csv`` decoded on one core. Prints one JSON line.

    python benchmarks/bench_rle.py [--masks 1000] [--rows 30000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from rsseg.tianchi.files import iter_masks, write_mask_csv
from rsseg.tianchi.rle import decode, encode


def reference_encode(im: np.ndarray) -> str:
    """The competition notebook's encoder: flatten in 'F' order, find changes, join with str()."""
    pixels = im.flatten(order="F")
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def reference_decode(mask_rle: str, shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """The competition notebook's decoder: split the string, loop over runs assigning slices."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends, strict=True):
        img[lo:hi] = 1
    return img.reshape(shape, order="F")


def realistic_masks(n: int, seed: int = 0) -> list[np.ndarray]:
    """Masks of rotated-ish buildings covering 10-30% of a 512x512 tile (hundreds to thousands of runs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512]
    masks = []
    for _ in range(n):
        target = rng.uniform(0.10, 0.30)
        mask = np.zeros((512, 512), bool)
        while mask.mean() < target:
            cy, cx = rng.uniform(0, 512, 2)
            h, w = rng.uniform(15, 90, 2)
            angle = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            mask |= (np.abs(u) < w / 2) & (np.abs(v) < h / 2)
        masks.append(mask.astype(np.uint8))
    return masks


def _per_item(fn, items, repeats: int = 3) -> float:  # noqa: ANN001 - a timing helper
    """Seconds per item, the best of ``repeats`` passes over all items (as timeit reports)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=30000)
    args = parser.parse_args()
    masks = realistic_masks(args.masks)
    codes = [reference_encode(m) for m in masks]
    assert all(encode(m) == c for m, c in zip(masks, codes, strict=True)), "encode differs from the reference"
    assert all(np.array_equal(decode(c), reference_decode(c)) for c in codes), "decode differs from the reference"
    runs = np.array([len(c.split()) // 2 for c in codes])

    t_dec, t_dec_ref = _per_item(decode, codes), _per_item(reference_decode, codes)
    t_enc, t_enc_ref = _per_item(encode, masks), _per_item(reference_encode, masks)

    with tempfile.TemporaryDirectory() as tmp:
        csv = write_mask_csv(((f"{i:010d}.jpg", codes[i % len(codes)] if i % 7 else "") for i in range(args.rows)),
                             Path(tmp) / "train_mask.csv")
        with open(csv, "rb") as fh:  # a file at rest, as a downloaded train_mask.csv is: not being written back
            os.fsync(fh.fileno())
        start = time.perf_counter()
        n = sum(1 for _ in iter_masks(csv))
        t_csv = time.perf_counter() - start
        csv_mb = csv.stat().st_size / 1e6

    print(json.dumps({
        "benchmark": "rle", "masks": len(masks), "identical_to_reference": True,
        "runs_per_mask": {"min": int(runs.min()), "median": int(np.median(runs)), "max": int(runs.max())},
        "decode_us": round(t_dec * 1e6, 1), "decode_reference_us": round(t_dec_ref * 1e6, 1),
        "decode_speedup": round(t_dec_ref / t_dec, 2), "decode_masks_per_s": round(1 / t_dec),
        "encode_us": round(t_enc * 1e6, 1), "encode_reference_us": round(t_enc_ref * 1e6, 1),
        "encode_speedup": round(t_enc_ref / t_enc, 2), "encode_masks_per_s": round(1 / t_enc),
        "csv_rows": n, "csv_mb": round(csv_mb, 1), "csv_decode_s": round(t_csv, 2),
        "targets": {"decode_speedup": 3, "encode_speedup": 3, "csv_decode_s": 3},
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
