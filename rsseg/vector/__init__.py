"""Vectorising building masks: blockwise polygons, cleaning, regularisation, vector files, object scores.

``vectorize`` / ``vectorize_to_file`` turn a mask GeoTIFF into polygons (:mod:`rsseg.vector.blockwise`),
``write_vectors`` / ``merge_vectors`` write them and ``read_vectors`` reads any of them back
(:mod:`rsseg.vector.files`: GeoJSON, GeoPackage, FlatGeobuf, GeoParquet), ``evaluate_vectors`` scores
them against truth polygons (:mod:`rsseg.vector.evaluate`); :class:`VectorizeOptions` and
:class:`EvaluateOptions` are what they can be asked. The names are imported on first use, so that
``rsseg --help`` and ``rsseg.vector.options`` stay free of geopandas and GDAL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rsseg.vector.blockwise import block_count, vectorize, vectorize_to_file
    from rsseg.vector.evaluate import evaluate_vectors, match_buildings
    from rsseg.vector.files import FORMATS, merge_vectors, read_vectors, write_vectors
    from rsseg.vector.options import EvaluateOptions, VectorizeOptions

_HOMES = {
    "block_count": "blockwise", "vectorize": "blockwise", "vectorize_to_file": "blockwise",
    "evaluate_vectors": "evaluate", "match_buildings": "evaluate",
    "FORMATS": "files", "merge_vectors": "files", "read_vectors": "files", "write_vectors": "files",
    "EvaluateOptions": "options", "VectorizeOptions": "options",
}

__all__ = [
    "FORMATS", "EvaluateOptions", "VectorizeOptions", "block_count", "evaluate_vectors", "match_buildings",
    "merge_vectors", "read_vectors", "vectorize", "vectorize_to_file", "write_vectors",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
