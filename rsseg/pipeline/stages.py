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
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, model_validator

from rsseg.errors import PipelineError
from rsseg.fileio import expand_paths, stem_of
from rsseg.inference.options import PredictOptions
from rsseg.pipeline.cluster import task_threads, threads_by_host
from rsseg.pipeline.context import Params, StageContext, StageKind, expand_chip_folders
from rsseg.pipeline.process import THREAD_VARIABLES
from rsseg.pipeline.stages_ensemble import ENSEMBLE
from rsseg.synth.options import SceneOptions, TianchiOptions
from rsseg.tianchi.masks import MaskOptions
from rsseg.tiling.options import TileOptions
from rsseg.training.config import LaunchOptions
from rsseg.vector.options import EvaluateOptions, VectorizeOptions

__all__ = ["STAGES"]

log = logging.getLogger(__name__)
_O = TypeVar("_O", bound=BaseModel)


def _options(p: BaseModel, model: type[_O]) -> _O:
    """The ``model`` options among a stage's parameters (which add the stage's inputs to them)."""
    return model(**p.model_dump(include=set(model.model_fields)))


# ------------------------------------------------------------------------------------------ generated data
class SynthTianchiParams(TianchiOptions):
    """``synth_tianchi``: the options of :func:`rsseg.synth.make_tianchi` (``rsseg synth tianchi``)."""


def _synth_tianchi(p: SynthTianchiParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.synth.generate import make_tianchi

    # The images are rendered in blocks on the workers; this process writes the CSV files.
    info = make_tianchi(ctx.out_dir / "tianchi", p, progress=False,
                        executor=ctx.executor())
    return {k: v for k, v in info.items() if k.startswith("n_")}


class SynthSceneParams(SceneOptions):
    """``synth_scene``: ``count`` scenes (seeds ``seed``, ``seed + 1``, ...), options as ``rsseg synth scene``."""

    count: int = Field(1, ge=1, description="Number of scenes, one task each.")


def _synth_scene(p: SynthSceneParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.synth.generate import make_scene

    futures = []
    for i in range(p.count):
        path = ctx.out_dir / ("scene.tif" if p.count == 1 else f"scene_{i:03d}.tif")
        options = SceneOptions(**p.model_dump(exclude={"count"}) | {"seed": p.seed + i})
        futures.append(ctx.submit(make_scene, path, options, progress=False, label=f"scene{i}"))
    counts = [len(gdf) for gdf in ctx.gather(futures)]
    return {"scenes": p.count, "buildings": sum(counts)}


# ------------------------------------------------------------------------------------------ Tianchi masks
class TianchiMasksParams(MaskOptions):
    """``tianchi_masks``: the options of :func:`rsseg.tianchi.describe_masks` plus the files it reads."""

    masks: str = Field(description="train_mask.csv (name<TAB>rle)")
    images: str = Field(description="The folder of the images the masks belong to (train/)")


def _tianchi_masks(p: TianchiMasksParams, ctx: StageContext) -> dict[str, Any]:
    """Decode and check every row in blocks on the cluster; the table, figures and mosaic go to the stage folder.

    With bad rows the stage fails with one line naming the first; the full list is kept beside the stage folder
    (``WORKDIR/<stage>.bad_rows.csv``), since a failed stage's own folder is removed.
    """
    from rsseg.tianchi import describe_masks, write_mask_report

    options = _options(p, MaskOptions)
    report = describe_masks(p.masks, p.images, options, executor=ctx.executor())
    paths = write_mask_report(report, ctx.out_dir)
    if report.bad_rows or report.table.empty:
        listing = ctx.out_dir.parent / f"{ctx.name}.bad_rows.csv"
        shutil.copyfile(paths["bad_rows"], listing)
        report.raise_if_bad(listing)
    summary = report.summary()
    return {k: v for k, v in summary.items() if not isinstance(v, dict | list)}


# ------------------------------------------------------------------------------------------------ tiling
class TileParams(TileOptions):
    scenes: str = Field(description="A scene, a folder of .tif, a glob, or one remote scene (/vsicurl/https://..., "
                                    "s3://..., gs://..., /vsis3/...)")
    labels: str | None = Field(None, description="A vector/raster file, or a pattern with {stem}")


def _tile(p: TileParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.tiling import write_chips

    options = _options(p, TileOptions)
    executor = ctx.executor()
    chips = 0
    for scene in expand_paths(p.scenes):  # remote names pass through as given
        stem = stem_of(scene)
        labels = p.labels.format(stem=stem) if p.labels else None
        index = write_chips(scene, ctx.out_dir / stem, options, labels=labels, executor=executor)
        with open(index) as rows:  # closed: an open file left to the GC is a ResourceWarning (pytest: an error)
            chips += sum(1 for _ in rows) - 1
    return {"chips": chips}


# ---------------------------------------------------------------------------------------------- training
class TrainParams(Params, LaunchOptions):
    """A training config (every training default is its own) and how to start it (``nproc``)."""

    config: str | dict[str, Any] = Field(description="A training config file (configs/*.yaml) or mapping")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides, e.g. run.epochs: 3")

    def train_config(self, out_dir: Path) -> Any:
        """The validated :class:`rsseg.training.config.TrainConfig`, writing into ``out_dir``."""
        from rsseg.training.config import load_config

        overrides = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.set.items()}
        return load_config(self.config, {**overrides, "run.out_dir": str(out_dir), "run.progress": "false"})

    @model_validator(mode="after")
    def _valid_config(self) -> TrainParams:
        self.train_config(Path("."))  # a typo in the training config fails when the pipeline loads
        return self


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the Dask worker that started us dies (Linux), so no orphan trains on."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def train_subprocess(config_path: Path, nproc: int, log_path: Path) -> None:
    """Run ``rsseg train`` in a child process (Dask workers are daemons: no DataLoader workers inside).

    Its output (stdout and stderr) is appended to ``log_path`` as it comes, so that the runner can show the
    epochs while it trains and a retried attempt's log follows the first one's.

    Raises:
        PipelineError: the trainer failed; the message ends with the last line of its own output.
    """
    cmd = [sys.executable, "-m", "rsseg.cli", "train", str(config_path), "--nproc", str(nproc)]
    # Dask starts single-threaded workers with OMP/MKL/OpenBLAS limited to 1 thread; the trainer is a
    # process of its own and uses every core (run.threads in the config still sets it explicitly). Dask's
    # 64 KiB heap trim, which it inherits too, is overridden by `rsseg train` (process.configure_process).
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES} | {"PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    if done.returncode:
        last = (_last_lines(log_path, 1) or ["(no output)"])[-1].removeprefix("rsseg: error: ")
        raise PipelineError(f"rsseg train exited with {done.returncode}: {last}")


def _last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` non-empty lines of a text file (none if it is missing)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [line for line in lines if line.strip()][-count:]


def _relay(log_path: Path, offset: int, stage: str) -> int:
    """Log the trainer's own log lines written since ``offset`` (epochs, validation Dice); the new offset."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset
    complete = chunk[:chunk.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        level, _, rest = line.partition(" ")
        if level in ("INFO", "WARNING", "ERROR") and rest.startswith("rsseg"):
            log.log(logging.getLevelName(level), "stage %s: %s", stage, rest.partition(": ")[2])
    return offset + len(complete)


def _follow(ctx: StageContext, fut: Any, log_path: Path) -> None:
    """Wait for the trainer task, relaying its log as it grows; on failure, log the trainer's last lines."""
    offset = 0
    while not fut.done():
        offset = _relay(log_path, offset, ctx.name)
        time.sleep(0.5)
    _relay(log_path, offset, ctx.name)
    try:
        ctx.gather([fut])
    except Exception:
        if not ctx.cancelled:  # cancelled because another stage failed: that stage's error is the story
            tail = "\n".join(_last_lines(log_path, 20))
            log.error("stage %s: training failed; the last lines of %s:\n%s", ctx.name, log_path.name, tail)
        raise


def _resuming(ctx: StageContext, epochs: int) -> None:
    """Say so when the stage's folder holds a crashed attempt's ``last.pt`` that the trainer will continue."""
    last = ctx.out_dir / "last.pt"
    if last.exists():
        from rsseg.models import load_checkpoint

        done = int(load_checkpoint(last)["meta"]["epoch"])
        log.info("stage %s: resumed at epoch %d/%d from %s", ctx.name, done + 1, epochs, last)


def _train(p: TrainParams, ctx: StageContext) -> dict[str, Any]:
    cfg = p.train_config(ctx.out_dir)
    if cfg.data.source == "chips":  # the tile stage's folder holds a chip folder per scene
        chips = expand_chip_folders(cfg.data.chips)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"chips": chips})})
    # The folder is the stage's own (.<stage>.<fp12>.partial): a last.pt in it is a crashed attempt of this
    # very stage, continued (and a retried task continues its first attempt instead of refusing the folder).
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})})
    _resuming(ctx, cfg.run.epochs)
    config_path = ctx.out_dir / "train_config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    gpu = p.nproc if ctx.wants_gpu(cfg.run.device) else 0  # DDP on nproc GPUs: one task holds them all
    log_path = ctx.out_dir / "train.log"
    _follow(ctx, ctx.submit(train_subprocess, config_path, p.nproc, log_path, gpu=gpu, label="torchrun"), log_path)
    best = ctx.out_dir / "best.pt"
    from rsseg.models import load_checkpoint

    meta = load_checkpoint(best)["meta"]
    return {"checkpoint": best.name,
            **{k: meta[k] for k in ("epoch", "best_dice", "threshold", "threshold_tta") if k in meta}}


# --------------------------------------------------------------------------------------------- inference
def _in_task_share(threads_on: dict[str, int], tasks: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Dask task: ``fn`` with torch's CPU threads this task's share of its host, restored afterwards.

    The library never sizes threads; the task's starting point does (:func:`rsseg.pipeline.process.torch_threads`).
    """
    from rsseg.pipeline.process import torch_threads

    with torch_threads(task_threads(threads_on, tasks)):
        return fn(*args, **kwargs)


class PredictTianchiParams(PredictOptions):
    checkpoint: str | list[str] = Field(description="A checkpoint, several (an ensemble) or an ensemble.json")
    images: str
    sample: str | None = None


def _predict_tianchi(p: PredictTianchiParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.inference.predict import predict_images
    from rsseg.pipeline.report import tiles_quicklook

    out = ctx.out_dir / "submission.csv"
    fut = ctx.submit(_in_task_share, threads_by_host(ctx.client), 1, predict_images, p.checkpoint, p.images, out,
                     sample=p.sample, options=_options(p, PredictOptions), gpu=ctx.wants_gpu(p.device), label="predict")
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


class PredictScenesParams(PredictOptions):
    """Prediction options plus the inputs (``output_kind`` both, the default, for a vectorize stage)."""

    checkpoint: str | list[str] = Field(description="A checkpoint, several (an ensemble) or an ensemble.json")
    scenes: str


def _predict_scenes(p: PredictScenesParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.inference.predict import predict_raster

    scenes = expand_paths(p.scenes)
    threads_on = threads_by_host(ctx.client)
    options = _options(p, PredictOptions)
    futures = [ctx.submit(_in_task_share, threads_on, len(scenes), predict_raster, p.checkpoint, scene,
                          ctx.out_dir / f"{stem_of(scene)}.tif", options, gpu=ctx.wants_gpu(p.device),
                          label=stem_of(scene))
               for scene in scenes]
    ctx.gather(futures)
    return {"scenes": len(scenes)}


# ---------------------------------------------------------------------------------------- vectorisation
class VectorizeParams(Params, VectorizeOptions):
    """The vectorising options (:class:`rsseg.vector.VectorizeOptions`), plus which masks and formats."""

    masks: str
    scenes: str | None = Field(None, description="The source scenes, for the quick-look")
    formats: list[Literal["geojson", "gpkg", "fgb", "parquet"]] = ["geojson", "gpkg"]
    merged: str | None = Field("buildings.gpkg", description="One file with every scene's buildings, ids "
                               "unique across scenes (scene-number); .parquet for GeoParquet")


def _vectorize(p: VectorizeParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.pipeline.report import scene_quicklook
    from rsseg.vector import merge_vectors, vectorize, write_vectors

    masks = [Path(m) for m in expand_paths(p.masks) if not str(m).endswith(".prob.tif")]
    options = _options(p, VectorizeOptions)
    counts: dict[str, int] = {}
    for mask in masks:
        prob = mask.with_name(f"{mask.stem}.prob.tif")
        gdf = vectorize(mask, options, prob=prob if prob.exists() else None, executor=ctx.executor())
        for fmt in p.formats:
            write_vectors(gdf, ctx.out_dir / f"{mask.stem}.{fmt}", overwrite=p.overwrite)
        counts[mask.stem] = len(gdf)
    if p.merged:
        fmt = "gpkg" if "gpkg" in p.formats else p.formats[0]
        merge_vectors([ctx.out_dir / f"{m.stem}.{fmt}" for m in masks], ctx.out_dir / p.merged,
                      overwrite=p.overwrite)
    drawable = [fmt for fmt in p.formats if fmt != "parquet"]  # the quick-look reads through pyogrio
    if p.scenes and drawable:
        for scene in expand_paths(p.scenes)[:4]:
            vectors = ctx.out_dir / f"{stem_of(scene)}.{drawable[0]}"
            if vectors.exists():
                scene_quicklook(scene, vectors, ctx.out_dir / f"quicklook_{stem_of(scene)}.png")
    return {"buildings": sum(counts.values()), "per_scene": counts}


class EvaluateParams(Params, EvaluateOptions):
    """The matching options (:class:`rsseg.vector.EvaluateOptions`), plus which files to compare."""

    pred: str = Field(description="A vector file, or a pattern with {stem}")
    truth: str = Field(description="A vector file, or a pattern with {stem}")
    scenes: str | None = Field(None, description="Scenes whose stems fill {stem} in pred and truth")


def _evaluate(p: EvaluateParams, ctx: StageContext) -> dict[str, Any]:
    from rsseg.vector import evaluate_vectors

    stems = [stem_of(s) for s in expand_paths(p.scenes)] if p.scenes else [""]
    options = _options(p, EvaluateOptions)
    results = {stem or "all": evaluate_vectors(p.pred.format(stem=stem), p.truth.format(stem=stem), options)
               for stem in stems}
    (ctx.out_dir / "evaluation.json").write_text(json.dumps(results, indent=2))
    return results


STAGES: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("synth_tianchi", SynthTianchiParams, _synth_tianchi),
    StageKind("synth_scene", SynthSceneParams, _synth_scene),
    StageKind("tianchi_masks", TianchiMasksParams, _tianchi_masks),
    StageKind("tile", TileParams, _tile),
    StageKind("train", TrainParams, _train, resumable=True, exclusive_on_cpu=True),
    ENSEMBLE,
    StageKind("predict_tianchi", PredictTianchiParams, _predict_tianchi),
    StageKind("score", ScoreParams, _score),
    StageKind("predict_scenes", PredictScenesParams, _predict_scenes),
    StageKind("vectorize", VectorizeParams, _vectorize),
    StageKind("evaluate", EvaluateParams, _evaluate),
)}
