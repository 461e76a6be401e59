"""Running pipelines on Dask, resumable (:mod:`rsseg.pipeline.spec` reads and expands the YAML).

Each stage writes into ``WORKDIR/<stage>/`` (a foreach instance into ``WORKDIR/<stage>@<item>/``) through a
temporary folder renamed on success (a resumable kind such as ``train`` through
``WORKDIR/.<stage>.<fp12>.partial``, kept when it fails or is killed: the next run with the same fingerprint
continues from its ``last.pt``), with a ``manifest.json`` (inputs with sizes and hashes, parameters,
fingerprint, start and finish times) written last. The fingerprint
(:mod:`rsseg.pipeline.fingerprint`) covers the stage kind, its parameters, its external inputs (globs and
``{stem}`` patterns expanded), the fingerprints of the stages it uses and a hash of rsseg's sources, so
:func:`run` skips a stage whose manifest matches and re-runs what changed or never finished: a run killed
at any point finishes, when started again, with the outputs of an uninterrupted run.

Independent stages run side by side, except that stages of a kind marked ``exclusive_on_cpu`` (``train``:
its trainer process uses every core) run one at a time when their device resolves to the CPU; on GPU
workers they all start at once, as many as the GPUs take.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from pathlib import Path
from typing import Any

import dask
from tqdm.auto import tqdm

from rsseg.errors import PipelineError
from rsseg.pipeline.cluster import dask_client
from rsseg.pipeline.context import StageContext, check_devices, stage_devices, workers_with_gpu
from rsseg.pipeline.fingerprint import completed, fingerprints
from rsseg.pipeline.spec import Pipeline, Stage, load_pipeline
from rsseg.pipeline.stages import STAGES
from rsseg.shipped import file_or_shipped

__all__ = ["Pipeline", "Stage", "fingerprints", "load_pipeline", "run", "run_demo"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ running
def _work_folder(pipe: Pipeline, st: Stage, fingerprint: str) -> Path:
    """Where a stage writes until it succeeds.

    A fresh temporary folder, or for a resumable kind one named by the stage and its fingerprint
    (``.<stage>.<fp12>.partial``) that a re-run of the same stage finds again.
    """
    if STAGES[st.uses].resumable:
        return pipe.workdir / f".{st.name}.{fingerprint[:12]}.partial"
    return pipe.workdir / f".{st.name}.tmp-{uuid.uuid4().hex[:8]}"


def _remove_stale(pipe: Pipeline, heads: dict[str, Any], resume: bool) -> None:
    """Delete what killed runs left: temporary folders, and partial folders no stage of this run continues.

    Without ``resume`` every partial folder goes: the stages start from scratch.
    """
    keep = {_work_folder(pipe, st, heads[st.name]["fingerprint"]).name
            for st in pipe.stages if STAGES[st.uses].resumable and resume}
    for stale in [*pipe.workdir.glob(".*.tmp-*"), *pipe.workdir.glob(".*.partial")]:
        if stale.name not in keep:
            shutil.rmtree(stale, ignore_errors=True)


def _now() -> str:
    """The local time with its offset, to the millisecond (a manifest's start and finish)."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _run_stage(st: Stage, head: dict[str, Any], pipe: Pipeline, ctx: StageContext) -> dict[str, Any]:
    final = pipe.workdir / st.name
    tmp = ctx.out_dir
    resumable = STAGES[st.uses].resumable
    tmp.mkdir(parents=True, exist_ok=resumable)
    started = _now()
    start = time.perf_counter()
    try:
        summary = STAGES[st.uses].run(st.params, ctx)
    except BaseException as exc:  # also a cancelled task's CancelledError: no partial output stays
        if not resumable:  # a resumable stage's folder stays for the next run to continue
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        task = f", task {ctx.failed_task}" if ctx.failed_task else ""
        cause = (str(exc).strip().splitlines() or [""])[0]
        raise PipelineError(f"stage {st.name} ({st.uses}{task}) failed: {type(exc).__name__}: {cause}") from exc
    manifest = {**head, "summary": summary, "tasks": len(ctx.task_keys), "seconds": time.perf_counter() - start,
                "started": started, "finished": _now(),
                "outputs": [{"path": str(p.relative_to(tmp)), "size": p.stat().st_size}
                            for p in sorted(tmp.rglob("*")) if p.is_file()]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return manifest


def run(pipe: Pipeline, scheduler: str | Any | None = None, resume: bool = True, report: bool = True,
        on_start: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a pipeline on Dask; returns the summary of every stage (``skipped`` for resumed ones).

    Args:
        pipe: from :func:`load_pipeline`.
        scheduler: a ``tcp://`` scheduler address or a Client (default: a LocalCluster sized to the machine).
        resume: skip stages whose manifest matches their fingerprint, and continue a crashed training's
            partial folder; False re-runs every stage from scratch.
        report: write ``report.html`` into the work directory at the end.
        on_start: called with the Dask dashboard's address once the cluster is up (the CLI prints it).

    Raises:
        ConfigError: a stage asks for a GPU that no worker offers (checked before any task is submitted).
        PipelineError: a stage failed (after its task retries); it names the stage, the task and the error.
            Completed stages stay, and nothing of the failed stage is left under its final name. Only this
            run's tasks are cancelled: other work on the same client goes on.
    """
    pipe.workdir.mkdir(parents=True, exist_ok=True)
    heads = fingerprints(pipe)
    _remove_stale(pipe, heads, resume)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for st in pipe.stages:
        done = completed(pipe.workdir / st.name, heads[st.name]["fingerprint"]) if resume else None
        if done is not None:
            results[st.name] = {**done, "skipped": True}
        else:
            todo.append(st)
    log.info("pipeline %s: %d stages to run, %d already done", pipe.name, len(todo), len(results))
    started = time.perf_counter()
    # on a GPU box, rsseg's own cluster gives the largest DDP training a worker with its nproc GPUs
    group = max((getattr(st.params, "nproc", 1) for st in todo), default=1)
    with (dask.config.set({"distributed.scheduler.allowed-failures": pipe.retries}),
          dask_client(scheduler, gpu_group=group) as client):
        log.info("rsseg run %s: Dask dashboard at %s", pipe.name, client.dashboard_link)
        if on_start is not None:
            on_start(client.dashboard_link)
        check_devices(todo, client)
        _execute(pipe, todo, heads, results, client)
    summary = {"pipeline": pipe.name, "workdir": str(pipe.workdir), "seconds": time.perf_counter() - started,
               "stages": {s.name: {"skipped": results[s.name].get("skipped", False),
                                   "seconds": results[s.name].get("seconds"), **results[s.name]["summary"]}
                          for s in pipe.stages}}
    if report:
        from rsseg.pipeline.report import write_report

        summary["report"] = str(write_report(pipe.workdir, pipe.name, [results[s.name] for s in pipe.stages]))
    return summary


def _alone_on_cpu(st: Stage, ctx: StageContext) -> bool:
    """Whether ``st`` must not run beside another such stage: its kind says so and its device is the CPU."""
    return STAGES[st.uses].exclusive_on_cpu and not any(ctx.wants_gpu(d) for d in stage_devices(st))


def _execute(pipe: Pipeline, todo: list[Stage], heads: dict[str, Any], results: dict[str, Any], client: Any) -> None:
    """Run ``todo`` stages as their dependencies finish; independent stages run side by side.

    Stages that run alone on the CPU (:func:`_alone_on_cpu`: trainers that use every core) wait for each
    other; other stages run beside them. When a stage fails, the tasks of this run's other stages are
    cancelled (and only those: a caller's client may hold other work), then the failure is raised.
    """
    pending = {st.name: st for st in todo}
    running: dict[Future[dict[str, Any]], StageContext] = {}
    alone: set[str] = set()  # the running stage that holds the CPU to itself, if any
    gpus = workers_with_gpu(client)
    # a thread per stage that may run at once: GPU trainings start together, as many as the GPUs take
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool, \
            tqdm(total=len(pipe.stages), initial=len(results), desc=f"pipeline {pipe.name}", unit="stage") as bar:
        while pending or running:
            for name, st in list(pending.items()):
                if not all(dep in results for dep in st.needs):
                    continue
                tmp = _work_folder(pipe, st, heads[name]["fingerprint"])
                ctx = StageContext(name, client, tmp, retries=pipe.retries, gpu_workers=gpus)
                if _alone_on_cpu(st, ctx):
                    if alone:
                        continue
                    alone.add(name)
                running[pool.submit(_run_stage, st, heads[name], pipe, ctx)] = ctx
                del pending[name]
            if not running:
                raise PipelineError(f"stages {sorted(pending)} wait on stages that cannot run")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                ctx = running.pop(fut)
                alone.discard(ctx.name)
                if fut.exception() is not None:
                    for other in running.values():  # this run's other stages: stop promptly
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
                results[ctx.name] = fut.result()
                bar.update()
                log.info("stage %s done in %.1f s", ctx.name, results[ctx.name]["seconds"])


def run_demo(workdir: str | os.PathLike[str] = "demo-run", scheduler: str | None = None,
             on_start: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the shipped ``pipelines/demo.yaml`` in ``workdir`` and return its headline figures and output paths."""
    pipe = load_pipeline(file_or_shipped("pipelines", "demo"), workdir=workdir)
    summary = run(pipe, scheduler=scheduler, on_start=on_start)
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for st in pipe.stages:
        by_kind.setdefault(st.uses, {})[st.name] = summary["stages"][st.name]
    evaluation = next(iter(by_kind.get("evaluate", {}).values()), {})
    scene = next((v for v in evaluation.values() if isinstance(v, dict)), {})
    vectors = pipe.workdir / next(iter(by_kind.get("vectorize", {})), "vectorize")
    return {
        "validation_dice": {name: s.get("best_dice") for name, s in by_kind.get("train", {}).items()},
        "test_dice": next(iter(by_kind.get("score", {}).values()), {}).get("mean_dice"),
        "buildings_found": scene.get("n_pred"),
        "buildings_true": scene.get("n_truth"),
        "footprint_iou": scene.get("area_iou"),
        "matched_mean_iou": scene.get("mean_iou"),
        "object_f1": scene.get("f1"),
        "submission_csv": [str(pipe.workdir / n / "submission.csv") for n in by_kind.get("predict_tianchi", {})],
        "geojson": sorted(str(p) for p in vectors.glob("*.geojson")),
        "geopackage": str(vectors / "buildings.gpkg"),
        "report": summary.get("report"),
        "seconds": round(summary["seconds"], 1),
    }
