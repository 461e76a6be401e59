"""Vectorising building masks: blockwise polygons, cleaning, regularisation, vector files, object scores.

The names are imported on first use, so that ``rsseg --help`` and ``rsseg.vector.options`` stay free of
geopandas and GDAL.
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
