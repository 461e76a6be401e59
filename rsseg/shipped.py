"""The YAML files shipped with rsseg: pipelines (``pipelines/``) and training configs (``configs/``).

In the source tree they are the top-level ``pipelines/`` and ``configs/`` folders; an installed rsseg has
them as the data packages ``rsseg.pipelines`` and ``rsseg.configs`` (``package-dir`` in pyproject.toml),
read through :mod:`importlib.resources`. A source checkout (rsseg imported from it, through ``PYTHONPATH`` or
an editable install) reads its own folders: it never picks up another checkout's installed copy, and
setuptools' editable finder does not serve mapped folders without an ``__init__.py`` (setuptools 84).
"""

from __future__ import annotations

import importlib.resources
import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from rsseg.errors import ConfigError

__all__ = ["file_or_shipped", "shipped", "shipped_folder", "shipped_names"]

Kind = Literal["pipelines", "configs"]


def shipped_folder(kind: Kind) -> Traversable:
    """The folder of shipped ``kind`` files: the source tree's own, else the installed package data."""
    source = Path(__file__).resolve().parent.parent
    if (source / "pyproject.toml").is_file() and (source / kind).is_dir():
        return source / kind
    try:
        return importlib.resources.files(f"rsseg.{kind}")
    except ModuleNotFoundError as exc:
        raise ConfigError(f"rsseg.{kind} is not installed with rsseg and no source tree is beside it; "
                          "reinstall rsseg (pip install rsseg)") from exc


def shipped_names(kind: Kind) -> list[str]:
    """The names (without ``.yaml``) of the shipped ``kind`` files, sorted."""
    return sorted(f.name[:-5] for f in shipped_folder(kind).iterdir() if f.name.endswith(".yaml"))


def shipped(kind: Kind, name: str) -> Traversable | None:
    """The shipped file ``name`` (``demo`` or ``demo.yaml``) of ``kind``, or None if there is none."""
    if "/" in name or "\\" in name:
        return None
    found = shipped_folder(kind) / (name if name.endswith(".yaml") else f"{name}.yaml")
    return found if found.is_file() else None


def file_or_shipped(kind: Kind, name: str | os.PathLike[str]) -> Path | Traversable:
    """``name`` if it is an existing file, else the shipped ``kind`` file of that name (``demo``, ...).

    Raises:
        ConfigError: neither a file nor a shipped name; the message lists the shipped ones.
    """
    path = Path(name)
    if path.exists():
        return path
    found = shipped(kind, str(name))
    if found is None:
        what = "pipeline" if kind == "pipelines" else "training config"
        raise ConfigError(f"{what} {name}: no such file, nor a {what} shipped with rsseg; expected a YAML "
                          f"file or one of {', '.join(shipped_names(kind))}")
    return found
