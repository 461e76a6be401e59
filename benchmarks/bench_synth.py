"""Benchmark: generated scenes (rsseg.synth.generate.make_scene): time, throughput and peak memory by scene size.

Each scene is made in a fresh process (so peak resident memory is its own). Rendering uses one core;
GDAL may compress blocks on a second one (rsseg.fileio.raster_env), so ``cpu_s`` is reported too. The
baseline is the same generator on a 4096x4096 scene: the ratios show that time grows with the pixel
count and peak memory does not. Compression presets are compared on the 4096 scene. Prints one JSON line.

    python benchmarks/bench_synth.py [--sizes 4096 20000] [--compress deflate zstd lzw]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, os, resource, sys, time
from rsseg.synth.generate import make_scene
size, compress, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
wall, cpu = time.perf_counter(), time.process_time()
footprints = make_scene(out, size=size, seed=0, compress=compress, progress=False)
print(json.dumps({"size": size, "compress": compress, "wall_s": round(time.perf_counter() - wall, 2),
                  "cpu_s": round(time.process_time() - cpu, 2), "buildings": len(footprints),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "file_mb": round(os.path.getsize(out) / 2**20, 1)}))
"""


def run(size: int, compress: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"scene_{size}_{compress}.tif")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(size), compress, out], check=True,
                          capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["mpx_per_s"] = round(size * size / 1e6 / result["wall_s"], 2)
    os.remove(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 20000])
    parser.add_argument("--compress", nargs="+", default=["deflate", "zstd", "lzw"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compression = {name: run(4096, name, tmp) for name in args.compress}
        baseline = compression.get("deflate") or run(4096, "deflate", tmp)
        scenes = {str(size): baseline if size == 4096 else run(size, "deflate", tmp) for size in args.sizes}
    ratios = {
        size: {"time_per_px_vs_4096": round(s["wall_s"] / size_px(s) / (baseline["wall_s"] / size_px(baseline)), 2),
               "peak_rss_vs_4096": round(s["peak_rss_mb"] / baseline["peak_rss_mb"], 2)}
        for size, s in scenes.items()
    }
    print(json.dumps({"bench": "synth", "scenes": scenes, "baseline_4096": baseline, "ratios": ratios,
                      "compression_4096": compression, "loadavg": os.getloadavg()}))


def size_px(result: dict) -> int:
    return result["size"] ** 2


if __name__ == "__main__":
    main()
