"""The stage kinds a pipeline can use, declared as data.

Each kind names its parameter model (pydantic, ``extra="forbid"``: a typo in YAML is an error) and the
function that runs it. A stage function gets its validated parameters and a
:class:`~rsseg.pipeline.context.StageContext` (the Dask client, a fresh output folder), writes only into
that folder and returns a JSON-able summary that goes into the stage's manifest. Work that splits goes to
the cluster through the context, so that a failing run cancels its own tasks and nothing else: one task
with ``ctx.submit(fn, ..., gpu=ctx.wants_gpu(device))``, a library call's blocks with
``executor=ctx.executor()`` (a Dask client's ``concurrent.futures`` executor, tracked by the context).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from rsseg.errors import PipelineError
from rsseg.pipeline.cluster import task_threads, threads_by_host
from rsseg.pipeline.context import Params, StageContext, StageKind, expand_chip_folders, expand_inputs

__all__ = ["STAGES", "merge_vectors"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ generated data
class SynthTianchiParams(Params):
    n_train: int = Field(400, ge=1)
    n_test: int = Field(100, ge=0)
    seed: int = 0


def _synth_tianchi(p: SynthTianchiParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.synth.generate import make_tianchi

    # The tiles are rendered in chunks on the workers; this process writes the CSV files.
    info = make_tianchi(ctx.out_dir / "tianchi", p.n_train, p.n_test, p.seed, progress=False,
                        executor=ctx.executor())
    return {k: v for k, v in info.items() if k.startswith("n_")}


class SynthSceneParams(Params):
    size: int = Field(4096, ge=64)
    count: int = Field(1, ge=1)
    crs: str = "EPSG:32650"
    gsd: float = Field(0.3, gt=0)
    seed: int = 0
    nodata_border: bool = False


def _synth_scene(p: SynthSceneParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.synth.generate import make_scene

    futures = []
    for i in range(p.count):
        path = ctx.out_dir / ("scene.tif" if p.count == 1 else f"scene_{i:03d}.tif")
        futures.append(ctx.submit(make_scene, path, size=p.size, crs=p.crs, seed=p.seed + i, gsd=p.gsd,
                                  nodata_border=p.nodata_border, progress=False, label=f"scene{i}"))
    counts = [len(gdf) for gdf in ctx.gather(futures)]
    return {"scenes": p.count, "buildings": sum(counts)}


# ------------------------------------------------------------------------------------------------ tiling
class TileParams(Params):
    scenes: str
    labels: str | None = Field(None, description="A vector/raster file, or a pattern with {stem}")
    size: int = 512
    overlap: int = 64
    max_nodata: float = 0.5
    bands: list[int] | None = None


def _tile(p: TileParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.tiling.tiler import write_chips

    chips = 0
    for scene in expand_inputs(p.scenes):
        labels = p.labels.format(stem=scene.stem) if p.labels else None
        index = write_chips(scene, ctx.out_dir / scene.stem, size=p.size, overlap=p.overlap, labels=labels,
                            bands=p.bands, max_nodata=p.max_nodata, scheduler=ctx.client)
        with open(index) as rows:  # closed: an open file left to the GC is a ResourceWarning (pytest: an error)
            chips += sum(1 for _ in rows) - 1
    return {"chips": chips}


# ---------------------------------------------------------------------------------------------- training
class TrainParams(Params):
    config: str | dict[str, Any] = Field(description="A training config file (configs/*.yaml) or mapping")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides, e.g. run.epochs: 3")
    nproc: int = Field(1, ge=1)

    def train_config(self, out_dir: Path) -> Any:
        """The validated :class:`rsseg.training.config.TrainConfig`, writing into ``out_dir``."""
        from rsseg.training.config import load_config

        overrides = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.set.items()}
        return load_config(self.config, {**overrides, "run.out_dir": str(out_dir), "run.progress": "false"})

    @model_validator(mode="after")
    def _valid_config(self) -> TrainParams:
        self.train_config(Path("."))  # a typo in the training config fails when the pipeline loads
        return self


_THREAD_LIMITS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the Dask worker that started us dies (Linux), so no orphan trains on."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def train_subprocess(config_path: Path, nproc: int) -> str:
    """Run ``rsseg train`` in a child process (Dask workers are daemons: no DataLoader workers inside)."""
    cmd = [sys.executable, "-m", "rsseg.cli", "train", str(config_path), "--nproc", str(nproc)]
    # Dask starts single-threaded workers with OMP/MKL/OpenBLAS limited to 1 thread; the trainer is a
    # process of its own and uses every core (run.threads in the config still sets it explicitly). Dask's
    # 64 KiB heap trim, which it inherits too, is overridden by fit() (rsseg.pipeline.process).
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_LIMITS}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_die_with_parent)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipelineError(f"rsseg train exited with {done.returncode}: {tail}")
    return done.stdout.strip().splitlines()[-1]


def _train(p: TrainParams, ctx: StageContext) -> dict[str, Any]:
    cfg = p.train_config(ctx.out_dir)
    if cfg.data.source == "chips":  # the tile stage's folder holds a chip folder per scene
        chips = expand_chip_folders(cfg.data.chips)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"chips": chips})})
    config_path = ctx.out_dir / "train_config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    gpu = ctx.wants_gpu(cfg.run.device)
    best = Path(ctx.gather([ctx.submit(train_subprocess, config_path, p.nproc, gpu=gpu, label="torchrun")])[0])
    from rsseg.models import load_checkpoint

    meta = load_checkpoint(best)["meta"]
    return {"checkpoint": best.name, **{k: meta[k] for k in ("epoch", "best_dice", "threshold") if k in meta}}


# --------------------------------------------------------------------------------------------- inference
class PredictTianchiParams(Params):
    checkpoint: str
    images: str
    sample: str | None = None
    tta: Literal["none", "flip", "d4"] = "d4"
    batch_size: int = 8
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threshold: float | None = None
    min_pixels: int | None = None


def _predict_tianchi(p: PredictTianchiParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.inference.predict import predict_images
    from rsseg.pipeline.report import tiles_quicklook

    out = ctx.out_dir / "submission.csv"
    fut = ctx.submit(predict_images, p.checkpoint, p.images, out, sample=p.sample, tta=p.tta,
                     batch_size=p.batch_size, device=p.device, precision=p.precision, threshold=p.threshold,
                     min_pixels=p.min_pixels, gpu=ctx.wants_gpu(p.device), label="predict")
    ctx.gather([fut])
    tiles_quicklook(Path(p.images), out, ctx.out_dir / "quicklook_tiles.png")
    with open(out) as rows:
        return {"submission": out.name, "rows": sum(1 for _ in rows)}


class ScoreParams(Params):
    submission: str
    truth: str


def _score(p: ScoreParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.tianchi.files import score

    result = score(p.submission, p.truth)
    (ctx.out_dir / "score.json").write_text(json.dumps(result, indent=2))
    return result


class PredictScenesParams(Params):
    checkpoint: str
    scenes: str
    tile: int = 512
    overlap: int = 128
    tta: Literal["none", "flip", "d4"] = "d4"
    batch_size: int = 8
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threshold: float | None = None
    prob_dtype: Literal["uint8", "float32"] = "uint8"


def _predict_scene(threads_on: dict[str, int], tasks: int, *args: Any, **kwargs: Any) -> Path:
    """Dask task: :func:`~rsseg.inference.predict_raster`, torch's CPU threads this task's share of its host."""
    from rsseg.inference.predict import predict_raster

    return predict_raster(*args, cpu_threads=task_threads(threads_on, tasks), **kwargs)


def _predict_scenes(p: PredictScenesParams, ctx: StageContext) -> dict[str, Any]:
    scenes = expand_inputs(p.scenes)
    threads_on = threads_by_host(ctx.client)
    futures = [ctx.submit(_predict_scene, threads_on, len(scenes), p.checkpoint, scene,
                          ctx.out_dir / f"{scene.stem}.tif", tile=p.tile, overlap=p.overlap, tta=p.tta,
                          batch_size=p.batch_size, device=p.device, precision=p.precision, threshold=p.threshold,
                          output="both", prob_dtype=p.prob_dtype, gpu=ctx.wants_gpu(p.device), label=scene.stem)
               for scene in scenes]
    ctx.gather(futures)
    return {"scenes": len(scenes)}


# ---------------------------------------------------------------------------------------- vectorisation
class VectorizeParams(Params):
    masks: str
    scenes: str | None = Field(None, description="The source scenes, for the quick-look")
    min_area: float = 0.0
    simplify: float = 0.0
    regularize: bool = False
    block: int = 2048
    formats: list[Literal["geojson", "gpkg", "fgb"]] = ["geojson", "gpkg"]
    merged: str | None = Field("buildings.gpkg", description="One file with every scene's buildings")


def _vectorize(p: VectorizeParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.pipeline.report import scene_quicklook
    from rsseg.vector.blockwise import vectorize
    from rsseg.vector.files import write_vectors

    masks = [m for m in expand_inputs(p.masks) if not m.name.endswith(".prob.tif")]
    counts: dict[str, int] = {}
    for mask in masks:
        prob = mask.with_name(f"{mask.stem}.prob.tif")
        gdf = vectorize(mask, min_area=p.min_area, simplify=p.simplify, prob=prob if prob.exists() else None,
                        regularize=p.regularize, block=p.block, scheduler=ctx.client)
        for fmt in p.formats:
            write_vectors(gdf, ctx.out_dir / f"{mask.stem}.{fmt}", client=ctx.client)  # GeoJSON: on workers
        counts[mask.stem] = len(gdf)
    if p.merged:
        fmt = "gpkg" if "gpkg" in p.formats else p.formats[0]
        merge_vectors([ctx.out_dir / f"{m.stem}.{fmt}" for m in masks], ctx.out_dir / p.merged)
    if p.scenes:
        for scene in expand_inputs(p.scenes)[:4]:
            vectors = ctx.out_dir / f"{scene.stem}.{p.formats[0]}"
            if vectors.exists():
                scene_quicklook(scene, vectors, ctx.out_dir / f"quicklook_{scene.stem}.png")
    return {"buildings": sum(counts.values()), "per_scene": counts}


def merge_vectors(files: list[Path], out: Path) -> Path:
    """Append every file's buildings to one layer (with a ``scene`` column), scene by scene.

    The merged layer keeps the files' CRS when they share one, else EPSG:4326. Memory holds one scene's
    buildings at a time.
    """
    import pyogrio

    from rsseg.fileio import atomic_path

    crss = {pyogrio.read_info(f)["crs"] for f in files}
    target = crss.pop() if len(crss) == 1 else "EPSG:4326"
    with atomic_path(out) as tmp:
        for i, path in enumerate(files):
            gdf = pyogrio.read_dataframe(path).to_crs(target)
            gdf.insert(0, "scene", path.stem)
            pyogrio.write_dataframe(gdf, tmp, layer="buildings", append=i > 0)
    return out


class EvaluateParams(Params):
    pred: str = Field(description="A vector file, or a pattern with {stem}")
    truth: str = Field(description="A vector file, or a pattern with {stem}")
    scenes: str | None = Field(None, description="Scenes whose stems fill {stem} in pred and truth")
    iou: float = 0.5


def _evaluate(p: EvaluateParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.vector import evaluate_vectors

    stems = [s.stem for s in expand_inputs(p.scenes)] if p.scenes else [""]
    results = {stem or "all": evaluate_vectors(p.pred.format(stem=stem), p.truth.format(stem=stem),
                                               iou_threshold=p.iou) for stem in stems}
    (ctx.out_dir / "evaluation.json").write_text(json.dumps(results, indent=2))
    return results


STAGES: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("synth_tianchi", SynthTianchiParams, _synth_tianchi),
    StageKind("synth_scene", SynthSceneParams, _synth_scene),
    StageKind("tile", TileParams, _tile),
    StageKind("train", TrainParams, _train),
    StageKind("predict_tianchi", PredictTianchiParams, _predict_tianchi),
    StageKind("score", ScoreParams, _score),
    StageKind("predict_scenes", PredictScenesParams, _predict_scenes),
    StageKind("vectorize", VectorizeParams, _vectorize),
    StageKind("evaluate", EvaluateParams, _evaluate),
)}
