"""The options of the vector stage, defined once.

:func:`rsseg.vector.vectorize`, ``rsseg vectorize`` and the pipeline's ``vectorize`` stage (whose parameters
subclass :class:`VectorizeOptions`) take the same options with the same defaults; so do
:func:`rsseg.vector.evaluate_vectors`, ``rsseg evaluate`` and the ``evaluate`` stage (:class:`EvaluateOptions`).

This module imports nothing heavy, so that the command line can build its options from it quickly.
"""

from __future__ import annotations

from pydantic import Field

from rsseg.options import Options

__all__ = ["EvaluateOptions", "VectorizeOptions"]


class VectorizeOptions(Options):
    """How a building mask becomes polygons (areas and tolerances in metres whatever the CRS)."""

    min_area: float = Field(0.0, ge=0, description="Drop buildings smaller than this many m2 (on the ground).")
    simplify: float = Field(0.0, ge=0, description="Topology-preserving simplification tolerance in metres "
                            "(0: keep pixel outlines).")
    regularize: bool = Field(False, description="Square up outlines along each building's dominant "
                             "orientation (areas stay within 10%).")
    band: int = Field(1, ge=1, description="Band of the mask raster holding the mask.")
    block: int = Field(2048, ge=1, description="Block size in pixels: each block of the mask is one unit of "
                       "parallel work.")
    overwrite: bool = Field(False, description="Replace an existing output file.")


class EvaluateOptions(Options):
    """How predicted buildings are matched to truth buildings (:func:`rsseg.vector.evaluate_vectors`)."""

    iou: float = Field(0.5, gt=0, le=1, description="Least IoU of a predicted and a truth building to count "
                       "as a match (SpaceNet: 0.5).")
    min_area: float = Field(0.0, ge=0, description="Leave polygons smaller than this many m2 (on the ground) "
                            "out on both sides before matching (SpaceNet-2: 20 pixels, e.g. 1.8 m2 at 0.3 m).")
