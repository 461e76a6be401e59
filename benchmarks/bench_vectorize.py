"""Benchmark of ``rsseg vectorize``: throughput, blockwise overhead, Dask scaling and peak memory.

Prints one JSON line (``--quick``: a 5000 px mask, one repeat, no memory runs; a sanity check). Masks
are generated once (rasterised random rectangles, L-shapes and courtyard buildings on a jittered grid,
about one building per 5000 px) and cached under /tmp/rsseg-bench-vectorize.

Figures:
- ``plain_*``: the baseline, whole mask read at once, ``rasterio.features.shapes``, ``shapely.geometry.shape``
  per polygon, geopandas ``to_crs`` and pyogrio GeoJSON writing;
- ``whole_*``: rsseg with one block covering the mask, on a one-worker LocalCluster (through its
  client's executor, as the CLI runs it);
- ``block_1w_*`` / ``block_2w_*``: rsseg with 2048 px blocks on one and two single-threaded workers
  (each cluster warmed by one untimed run first: worker imports, GDAL, page cache); the GeoJSON file is
  written by pyogrio in the driver (Arrow when pyarrow is installed), so two workers speed up the blocks
  only;
- ``cpu_*``: CPU seconds of the blockwise runs in the driver and in the workers, and the speed-up they
  imply on an idle machine, ``(workers_1w + driver_1w) / (workers_2w / 2 + driver_2w)`` (wall times on
  a shared machine mostly measure the other tenants); ``gpkg_cpu_*`` the same for one worker writing
  GeoPackage, whose writer costs a fifth of GDAL's GeoJSON writer;
- ``peak_rss_mb_*``: peak resident memory of the process tree (driver, scheduler, workers) of a fresh
  ``rsseg vectorize`` subprocess (the command's entry point, LocalCluster of its own) on a 10000 and a
  20000 px mask, sampled with psutil;
- ``write_s_*`` / ``write_mb_*``: seconds and megabytes to write one result (in the mask's CRS; GeoJSON
  reprojected to EPSG:4326) as GeoJSON, GeoPackage, FlatGeobuf and GeoParquet.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import psutil
import pyogrio
import rasterio
import shapely.geometry
from distributed import Client, LocalCluster
from rasterio.features import shapes
from rasterio.transform import from_origin
from rasterio.windows import Window

from rsseg.vector import vectorize, vectorize_to_file, write_vectors

CACHE = Path("/tmp/rsseg-bench-vectorize")
PIXEL_PER_BUILDING = 5000
REPEATS = 3
USE_ARROW = importlib.util.find_spec("pyarrow") is not None  # as rsseg.vector.files


def _buildings(size: int, seed: int) -> np.ndarray:
    """A size x size uint8 mask (0/1) of about size**2 / 5000 buildings on a jittered grid."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    cells = int(np.ceil(np.sqrt(size * size / PIXEL_PER_BUILDING)))
    step = size / cells
    for i in range(cells):
        for j in range(cells):
            w, h = rng.integers(12, int(step * 0.8), 2)
            y0 = int(i * step + rng.integers(0, max(1, int(step - h))))
            x0 = int(j * step + rng.integers(0, max(1, int(step - w))))
            mask[y0:y0 + h, x0:x0 + w] = 1
            kind = rng.random()
            if kind < 0.3:  # L-shape
                mask[y0:y0 + h // 2, x0:x0 + w // 2] = 0
            elif kind < 0.4 and min(w, h) > 20:  # courtyard
                mask[y0 + h // 3:y0 + 2 * h // 3, x0 + w // 3:x0 + 2 * w // 3] = 0
    return mask


def mask_path(size: int) -> Path:
    """A cached size x size mask GeoTIFF in UTM 50N at 0.3 m (written in 10000 px tiles)."""
    path = CACHE / f"mask_{size}.tif"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tile = min(size, 10000)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 1, "dtype": "uint8", "nodata": 255,
               "crs": "EPSG:32650", "transform": from_origin(500000, 4000000, 0.3, 0.3), "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate"}
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for k, (row, col) in enumerate((r, c) for r in range(0, size, tile) for c in range(0, size, tile)):
            dst.write(_buildings(tile, seed=k), 1, window=Window(col, row, tile, tile))
    tmp.rename(path)
    return path


def plain(mask: Path, out: Path) -> int:
    """The baseline: whole-mask shapes, per-polygon shapely, geopandas, pyogrio."""
    with rasterio.open(mask) as src:
        values = src.read(1)
        transform, crs = src.transform, src.crs
    geoms = [shapely.geometry.shape(g) for g, _ in shapes(values, mask=values == 1, transform=transform)]
    gdf = gpd.GeoDataFrame(geometry=geoms, crs=crs)
    gdf["area_m2"] = gdf.area
    pyogrio.write_dataframe(gdf.to_crs(4326), out, layer_options={"RFC7946": "YES"}, use_arrow=USE_ARROW)
    return len(gdf)


def best_time(fn, *args, **kwargs) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(REPEATS):
        start = time.perf_counter()
        n = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times), n


def _worker_cpu(client: Client) -> float:
    pids = client.run(os.getpid).values()
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def cpu_split(client: Client, mask: Path, out: Path) -> tuple[float, float]:
    """CPU seconds of one blockwise run in this process (client, scheduler, writing) and in the workers.

    Unlike wall times these hardly depend on the load of a shared machine; the ideal time on k idle
    cores is about ``workers / k + driver``.
    """
    driver, workers = time.process_time(), _worker_cpu(client)
    vectorize_to_file(mask, out, block=2048, executor=client.get_executor(), overwrite=True)
    return time.process_time() - driver, _worker_cpu(client) - workers


def warm(client: Client, mask: Path, out: Path) -> None:
    """One untimed run, so that every worker has imported rsseg and opened the mask before timing."""
    vectorize_to_file(mask, out, block=2048, executor=client.get_executor(), overwrite=True)
    assert all(client.run(lambda: "rsseg.vector.blockwise" in sys.modules).values())


def peak_rss_mb(mask: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MB) of a fresh process tree vectorising ``mask`` to GeoJSON, and its wall time."""
    start = time.perf_counter()
    proc = psutil.Popen([sys.executable, "-m", "rsseg.cli", "vectorize", str(mask), str(out), "--overwrite"],
                        stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"memory run on {mask} failed with exit code {proc.returncode}")
    return peak / 2**20, time.perf_counter() - start


def format_writes(mask: Path, tmp: str) -> dict:
    """Seconds and bytes to write one vectorize result in each output format (best of REPEATS)."""
    gdf = vectorize(mask, block=2048)
    figures = {}
    for suffix in ("geojson", "gpkg", "fgb", "parquet"):
        path = Path(tmp) / f"formats.{suffix}"
        seconds, _ = best_time(lambda p=path: len(write_vectors(gdf, p, overwrite=True).name))
        figures[f"write_s_{suffix}"] = round(seconds, 3)
        figures[f"write_mb_{suffix}"] = round(path.stat().st_size / 2**20, 2)
    return figures


def main(quick: bool = False) -> None:
    global REPEATS
    size = 5000 if quick else 10000
    REPEATS = 1 if quick else REPEATS
    mask10 = mask_path(size)
    result: dict = {"bench": "vectorize", "mask_px": size, "block_px": 2048, "repeats_best_of": REPEATS,
                    "quick": quick, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "buildings.geojson"
        t_plain, n_plain = best_time(plain, mask10, out)
        with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            warm(client, mask10, out)
            executor = client.get_executor()
            t_whole, n_whole = best_time(vectorize_to_file, mask10, out, block=10000, executor=executor,
                                         overwrite=True)
            t_1w, n_1w = best_time(vectorize_to_file, mask10, out, block=2048, executor=executor, overwrite=True)
            cpu_driver, cpu_workers = cpu_split(client, mask10, out)
            gpkg_driver, gpkg_workers = cpu_split(client, mask10, Path(tmp) / "buildings.gpkg")
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            warm(client, mask10, out)
            t_2w, n_2w = best_time(vectorize_to_file, mask10, out, block=2048, executor=client.get_executor(),
                                   overwrite=True)
            cpu_driver_2w, cpu_workers_2w = cpu_split(client, mask10, out)
        assert n_whole == n_1w == n_2w == n_plain, (n_plain, n_whole, n_1w, n_2w)
        result.update(format_writes(mask10, tmp))
        if not quick:
            rss10, wall10 = peak_rss_mb(mask10, out)
            rss20, wall20 = peak_rss_mb(mask_path(20000), Path(tmp) / "buildings20.geojson")
            result.update({
                "peak_rss_mb_10000": round(rss10, 1), "peak_rss_mb_20000": round(rss20, 1),
                "peak_rss_ratio_20000_over_10000": round(rss20 / rss10, 3),
                "memory_run_wall_s_10000": round(wall10, 2), "memory_run_wall_s_20000": round(wall20, 2)})
    result.update({
        "buildings": n_1w,
        "plain_s": round(t_plain, 3), "plain_polygons_per_s": round(n_plain / t_plain),
        "whole_s": round(t_whole, 3), "whole_polygons_per_s": round(n_whole / t_whole),
        "block_1w_s": round(t_1w, 3), "block_1w_polygons_per_s": round(n_1w / t_1w),
        "block_2w_s": round(t_2w, 3), "block_2w_polygons_per_s": round(n_2w / t_2w),
        "blockwise_overhead": round(t_1w / t_whole - 1, 4),
        "speedup_2w_over_1w": round(t_1w / t_2w, 3),
        "ratio_block_1w_over_plain": round(t_1w / t_plain, 3),
        "cpu_s_driver": round(cpu_driver, 3), "cpu_s_workers": round(cpu_workers, 3),
        "cpu_polygons_per_s": round(n_1w / (cpu_driver + cpu_workers)),
        "cpu_s_driver_2w": round(cpu_driver_2w, 3), "cpu_s_workers_2w": round(cpu_workers_2w, 3),
        "cpu_estimate_speedup_2w": round((cpu_workers + cpu_driver) / (cpu_workers_2w / 2 + cpu_driver_2w), 3),
        "gpkg_cpu_s_driver": round(gpkg_driver, 3), "gpkg_cpu_s_workers": round(gpkg_workers, 3),
        "gpkg_cpu_estimate_speedup_2w": round((gpkg_workers + gpkg_driver) / (gpkg_workers / 2 + gpkg_driver), 3),
        "targets": {"polygons_per_s_min": 5000, "blockwise_overhead_max": 0.05, "peak_rss_ratio_max": 1.3},
        "arrow": USE_ARROW,
        "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
