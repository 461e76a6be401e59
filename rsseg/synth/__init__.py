"""Generated data for the demo, tests and benchmarks: georeferenced scenes and Tianchi-layout images.

Names load on first use, so that :mod:`rsseg.synth.options` (imported by the ``rsseg`` command for its
options) does not import rasterio, geopandas and shapely when the command starts.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "SceneOptions",
    "TianchiOptions",
    "footprints_path",
    "make_scene",
    "make_tianchi",
    "render_image",
    "scene_transform",
]

_HOMES = {
    "SceneOptions": "options",
    "TianchiOptions": "options",
    "footprints_path": "generate",
    "make_scene": "generate",
    "make_tianchi": "generate",
    "render_image": "generate",
    "scene_transform": "generate",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
