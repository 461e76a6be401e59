"""Vectorising building masks: blockwise polygons, cleaning, regularisation, vector files, object scores."""

from rsseg.vector.blockwise import vectorize, vectorize_to_file
from rsseg.vector.evaluate import evaluate_vectors, match_buildings
from rsseg.vector.files import FORMATS, write_vectors

__all__ = ["FORMATS", "evaluate_vectors", "match_buildings", "vectorize", "vectorize_to_file", "write_vectors"]
