"""Subpackage namespaces whose names load on first use.

A stage's ``__init__`` lists its public names and the module each lives in; importing the package then costs
nothing, so the ``rsseg`` command can import option models without torch, GDAL or geopandas (and before its
entry point has set up the process: OpenMP reads its wait policy when torch loads).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["attach"]


def attach(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``, whose names live in ``homes`` (name -> module)."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(homes)

    return __getattr__, __dir__, sorted(homes)
