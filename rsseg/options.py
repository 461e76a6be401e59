"""Options defined once: pydantic models shared by library signatures, click commands and pipeline stages.

A stage declares its options as a subclass of :class:`Options` (defaults, types, choices and help in one
place). The library function takes the model or the same names as keywords (:func:`resolve`), the click
command gets one option per field (:func:`click_options`), and a pipeline stage's parameters subclass the
model, so defaults cannot drift between the three.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rsseg.errors import ConfigError

__all__ = ["Options", "click_options", "options_from_click", "read_yaml", "resolve"]

OptionsT = TypeVar("OptionsT", bound="Options")
F = TypeVar("F", bound=Callable[..., Any])


class Options(BaseModel):
    """Base of every options model: unknown names are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve(
    model: type[OptionsT], options: OptionsT | None = None, values: Mapping[str, Any] | None = None
) -> OptionsT:
    """The options a library call runs with: ``options`` (or the defaults) updated with keyword ``values``.

    Raises:
        ConfigError: an unknown name or a value of the wrong type, naming the field and the valid names.
    """
    merged = {**(options.model_dump() if options is not None else {}), **(values or {})}
    try:
        return model(**merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '?'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{model.__name__}: {problems} (valid names: {', '.join(model.model_fields)})") from exc


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _int_list(value: str | None) -> list[int] | None:
    if value in (None, ""):
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers like 1,2,3") from None


def _option(name: str, field: Any) -> Callable[[F], F]:
    flag = "--" + name.replace("_", "-")
    kind = _strip_optional(field.annotation)
    default = None if field.is_required() else field.default
    help_text = field.description or ""
    if kind is bool:
        if default:
            return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=True, show_default=True,
                                help=help_text)
        return click.option(flag, name, is_flag=True, default=False, help=help_text)
    kwargs: dict[str, Any] = {"default": default, "show_default": default is not None, "help": help_text}
    if typing.get_origin(kind) is Literal:
        kwargs["type"] = click.Choice([str(a) for a in typing.get_args(kind)])
    elif typing.get_origin(kind) is list:
        kwargs["callback"] = lambda _ctx, _param, value: _int_list(value)
        kwargs["default"] = None if default is None else ",".join(map(str, default))
        kwargs["metavar"] = "N,N,..."
    elif kind in (int, float, str):
        kwargs["type"] = kind
    elif kind is Path:
        kwargs["type"] = click.Path(path_type=Path)
    return click.option(flag, name, **kwargs)


def click_options(model: type[Options], exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator adding one click option per field of ``model`` (``max_nodata`` -> ``--max-nodata``).

    Defaults, choices (``Literal`` fields) and help (``Field(description=...)``) come from the model; a bool
    field is a flag; a ``list[int]`` field takes ``1,2,3``.
    """

    def decorate(func: F) -> F:
        for name, field in reversed(list(model.model_fields.items())):
            if name not in exclude:
                func = _option(name, field)(func)
        return func

    return decorate


def options_from_click(model: type[OptionsT], params: dict[str, Any]) -> OptionsT:
    """Pop ``model``'s fields out of a click command's ``params`` and build the options from them."""
    return resolve(model, values={name: params.pop(name) for name in list(params) if name in model.model_fields})


def read_yaml(path: Path | Any, what: str) -> Any:
    """The YAML content of ``path`` (a Path or Traversable); a missing file or bad YAML is a ConfigError."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
