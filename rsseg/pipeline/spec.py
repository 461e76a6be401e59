"""Pipeline files: the YAML spec, ``--set`` overrides, ``foreach`` expansion and ``${...}`` interpolation.

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

A stage with ``foreach`` (a number K: items 0..K-1, a list of names or numbers, or a ``${var}`` giving
either) becomes one stage per item, ``<stage>@<item>``, each with ``${item}`` replaced by its item and a
folder, fingerprint and manifest of its own::

    train: {uses: train, foreach: "${folds}", with: {config: {data: {folds: "${folds}", fold: "${item}"}}}}
    ensemble: {uses: ensemble, with: {runs: "${train}"}}

``${train@2}`` is one instance's folder; ``${train}`` as a whole value is the list of every instance's
folder in item order (and depends on all of them), as is ``after: [train]``. ``--set train.x=...`` sets
``x`` in every instance.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rsseg.errors import ConfigError
from rsseg.options import read_yaml
from rsseg.pipeline.context import Params
from rsseg.pipeline.stages import STAGES
from rsseg.shipped import file_or_shipped

__all__ = ["Pipeline", "PipelineSpec", "Stage", "StageSpec", "load_pipeline"]

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:@[A-Za-z0-9_.-]+)?)\}")
_ITEM_TEXT = re.compile(r"[A-Za-z0-9_.-]+")
#: The name a foreach stage's parameters use for their item (``${item}``); no variable or stage may take it.
ITEM = "item"


class StageSpec(BaseModel):
    """One stage as written in YAML."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    after: list[str] = Field(default_factory=list)
    foreach: Any = Field(None, description="A number K (items 0..K-1), a list of items, or a ${var} giving "
                                           "either: one stage <name>@<item> per item")


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
    """A resolved stage: validated parameters and the stages it depends on (``foreach``: the stage it expands)."""

    name: str
    uses: str
    params: Params
    needs: tuple[str, ...]
    foreach: str | None = None


@dataclass(frozen=True)
class Pipeline:
    """A loaded pipeline: stages in a runnable (topological) order."""

    name: str
    workdir: Path
    retries: int
    stages: tuple[Stage, ...]


@dataclass(frozen=True)
class _Instances:
    """What ``${stage}`` of a foreach stage stands for: its instances' names and folders, in item order."""

    stage: str
    names: tuple[str, ...]
    folders: tuple[Path, ...]


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
    """``value`` with every ``${name}`` replaced; the names used are added to ``refs``.

    A whole-string reference keeps the type of what it names (numbers, lists, null; a foreach stage: the
    list of its instances' folders); inside a longer string it is written as text.
    """
    if isinstance(value, dict):
        return {k: _interpolate(v, names, refs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, names, refs, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == ITEM and key not in names:
            raise ConfigError(f"{where}: ${{item}} is only defined in a stage with foreach; "
                              "add foreach to this stage or write the value itself")
        if key not in names:
            known = ", ".join(k for k in names if "@" not in k)
            raise ConfigError(f"{where}: ${{{key}}} is neither a variable nor a stage; known: {known}")
        if isinstance(names[key], _Instances):
            raise ConfigError(f"{where}: ${{{key}}} inside a longer string, but stage {key} has foreach "
                              f"({len(names[key].names)} instances); use ${{{key}@<item>}} for one instance's "
                              f"folder, or ${{{key}}} as the whole value for the list of them")
        refs.add(key)
        return str(names[key])

    whole = _REF.fullmatch(value)
    found = names.get(whole.group(1)) if whole else None
    if isinstance(found, _Instances):
        refs.add(found.stage)
        return [str(p) for p in found.folders]
    if whole and whole.group(1) in names and not isinstance(found, str | Path):
        refs.add(whole.group(1))
        return found  # keep a variable's type (numbers, lists, null)
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


def _items(name: str, foreach: Any, variables: dict[str, Any], label: str) -> list[Any]:
    """The items of a stage's ``foreach``: 0..K-1 for a number K, a list as given; each a unique plain name."""
    where = f"{label}: stages.{name}.foreach"
    value = _interpolate(foreach, variables, set(), f"{label}: stages.{name}.foreach")
    if isinstance(value, bool) or not isinstance(value, int | list):
        raise ConfigError(f"{where}: {value!r} is neither a number of items nor a list of them; "
                          "expected e.g. 5 (items 0..4), [a, b] or a ${var} giving one")
    items = list(range(value)) if isinstance(value, int) else value
    if not items:
        raise ConfigError(f"{where}: {value!r} gives no items; expected a number >= 1 or a non-empty list")
    seen: set[str] = set()
    for item in items:
        text = str(item)
        if isinstance(item, dict | list | None) or not _ITEM_TEXT.fullmatch(text):
            raise ConfigError(f"{where}: item {item!r} cannot name a stage; expected numbers or names of "
                              "letters, digits, '_', '.' and '-'")
        if text in seen:
            raise ConfigError(f"{where}: item {text!r} appears twice; expected unique items")
        seen.add(text)
    return items


def _expand(spec: PipelineSpec, work: Path, label: str) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:
    """The names ``${...}`` may use, and every stage to build as (name, its YAML stage, item or None)."""
    variables = {"workdir": work, **spec.vars}
    if ITEM in {*spec.vars, *spec.stages}:
        raise ConfigError(f"{label}: {ITEM!r} is reserved for a foreach stage's item; rename that "
                          "variable or stage")
    names: dict[str, Any] = dict(variables)
    planned: list[tuple[str, str, Any]] = []
    for base, st in spec.stages.items():
        if "@" in base:
            raise ConfigError(f"{label}: stages.{base}: '@' is kept for the instances of foreach stages; "
                              "rename the stage")
        if st.foreach is None:
            names[base] = work / base
            planned.append((base, base, None))
            continue
        instances = [(f"{base}@{item}", base, item) for item in _items(base, st.foreach, variables, label)]
        names[base] = _Instances(base, tuple(n for n, _, _ in instances), tuple(work / n for n, _, _ in instances))
        names |= {n: work / n for n, _, _ in instances}
        planned += instances
    return names, planned


def _build_stage(name: str, base: str, item: Any, spec: PipelineSpec, names: dict[str, Any],
                 known: set[str], label: str) -> Stage:
    """One stage (or foreach instance): its parameters interpolated and validated, and what it needs."""
    st = spec.stages[base]
    if st.uses not in STAGES:
        raise ConfigError(f"{label}: stages.{base}.uses: unknown stage kind {st.uses!r}; "
                          f"expected one of {', '.join(STAGES)}")
    refs: set[str] = set()
    own = names | ({ITEM: item} if st.foreach is not None else {})
    params = _interpolate(copy.deepcopy(st.with_), own, refs, f"stages.{name}.with")
    try:
        model = STAGES[st.uses].params.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{label}: {_error_path(f'stages.{name}.with', err)}: {err['msg']}") from exc
    needs: set[str] = set()
    for dep in sorted(refs | set(st.after)):
        if isinstance(names.get(dep), _Instances):
            needs |= set(names[dep].names)  # a foreach stage: every instance
        elif dep in known:
            needs.add(dep)
        elif dep in st.after:
            raise ConfigError(f"{label}: stages.{base}.after: {dep!r} is not another stage")
    if name in needs:
        raise ConfigError(f"{label}: stages.{base}: {name} would depend on itself; expected other stages only")
    return Stage(name, st.uses, model, tuple(sorted(needs)), base if st.foreach is not None else None)


def load_pipeline(source: str | os.PathLike[str] | Traversable | dict[str, Any],
                  overrides: dict[str, str] | None = None, workdir: str | os.PathLike[str] | None = None) -> Pipeline:
    """Read, override, expand (``foreach``), interpolate and validate a pipeline definition.

    Args:
        source: a YAML file, the name of a shipped pipeline (``demo``: rsseg's ``pipelines/demo.yaml``,
            package data of an installed rsseg) or a mapping.
        overrides: ``--set`` values: ``var=...``, ``stage.param.sub=...`` (every instance of a foreach
            stage) or a top-level field.
        workdir: replaces the file's ``workdir``.

    Raises:
        ConfigError: unknown keys, wrong types, unknown stage kinds or references, a ``foreach`` that gives no
            items, ``${item}`` outside a foreach stage, dependency cycles; the message names the key.
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
    names, planned = _expand(spec, work, label)
    known = {name for name, _, _ in planned}
    stages = {name: _build_stage(name, base, item, spec, names, known, label) for name, base, item in planned}
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
