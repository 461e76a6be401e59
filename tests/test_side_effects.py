"""Library calls leave the process as they found it (ARCHITECTURE.md), each checked in a fresh process.

A child process imports the library, builds tiny data, takes a snapshot of process-wide state, makes ONE
library call, and takes the snapshot again: glibc's allocator (a freed 64 MiB block is faulted in afresh,
i.e. nobody called ``mallopt``), torch's threads, OpenMP/GDAL variables, the GDAL cache, the global RNGs of
torch, numpy and ``random``, and the levels and handlers of the root and ``rsseg`` loggers must not change.
One test per call, so that a failure names the call that leaks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, Linux affinity")

ROOT = Path(__file__).resolve().parents[1]

SNAPSHOT = '''
import hashlib, json, logging, os, random, sys
import numpy as np
import torch
from probes import fresh_block_faults
from rasterio.env import get_gdal_config

def _digest(*parts):
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _logger(name):
    lg = logging.getLogger(name)
    return [lg.level, [type(h).__name__ for h in lg.handlers], lg.propagate, lg.disabled]


def snapshot():
    np_state = np.random.get_state()
    return {
        "allocator_default": fresh_block_faults() > 10_000,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "gdal_cache": get_gdal_config("GDAL_CACHEMAX"),
        "gdal_num_threads": get_gdal_config("GDAL_NUM_THREADS"),
        "environ": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                 "GDAL_CACHEMAX", "GDAL_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")},
        "torch_rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16],
        "numpy_rng": _digest(np_state[0], np_state[1].tobytes(), np_state[2:]),
        "random_rng": _digest(random.getstate()),
        "loggers": {name: _logger(name) for name in ["", "rsseg", *sorted(
            n for n in logging.root.manager.loggerDict if n.startswith("rsseg.")
            and (logging.getLogger(n).level or logging.getLogger(n).handlers))]},
        "process_settings_applied": "rsseg.pipeline.process" in sys.modules
            and sys.modules["rsseg.pipeline.process"].retain_freed_memory.cache_info().currsize > 0,
    }


fresh_block_faults()  # the first block of a process is fresh under any setting
'''


def run_in_fresh_process(setup: str, call: str, tmp_path: Path) -> tuple[dict, dict]:
    """Run ``setup`` (imports, tiny data), then snapshot, ``call``, snapshot; return both snapshots."""
    script = "\n".join([SNAPSHOT, textwrap.dedent(setup), "before = snapshot()", textwrap.dedent(call),
                        "after = snapshot()", "print('SNAPSHOTS', json.dumps([before, after]))"])
    before, after = fresh_process_json(script, "SNAPSHOTS", tmp_path)
    return before, after


def fresh_process_json(script: str, tag: str, tmp_path: Path, timeout: float = 300) -> object:
    """Run ``script`` in a fresh Python without the parent's thread/GDAL/allocator variables; the JSON it
    printed after ``tag``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GDAL_", "MALLOC_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith(f"{tag} "))
    return json.loads(line.removeprefix(f"{tag} "))


def assert_unchanged(before: dict, after: dict) -> None:
    assert before["allocator_default"], "the allocator was tuned before the call (by an import?)"
    assert not before["process_settings_applied"]
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert not changed, f"process-wide state changed by the call: {changed}"


TINY_SCENE = '''
import numpy as np, rasterio
from affine import Affine

def tiny_scene(path, bands=3, size=96, dtype="uint8", seed=0):
    data = np.random.default_rng(seed).integers(0, 256, (bands, size, size)).astype(dtype)
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype=dtype, crs="EPSG:32650",
                   transform=Affine(0.3, 0, 500000, 0, -0.3, 3400000))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path
'''


def test_predict_raster_leaves_the_process_as_it_found_it(tmp_path):
    setup = TINY_SCENE + '''
from torch import nn
from rsseg.inference.predict import predict_raster
from rsseg.models import Segmenter

gen = torch.Generator().manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1))
with torch.no_grad():
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
model = Segmenter(net, (110.0,) * 3, (60.0,) * 3).eval()
scene = tiny_scene("scene.tif")
'''
    call = 'predict_raster(model, scene, "out.tif", window=64, overlap=16, tta="flip", batch_size=2, device="cpu")'
    assert_unchanged(*run_in_fresh_process(setup, call, tmp_path))
    assert (tmp_path / "out.tif").exists() and (tmp_path / "out.prob.tif").exists()


def test_predict_images_leaves_the_process_as_it_found_it(tmp_path):
    setup = '''
from PIL import Image
from torch import nn
from rsseg.inference.predict import predict_images
from rsseg.models import Segmenter

os.mkdir("images")
Image.fromarray(np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save("images/a.jpg")
net = nn.Conv2d(3, 1, 3, padding=1)
model = Segmenter(net, (110.0,) * 3, (60.0,) * 3).eval()
'''
    call = 'predict_images(model, "images", "sub.csv", tta="none", device="cpu")'
    assert_unchanged(*run_in_fresh_process(setup, call, tmp_path))


def test_fit_leaves_the_process_as_it_found_it(tmp_path):
    setup = '''
from rsseg.synth.generate import make_tianchi
from rsseg.training.config import load_config
from rsseg.training.launch import fit

make_tianchi("tianchi", n_train=4, n_test=0, seed=5, progress=False)
cfg = load_config({
    "data": {"source": "tianchi", "root": "tianchi", "batch_size": 2, "val_fraction": 0.25,
             "augment": {"crop": 64}},
    "model": {"arch": "unet", "encoder": "resnet18",
              "kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}},
    "run": {"out_dir": "run", "epochs": 1, "device": "cpu", "progress": False, "thresholds": [0.5],
            "min_pixels": [0]},
})
'''
    assert_unchanged(*run_in_fresh_process(setup, "fit(cfg)", tmp_path))


def test_write_chips_leaves_the_process_as_it_found_it(tmp_path):
    setup = TINY_SCENE + '''
from rsseg.tiling import write_chips

scene = tiny_scene("scene.tif", size=128)
'''
    assert_unchanged(*run_in_fresh_process(setup, 'write_chips(scene, "chips", size=64, overlap=0)', tmp_path))


def test_vectorize_leaves_the_process_as_it_found_it(tmp_path):
    setup = '''
import rasterio
from affine import Affine
from rsseg.vector.blockwise import vectorize

mask = np.zeros((1, 64, 64), np.uint8)
mask[0, 10:20, 10:30] = 1
mask[0, 40:60, 35:50] = 1
with rasterio.open("mask.tif", "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8",
                   crs="EPSG:32650", transform=Affine(0.3, 0, 500000, 0, -0.3, 3400000)) as dst:
    dst.write(mask)
'''
    assert_unchanged(*run_in_fresh_process(setup, 'gdf = vectorize("mask.tif", block=32)', tmp_path))


CLI_PROBE = """
import json, os
cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpu})  # as `taskset -c <cpu>` would
from rsseg.cli import main

main(["--help"])
import torch  # after the entry point, as the commands import it
from probes import fresh_block_faults
from rasterio.env import get_gdal_config

fresh_block_faults()  # the first block of a process is fresh under any setting
faults = [fresh_block_faults()]
print("SETTINGS", json.dumps({"torch_threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY"),
                              "omp": os.environ.get("OMP_NUM_THREADS"), "gdal_cache": get_gdal_config("GDAL_CACHEMAX"),
                              "faults": faults[-1], "malloc_env": [os.environ.get("MALLOC_MMAP_MAX_"),
                                                                   os.environ.get("MALLOC_TRIM_THRESHOLD_")]}))
"""


def test_the_cli_entry_point_applies_the_process_settings(tmp_path):
    """``rsseg`` (its ``main``) sizes threads to the affinity mask, waits passively, tunes the allocator."""
    settings = fresh_process_json(CLI_PROBE, "SETTINGS", tmp_path, timeout=120)
    assert settings["torch_threads"] == 1 and settings["omp"] == "1"
    assert settings["wait"] == "PASSIVE"
    assert settings["gdal_cache"] == 64 << 20
    assert settings["faults"] < 100  # freed memory is reused
    assert settings["malloc_env"] == ["0", str(2**31 - 1)]  # and child processes (torchrun ranks) start so
