"""Benchmark: Dask scheduling overhead of the scene pipeline (predict -> vectorize) against direct calls.

The same stage work is done twice on the same generated scenes: once by ``rsseg.pipeline.run`` on a
LocalCluster of one single-threaded worker (started beforehand; its start-up is reported separately), and
once by calling the library functions directly in this process, one after the other. The overhead is
``(pipeline - direct) / pipeline``. Prints one JSON line.

    python benchmarks/bench_pipeline.py [--size 2048] [--scenes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from distributed import Client, LocalCluster

from rsseg.inference import predict_raster
from rsseg.models import create_model, model_config, save_checkpoint
from rsseg.pipeline import load_pipeline, run
from rsseg.synth import make_scene
from rsseg.vectorize import vectorize_to_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--scenes", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "scenes").mkdir()
        for i in range(args.scenes):
            make_scene(root / "scenes" / f"scene_{i}.tif", size=args.size, seed=i, progress=False)
        torch.manual_seed(0)
        model = create_model(encoder="resnet18")
        ckpt = save_checkpoint(root / "model.pt", model, model_config(model, arch="unet", encoder="resnet18",
                                                                      in_channels=3, classes=1), meta={})
        predict = {"tile": 512, "overlap": 128, "tta": "none", "device": "cpu"}
        vector = {"min_area": 10.0, "simplify": 0.3}

        start = time.perf_counter()
        for scene in sorted((root / "scenes").glob("*.tif")):
            mask = root / "direct" / f"{scene.stem}.tif"
            predict_raster(str(ckpt), scene, mask, output="both", **predict)
            for fmt in ("geojson", "gpkg"):
                vectorize_to_file(mask, root / "direct" / f"{scene.stem}.{fmt}",
                                  prob=mask.with_name(f"{mask.stem}.prob.tif"), **vector)
        direct = time.perf_counter() - start

        spec = {"name": "bench", "workdir": str(root / "work"), "stages": {
            "predict": {"uses": "predict_scenes", "with": {"checkpoint": str(ckpt), "scenes": str(root / "scenes"),
                                                          **predict}},
            "vectorize": {"uses": "vectorize", "with": {"masks": "${predict}", "merged": None, **vector}}}}
        start = time.perf_counter()
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            startup = time.perf_counter() - start
            start = time.perf_counter()
            run(load_pipeline(spec), scheduler=client, report=False)
            piped = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "pipeline", "scenes": args.scenes, "size": args.size, "workers": 1,
        "direct_s": round(direct, 2), "pipeline_s": round(piped, 2), "cluster_startup_s": round(startup, 2),
        "overhead_fraction": round((piped - direct) / piped, 4), "target_overhead_fraction": 0.03,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
