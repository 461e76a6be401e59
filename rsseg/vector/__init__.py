"""Vectorising building masks: blockwise polygons, cleaning, regularisation, vector files, object scores.

``vectorize`` / ``vectorize_to_file`` turn a mask GeoTIFF into polygons (:mod:`rsseg.vector.blockwise`),
``write_vectors`` / ``merge_vectors`` write them and ``read_vectors`` reads any of them back
(:mod:`rsseg.vector.files`: GeoJSON, GeoPackage, FlatGeobuf, GeoParquet), ``evaluate_vectors`` scores
them against truth polygons (:mod:`rsseg.vector.evaluate`); :class:`VectorizeOptions` and
:class:`EvaluateOptions` are what they can be asked. The names are imported on first use, so that
``rsseg --help`` and ``rsseg.vector.options`` stay free of geopandas and GDAL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsseg.lazy import attach

if TYPE_CHECKING:
    from rsseg.vector.blockwise import block_count, vectorize, vectorize_to_file
    from rsseg.vector.evaluate import evaluate_vectors, match_buildings
    from rsseg.vector.files import FORMATS, merge_vectors, read_vectors, write_vectors
    from rsseg.vector.options import EvaluateOptions, VectorizeOptions

__getattr__, __dir__, __all__ = attach(__name__, {
    "block_count": "blockwise", "vectorize": "blockwise", "vectorize_to_file": "blockwise",
    "evaluate_vectors": "evaluate", "match_buildings": "evaluate",
    "FORMATS": "files", "merge_vectors": "files", "read_vectors": "files", "write_vectors": "files",
    "EvaluateOptions": "options", "VectorizeOptions": "options",
})
