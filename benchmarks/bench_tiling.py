"""Benchmark: tiling throughput against a plain loop of window reads, and peak memory against scene size.

Throughput is decoded megabytes per second: windows x size^2 x bands x bytes per sample, over the
wall-clock time. The baseline is a sequential loop of ``src.read(window=...)`` over the same windows in
this process, in plain ``rasterio.Env()`` (GDAL defaults: one decoding thread, a block cache of 5% of
RAM, so every block is decoded once); it is timed again after ``retain_freed_memory()`` (the allocator
setting rsseg's entry points use), which removes its page faults and its run-to-run spread, and the ratios
against both are reported (the targets are against the plain loop). ``write_chips`` (labels from the scene's
footprints) runs on the executor of a local cluster (:func:`rsseg.pipeline.cluster.local_cluster`, the kind
``rsseg tile`` starts: worker processes set up as entry points, with the allocator tuning and the GDAL cache;
rsseg's library sets none of these) of 1 and then 2 workers started beforehand, so start-up is not timed; each
figure is the best of ``--repeat`` runs. Each worker runs its share of the cores as Dask threads, one block
of work per thread and one GDAL decoding thread per task: "1 worker" is one process using the machine's cores
(2 threads on 2 cores), as the parent version's worker did with a thread pool inside its task, and "2 workers"
are two single-threaded processes, what ``rsseg tile`` starts on 2 cores. The plain loop uses one core.

CPU seconds (``*_cpu_s``: user + system of the bench process and the workers, all threads;
``cpu_*_x_plain``: as a multiple of the plain loop's) are reported beside the wall-clock figures: on a machine
shared with other work they move less than wall-clock time does (a plain loop on one core loses less to a
busy neighbour than work spread over every core).

The floor (``floor_2w_mb_s``) is what any tiling on 2 workers must do at least, with nothing else: two
processes (started beforehand, allocator as rsseg's entry points set it) each read half the windows (by grid rows)
and write every window's bytes and a label-sized buffer to files under ``--out``. No labels, chip assembly,
TIFF headers, scheduler or footprint reading: the headroom a 2-worker target leaves for those.

Chips are written to ``--out`` (default: a folder on the RAM file system /dev/shm where there is one):
the baseline reads the scene from the page cache, so the chips go to memory too, and the figure measures
the code rather than the disk. On this shared machine's ext4 (no journal) creating a file costs 0.06 to
0.8 ms depending on how many files anyone deleted in the last seconds (ext4 scans past recently deleted
inodes); ``create_ms`` reports that cost for ``--out`` and for ``--data``, and ``--out`` on disk measures it.

Peak memory: ``write_chips`` on the executor of a LocalCluster of 2 workers (``rsseg.pipeline.cluster.dask_executor``,
as ``rsseg tile`` runs) in a fresh
subprocess per scene size; psutil samples the process tree (the run, its nanny-spawned workers and any
helper processes) every 50 ms; reported both as the peak of the tree's summed RSS and as the largest
single process. Prints one JSON line.

    python benchmarks/bench_tiling.py [--size 20000] [--small 5000] [--repeat 2] [--data /tmp/rsseg-bench]
                                      [--out /dev/shm/rsseg-bench-chips]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import rasterio
from distributed import Client
from rasterio.windows import Window

from rsseg.pipeline.cluster import dask_executor, local_cluster
from rsseg.pipeline.process import available_cores, retain_freed_memory
from rsseg.synth.generate import footprints_path, make_scene
from rsseg.tiling import TileGrid, TileOptions, write_chips

TILE, OVERLAP = 512, 64
OPTIONS = TileOptions(size=TILE, overlap=OVERLAP)


def scene_of(data: Path, size: int) -> Path:
    path = data / f"scene_{size}.tif"
    if not path.exists() or not footprints_path(path).exists():
        make_scene(path, size=size, seed=0, progress=False)
    return path


def create_ms(folder: Path, n: int = 200) -> float:
    """Milliseconds to create an empty file in ``folder`` (a probe of the file system, not of rsseg)."""
    probe = folder / f".create-probe-{os.getpid()}"
    probe.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(n):
        os.close(os.open(probe / str(i), os.O_WRONLY | os.O_CREAT, 0o644))
    elapsed = time.perf_counter() - start
    shutil.rmtree(probe)
    return round(elapsed / n * 1000, 3)


def decoded_mb(scene: Path) -> float:
    """Megabytes the grid's windows hold once decoded (overlaps counted in every window)."""
    with rasterio.open(scene) as src:
        grid = TileGrid(src.width, src.height, TILE, OVERLAP)
        return len(grid) * TILE * TILE * src.count * np.dtype(src.dtypes[0]).itemsize / 1e6


def read_loop(scene: Path, env: rasterio.Env) -> float:
    """Seconds for a sequential loop of window reads over the grid's windows."""
    with env, rasterio.open(scene) as src:
        grid = TileGrid(src.width, src.height, TILE, OVERLAP)
        start = time.perf_counter()
        for tile in grid:
            src.read(window=tile.window())
        return time.perf_counter() - start


def _floor_share(scene: Path, windows: list[tuple[int, int, int, int]], folder: Path) -> float:
    """One process's part of the floor: read its windows and write each one's bytes (and a label's) to files."""
    retain_freed_memory()  # as rsseg's tasks run: no page faults for each fresh window array
    folder.mkdir(parents=True, exist_ok=True)
    label = bytes(TILE * TILE)
    with rasterio.Env(), rasterio.open(scene) as src:
        start = time.perf_counter()
        for i, (col, row, width, height) in enumerate(windows):
            data = src.read(window=Window(col, row, width, height))
            for name, buffer in ((f"{i}.img", data.data), (f"{i}.lab", label)):
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, buffer)
                os.close(fd)
        return time.perf_counter() - start


def floor_time(scene: Path, out: Path, pool: ProcessPoolExecutor, parts: int = 2) -> float:
    """Seconds for the windows' reads and chip-sized writes alone, split by grid rows over ``parts`` processes.

    What any tiling on ``parts`` workers must do at least (decode every window, write as many bytes),
    with nothing else: no labels, no chip assembly, no TIFF headers, no scheduler, no footprint reading.
    """
    with rasterio.open(scene) as src:
        grid = TileGrid(src.width, src.height, TILE, OVERLAP)
    windows = [(t.col_off, t.row_off, t.width, t.height) for t in grid]
    shares = [windows[len(windows) * k // parts : len(windows) * (k + 1) // parts] for k in range(parts)]
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    list(pool.map(_floor_share, [scene] * parts, shares, [out / str(k) for k in range(parts)]))
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes ``pids`` so far (all their threads)."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def tiling_time(scene: Path, out: Path, client: Client) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process and the workers) of one ``write_chips`` on ``client``."""
    shutil.rmtree(out, ignore_errors=True)
    pids = [os.getpid(), *client.run(os.getpid).values()]
    cpu, start = cpu_seconds(pids), time.perf_counter()
    write_chips(scene, out, OPTIONS, labels=footprints_path(scene), executor=client.get_executor())
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, cpu


def peak_memory(scene: Path, out: Path) -> dict[str, float]:
    """Run the tiling in a fresh subprocess; sample its process tree's resident memory."""
    shutil.rmtree(out, ignore_errors=True)
    child = subprocess.Popen([sys.executable, __file__, "--memory-run", str(scene), str(out)])
    root = psutil.Process(child.pid)
    peak_sum = peak_one = 0
    n_procs = 0
    while child.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            rss = []
            for proc in procs:
                try:
                    rss.append(proc.memory_info().rss)
                except psutil.Error:
                    pass
            peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss, default=0))
            n_procs = max(n_procs, len(rss))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if child.returncode:
        raise SystemExit(f"tiling subprocess for {scene} failed with {child.returncode}")
    shutil.rmtree(out, ignore_errors=True)
    return {"tree_sum_mb": round(peak_sum / 2**20, 1), "max_process_mb": round(peak_one / 2**20, 1),
            "processes": n_procs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/rsseg-bench"))
    parser.add_argument("--out", type=Path, default=None,
                        help="where chips are written (default: /dev/shm/rsseg-bench-chips, else under --data)")
    parser.add_argument("--memory-run", nargs=2, metavar=("SCENE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_run:
        scene, out = map(Path, args.memory_run)
        with dask_executor(None, n_workers=2) as executor:
            write_chips(scene, out, OPTIONS, labels=footprints_path(scene), executor=executor)
        return
    args.data.mkdir(parents=True, exist_ok=True)
    big, small = scene_of(args.data, args.size), scene_of(args.data, args.small)
    mb = decoded_mb(big)
    shm = Path("/dev/shm")
    out = args.out or (shm / "rsseg-bench-chips" if shm.is_dir() else args.data / "bench-chips")
    result: dict[str, object] = {"scene_px": args.size, "tile": TILE, "overlap": OVERLAP, "decoded_mb": round(mb),
                                 "out_dir": str(out), "create_ms": {"out": create_ms(out.parent),
                                                                    "data": create_ms(args.data)}}
    read_loop(big, rasterio.Env())  # warm the page cache: every run then reads the file from memory
    cpu = cpu_seconds([os.getpid()])
    plain = min(read_loop(big, rasterio.Env()) for _ in range(args.repeat))
    result["baseline_plain_mb_s"] = round(mb / plain, 1)
    result["baseline_plain_cpu_s"] = round((cpu_seconds([os.getpid()]) - cpu) / args.repeat, 3)
    # The same loop with freed memory kept for reuse, as rsseg's tasks run: glibc otherwise maps and faults
    # in each window's fresh array, so the plain loop's speed depends on the allocator's state (590-700 MB/s).
    retain_freed_memory()
    retained = min(read_loop(big, rasterio.Env()) for _ in range(args.repeat))
    result["baseline_retained_mb_s"] = round(mb / retained, 1)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(time.sleep, [0.5, 0.5]))  # both processes started and warm before timing
        floor = min(floor_time(big, out, pool) for _ in range(args.repeat))
    result["floor_2w_mb_s"] = round(mb / floor, 1)
    result["ratio_floor_vs_plain"] = round(plain / floor, 3)
    for workers in (1, 2):  # each worker with its share of the cores as Dask threads (module docstring)
        threads = max(1, available_cores() // workers)
        with local_cluster(workers, threads=threads) as cluster, Client(cluster) as client:
            best, cpu = min(tiling_time(big, out, client) for _ in range(args.repeat))
        result[f"tiling_{workers}w_mb_s"] = round(mb / best, 1)
        result[f"tiling_{workers}w_cpu_s"] = round(cpu, 3)
        result[f"cpu_{workers}w_x_plain"] = round(cpu / result["baseline_plain_cpu_s"], 3)
        result[f"ratio_{workers}w_vs_plain"] = round(plain / best, 3)
        result[f"ratio_{workers}w_vs_retained"] = round(retained / best, 3)
    memory = {n: peak_memory(scene, out) for n, scene in ((args.small, small), (args.size, big))}
    result["peak_memory"] = {str(n): m for n, m in memory.items()}
    result["memory_ratio_tree_sum"] = round(memory[args.size]["tree_sum_mb"] / memory[args.small]["tree_sum_mb"], 3)
    result["memory_ratio_max_process"] = round(
        memory[args.size]["max_process_mb"] / memory[args.small]["max_process_mb"], 3)
    result["targets"] = {"ratio_1w_vs_plain": ">= 0.8", "memory_ratio_tree_sum": "<= 1.3", "tree_sum_mb": "< 1024"}
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
