"""Pipelines: stages declared in YAML, run on Dask, resumable.

A pipeline file names its stages, each with a kind from :data:`rsseg.pipeline.stages.STAGES` and its parameters::

    name: scenes_to_buildings
    workdir: runs/buildings
    vars: {scenes: data/scenes, checkpoint: model.pt}
    stages:
      predict: {uses: predict_scenes, with: {checkpoint: "${checkpoint}", scenes: "${scenes}"}}
      vectors: {uses: vectorize, with: {masks: "${predict}"}}

``${name}`` is replaced by a variable from ``vars``, by the output folder of the stage ``name`` (which
makes this stage depend on it), or by ``${workdir}``. ``--set key=value`` overrides a variable
(``data_dir=...``), a stage parameter (``train.config.optim.epochs=3``) or a top-level field.

Each stage writes into ``WORKDIR/<stage>/`` through a temporary folder renamed on success (a ``train``
stage through ``WORKDIR/.<stage>.<fp12>.partial``, kept when it fails or is killed: the next run with the
same fingerprint continues from its ``last.pt``), with a ``manifest.json`` (inputs with sizes and hashes,
parameters, fingerprint) written last. The fingerprint
(:mod:`rsseg.pipeline.fingerprint`) covers the stage kind, its parameters, its external inputs (globs and
``{stem}`` patterns expanded), the fingerprints of the stages it uses and a hash of rsseg's sources, so
:func:`run` skips a stage whose manifest matches and re-runs what changed or never finished: a run killed
at any point finishes, when started again, with the outputs of an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import dask
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from rsseg.errors import ConfigError, PipelineError
from rsseg.options import read_yaml
from rsseg.pipeline.cluster import dask_client
from rsseg.pipeline.context import Params, StageContext, check_devices, workers_with_gpu
from rsseg.pipeline.fingerprint import completed, fingerprints
from rsseg.pipeline.stages import STAGES
from rsseg.shipped import file_or_shipped

__all__ = ["Pipeline", "Stage", "fingerprints", "load_pipeline", "run", "run_demo"]

log = logging.getLogger(__name__)

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StageSpec(BaseModel):
    """One stage as written in YAML."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    after: list[str] = Field(default_factory=list)


class PipelineSpec(BaseModel):
    """A pipeline file as written in YAML."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    workdir: Path = Path("run")
    retries: int = Field(1, ge=0, description="Task retries (and allowed worker losses)")
    vars: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, StageSpec]


@dataclass(frozen=True)
class Stage:
    """A resolved stage: validated parameters and the stages it depends on."""

    name: str
    uses: str
    params: Params
    needs: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    """A loaded pipeline: stages in a runnable (topological) order."""

    name: str
    workdir: Path
    retries: int
    stages: tuple[Stage, ...]


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {key} is not a mapping")
    tree[keys[-1]] = value


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, str]) -> None:
    stages = raw.get("stages") or {}
    for key, text in overrides.items():
        value = yaml.safe_load(text) if text != "" else ""
        head, *rest = key.split(".")
        if head in stages and rest:
            _set_dotted(stages[head].setdefault("with", {}), rest, value)
        elif head == "vars" and rest:
            _set_dotted(raw.setdefault("vars", {}), rest, value)
        elif not rest and head in (raw.get("vars") or {}):
            raw["vars"][head] = value
        elif not rest and head in PipelineSpec.model_fields and head != "stages":
            raw[head] = value
        else:
            valid = sorted([*(raw.get("vars") or {}), *(f"{s}.<param>" for s in stages)])
            raise ConfigError(f"--set {key}: not a variable, stage parameter or pipeline field; "
                              f"expected one of {', '.join(valid)}")


def _interpolate(value: Any, names: dict[str, Any], refs: set[str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, names, refs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, names, refs, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in names:
            raise ConfigError(f"{where}: ${{{key}}} is neither a variable nor a stage; known: {', '.join(names)}")
        refs.add(key)
        return str(names[key])

    whole = _REF.fullmatch(value)
    if whole and not isinstance(names.get(whole.group(1)), str | Path):
        sub(whole)
        return names[whole.group(1)]  # keep a variable's type (numbers, lists, null)
    return _REF.sub(sub, value)


def _error_path(prefix: str, err: dict[str, Any]) -> str:
    return ".".join([prefix, *(str(p) for p in err["loc"])]).strip(".")


def _read_source(source: str | os.PathLike[str] | Traversable | dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The pipeline file (None for a mapping) and a copy of its content."""
    if isinstance(source, dict):
        return None, copy.deepcopy(source)
    path = file_or_shipped("pipelines", source) if isinstance(source, str | os.PathLike) else source
    raw = read_yaml(path, "pipeline")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name and stages, got {type(raw).__name__}")
    return path, raw


def load_pipeline(source: str | os.PathLike[str] | Traversable | dict[str, Any],
                  overrides: dict[str, str] | None = None, workdir: str | os.PathLike[str] | None = None) -> Pipeline:
    """Read, override, interpolate and validate a pipeline definition.

    Args:
        source: a YAML file, the name of a shipped pipeline (``demo``: rsseg's ``pipelines/demo.yaml``,
            package data of an installed rsseg) or a mapping.
        overrides: ``--set`` values: ``var=...``, ``stage.param.sub=...`` or a top-level field.
        workdir: replaces the file's ``workdir``.

    Raises:
        ConfigError: unknown keys, wrong types, unknown stage kinds or references, dependency cycles;
            the message names the key.
    """
    path, raw = _read_source(source)
    _apply_overrides(raw, overrides or {})
    if workdir is not None:
        raw["workdir"] = str(workdir)
    label = path.name if path else "pipeline"
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{label}: {_error_path('', err)}: {err['msg']}") from exc
    work = spec.workdir.expanduser().absolute()
    names: dict[str, Any] = {"workdir": work, **spec.vars, **{s: work / s for s in spec.stages}}
    stages = {}
    for name, st in spec.stages.items():
        if st.uses not in STAGES:
            raise ConfigError(f"{label}: stages.{name}.uses: unknown stage kind {st.uses!r}; "
                              f"expected one of {', '.join(STAGES)}")
        refs: set[str] = set()
        params = _interpolate(st.with_, names, refs, f"stages.{name}.with")
        try:
            model = STAGES[st.uses].params.model_validate(params)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"{label}: {_error_path(f'stages.{name}.with', err)}: {err['msg']}") from exc
        needs = tuple(sorted((refs & set(spec.stages)) | set(st.after)))
        for dep in needs:
            if dep not in spec.stages or dep == name:
                raise ConfigError(f"{label}: stages.{name}.after: {dep!r} is not another stage")
        stages[name] = Stage(name, st.uses, model, needs)
    return Pipeline(spec.name, work, spec.retries, _topological(stages, label))


def _topological(stages: dict[str, Stage], label: str) -> tuple[Stage, ...]:
    order: list[Stage] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ConfigError(f"{label}: stages depend on each other in a cycle: {' -> '.join((*chain, name))}")
        state[name] = 1
        for dep in stages[name].needs:
            visit(dep, (*chain, name))
        state[name] = 2
        order.append(stages[name])

    for name in stages:
        visit(name, ())
    return tuple(order)


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


def _run_stage(st: Stage, head: dict[str, Any], pipe: Pipeline, ctx: StageContext) -> dict[str, Any]:
    final = pipe.workdir / st.name
    tmp = ctx.out_dir
    resumable = STAGES[st.uses].resumable
    tmp.mkdir(parents=True, exist_ok=resumable)
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
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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


def _execute(pipe: Pipeline, todo: list[Stage], heads: dict[str, Any], results: dict[str, Any], client: Any) -> None:
    """Run ``todo`` stages as their dependencies finish; independent stages run side by side.

    When a stage fails, the tasks of this run's other stages are cancelled (and only those: a caller's
    client may hold other work), then the failure is raised.
    """
    pending = {st.name: st for st in todo}
    running: dict[Future[dict[str, Any]], StageContext] = {}
    gpus = workers_with_gpu(client)
    with ThreadPoolExecutor(max_workers=4) as pool, tqdm(total=len(pipe.stages), initial=len(results),
                                                         desc=f"pipeline {pipe.name}", unit="stage") as bar:
        while pending or running:
            for name, st in list(pending.items()):
                if all(dep in results for dep in st.needs):
                    tmp = _work_folder(pipe, st, heads[name]["fingerprint"])
                    ctx = StageContext(name, client, tmp, retries=pipe.retries, gpu_workers=gpus)
                    running[pool.submit(_run_stage, st, heads[name], pipe, ctx)] = ctx
                    del pending[name]
            if not running:
                raise PipelineError(f"stages {sorted(pending)} wait on stages that cannot run")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                ctx = running.pop(fut)
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
