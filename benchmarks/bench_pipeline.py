"""Benchmark: Dask scheduling overhead of the scene pipeline (predict -> vectorize) against direct calls.

The same stage work is done on the same generated scenes by ``rsseg.pipeline.runner.run`` on a LocalCluster of
one single-threaded worker (started beforehand; its start-up is reported separately), and by calling the
library functions directly in this process, one after the other. Both processes are warmed by one untimed
prediction first (model load, kernel selection); the direct calls run before and after the pipeline and
the faster run counts. The overhead is ``(pipeline - direct) / pipeline``. Prints
one JSON line.

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

from rsseg.inference.predict import predict_raster
from rsseg.models import create_model, model_config, save_checkpoint
from rsseg.pipeline.runner import load_pipeline, run
from rsseg.synth.generate import make_scene
from rsseg.vector.blockwise import vectorize
from rsseg.vector.files import write_vectors


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

        def direct_run(out: Path) -> float:
            start = time.perf_counter()
            for scene in sorted((root / "scenes").glob("*.tif")):
                mask = out / f"{scene.stem}.tif"
                predict_raster(str(ckpt), scene, mask, output="both", **predict)
                gdf = vectorize(mask, prob=mask.with_name(f"{mask.stem}.prob.tif"), **vector)
                for fmt in ("geojson", "gpkg"):  # as the vectorize stage: one vectorisation, both formats
                    write_vectors(gdf, out / f"{scene.stem}.{fmt}")
            return time.perf_counter() - start

        predict_raster(str(ckpt), root / "scenes" / "scene_0.tif", root / "warm.tif", **predict)
        first = direct_run(root / "direct_1")

        spec = {"name": "bench", "workdir": str(root / "work"), "stages": {
            "predict": {"uses": "predict_scenes", "with": {"checkpoint": str(ckpt), "scenes": str(root / "scenes"),
                                                          **predict}},
            "vectorize": {"uses": "vectorize", "with": {"masks": "${predict}", "merged": None, **vector}}}}
        start = time.perf_counter()
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            startup = time.perf_counter() - start
            client.run(lambda: __import__("rsseg.pipeline.stages"))
            client.submit(predict_raster, str(ckpt), root / "scenes" / "scene_0.tif", root / "warm_worker.tif",
                          pure=False, **predict).result()  # the same warm-up as this process had
            start = time.perf_counter()
            run(load_pipeline(spec), scheduler=client, report=False)
            piped = time.perf_counter() - start
        second = direct_run(root / "direct_2")
        direct = min(first, second)
    print(json.dumps({
        "benchmark": "pipeline", "scenes": args.scenes, "size": args.size, "workers": 1,
        "direct_s": round(direct, 2), "direct_runs_s": [round(first, 2), round(second, 2)],
        "pipeline_s": round(piped, 2), "cluster_startup_s": round(startup, 2),
        "overhead_fraction": round((piped - direct) / piped, 4), "target_overhead_fraction": 0.03,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
