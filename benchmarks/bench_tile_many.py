"""Benchmark of ``rsseg tile`` over many small scenes: one call for all of them against one call per scene.

Issue 14 item 10: real datasets are folders of hundreds or thousands of small scenes, and one ``rsseg tile``
per scene is mostly start-up (Python and GDAL imports, a LocalCluster each time). Prints one JSON line.

Scenes: ``--scenes`` (64) generated ``--size`` (256) px 3-band uint8 GeoTIFFs (random pixels, UTM), cut
into ``--chip`` (128) px chips without overlap. Each run is a subprocess, the command as a user types it
(``python -m rsseg.cli`` is the console script's entry point), with the default scheduler (a LocalCluster
of its own) unless ``--scheduler`` is given:

- ``one_call_s``: ``rsseg tile DIR OUT`` once over every scene (``OUT/<stem>/`` per scene);
- ``single_calls_s``: ``rsseg tile SCENE OUT_i`` once per scene; with ``--singles K`` only the first K
  scenes are run and the time is scaled to all of them (``single_calls_measured``);
- ``library_s``: :func:`rsseg.tiling.write_chips` in this process, scene after scene, without executor (the
  work itself, without start-up or cluster);
- ``per_scene_overhead_s``: ``(one_call_s - library_s) / scenes``, what the one-call run adds to the work per
  scene (start-up and cluster amortised; target < 0.3 s); ``speedup``: ``single_calls_s / one_call_s``.

Figures from a loaded machine are upper bounds: run it on a quiet one for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from rsseg.tiling import write_chips


def make_scenes(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` random ``size`` x ``size`` 3-band uint8 GeoTIFFs in EPSG:32650 (0.3 m pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"scene_{i:04d}.tif"
        transform = Affine(0.3, 0, 500_000 + i * size * 0.3, 0, -0.3, 4_000_000)
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                           crs="EPSG:32650", transform=transform) as dst:
            dst.write(rng.integers(0, 256, (3, size, size), dtype=np.uint8))
        paths.append(path)
    return paths


def rsseg_tile(inputs: list[Path], out: Path, chip: int, scheduler: str | None) -> float:
    """Seconds one ``rsseg tile`` subprocess takes (it must succeed)."""
    cmd = [sys.executable, "-m", "rsseg.cli", "tile", *map(str, inputs), str(out), "--size", str(chip),
           "--overlap", "0", *(["--scheduler", scheduler] if scheduler else [])]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=64, help="number of scenes (default 64)")
    parser.add_argument("--size", type=int, default=256, help="scene size in px (default 256)")
    parser.add_argument("--chip", type=int, default=128, help="chip size in px (default 128)")
    parser.add_argument("--singles", type=int, default=None, help="single calls to time (default: every scene)")
    parser.add_argument("--scheduler", default=None, help="passed to rsseg tile (default: its LocalCluster)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rsseg-bench-tile-many-"))
    try:
        scenes = make_scenes(root / "scenes", args.scenes, args.size)
        start = time.perf_counter()
        for scene in scenes:
            write_chips(scene, root / "library" / scene.stem, size=args.chip, overlap=0)
        library_s = time.perf_counter() - start
        one_call_s = rsseg_tile([root / "scenes"], root / "one", args.chip, args.scheduler)
        assert sorted(p.name for p in (root / "one").iterdir()) == [s.stem for s in scenes]
        singles = scenes[:args.singles or len(scenes)]
        single_s = sum(rsseg_tile([s], root / "single" / s.stem, args.chip, args.scheduler) for s in singles)
        single_calls_s = single_s * len(scenes) / len(singles)
        print(json.dumps({
            "scenes": len(scenes), "scene_px": args.size, "chip_px": args.chip, "scheduler": args.scheduler,
            "cpus": os.cpu_count(), "library_s": round(library_s, 2), "one_call_s": round(one_call_s, 2),
            "single_calls_s": round(single_calls_s, 2), "single_calls_measured": len(singles),
            "one_call_per_scene_s": round(one_call_s / len(scenes), 3),
            "single_call_per_scene_s": round(single_s / len(singles), 3),
            "per_scene_overhead_s": round((one_call_s - library_s) / len(scenes), 3),
            "speedup": round(single_calls_s / one_call_s, 1)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
