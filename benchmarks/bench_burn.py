"""Benchmark: burning building footprints into label strips, rsseg.tiling.burn against rasterio.features.rasterize.

A scene of ``--strips`` strips of 512 x 5000 pixels (0.3 m UTM pixels) with about ``--per-strip`` building
footprints per strip: rotated rectangles and L-shapes of 15-90 pixels, some crossing strip borders. Both
methods burn every strip the way tiling does (zero the strip, pick the footprints that can touch it, burn);
rasterio gets GeoJSON dicts, as tiling passes them today. Outputs are checked equal. Best of ``--repeat``
passes. Prints one JSON line.

    python benchmarks/bench_burn.py [--strips 20] [--per-strip 150] [--repeat 5] [--segment PIXELS]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import rasterio.features
import shapely
from affine import Affine

from rsseg.pipeline.process import retain_freed_memory
from rsseg.tiling.burn import burn, polygon_edges

HEIGHT, WIDTH = 512, 5000
TRANSFORM = Affine(0.3, 0, 500000, 0, -0.3, 4000000)


def buildings(n: int, rows: int, seed: int = 0) -> np.ndarray:
    """Rotated rectangles and L-shapes of 15-90 pixels, in map coordinates."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform((0, 0), (WIDTH, rows), (n, 2))
    w, h = rng.uniform(15, 90, n), rng.uniform(15, 90, n)
    cut = rng.uniform(0.3, 0.7, (n, 2)) * np.stack([w, h], 1)
    ell = rng.random(n) < 0.4
    # Corners of an L (a rectangle when the cut is the whole size), centred on 0.
    xs = np.stack([np.zeros(n), w, w, np.where(ell, cut[:, 0], w), np.where(ell, cut[:, 0], w), np.zeros(n)], 1)
    ys = np.stack([np.zeros(n), np.zeros(n), np.where(ell, cut[:, 1], h), np.where(ell, cut[:, 1], h), h, h], 1)
    xs, ys = xs - w[:, None] / 2, ys - h[:, None] / 2
    angle = rng.uniform(0, np.pi, n)[:, None]
    px = centre[:, :1] + xs * np.cos(angle) - ys * np.sin(angle)
    py = centre[:, 1:] + xs * np.sin(angle) + ys * np.cos(angle)
    mx, my = TRANSFORM * (px, py)
    rings = np.stack([mx, my], 2)
    return shapely.polygons(np.concatenate([rings, rings[:, :1]], 1))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strips", type=int, default=20)
    parser.add_argument("--per-strip", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--segment", type=float, default=0.0,
                        help="densify outlines to segments of at most this many pixels (detailed footprints)")
    args = parser.parse_args()
    retain_freed_memory()  # as tiling tasks do (rsseg.tiling.chips.chip_block): no page faults for temporaries

    geoms = buildings(args.strips * args.per_strip, args.strips * HEIGHT)
    if args.segment > 0:
        geoms = shapely.segmentize(geoms, args.segment * TRANSFORM.a)
    shapes = [shapely.geometry.mapping(g) for g in geoms]
    shapes = json.loads(json.dumps(shapes))  # plain dicts and lists, as tiling loads them
    bounds = shapely.bounds(geoms)
    t = time.perf_counter()
    edges = polygon_edges(geoms, TRANSFORM)
    edges_s = time.perf_counter() - t
    out = np.empty((HEIGHT, WIDTH), np.uint8)  # one label buffer, reused strip after strip as tiling does

    def burn_strip(i: int) -> np.ndarray:
        out.fill(0)
        return burn(edges.select(i * HEIGHT, (i + 1) * HEIGHT), out, i * HEIGHT, 0)

    def rasterio_strip(i: int) -> np.ndarray:
        out.fill(0)
        window = TRANSFORM @ Affine.translation(0, i * HEIGHT)
        minx, maxy = window * (0, 0)
        maxx, miny = window * (WIDTH, HEIGHT)
        b = bounds
        index = np.flatnonzero((b[:, 0] <= maxx) & (b[:, 2] >= minx) & (b[:, 1] <= maxy) & (b[:, 3] >= miny))
        return rasterio.features.rasterize([shapes[j] for j in index], out_shape=out.shape, fill=0,
                                           default_value=1, transform=window, out=out)

    burned = 0
    for i in range(args.strips):
        mine = burn_strip(i).copy()
        theirs = rasterio_strip(i)
        if not np.array_equal(mine, theirs):
            raise SystemExit(f"strip {i}: outputs differ at {int((mine != theirs).sum())} pixels")
        burned += int(mine.sum())
    burn_s = best(lambda: [burn_strip(i) for i in range(args.strips)], args.repeat)
    rasterio_s = best(lambda: [rasterio_strip(i) for i in range(args.strips)], args.repeat)
    print(json.dumps({
        "strip": [HEIGHT, WIDTH],
        "strips": args.strips,
        "polygons_per_strip": args.per_strip,
        "vertices_per_polygon": round(float(shapely.get_num_coordinates(geoms).mean()), 1),
        "edges": len(edges),
        "burned_fraction": round(burned / (args.strips * HEIGHT * WIDTH), 4),
        "polygon_edges_us_per_polygon": round(edges_s / len(geoms) * 1e6, 2),
        "burn_ms_per_strip": round(burn_s / args.strips * 1e3, 3),
        "rasterio_ms_per_strip": round(rasterio_s / args.strips * 1e3, 3),
        "speedup": round(rasterio_s / burn_s, 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
