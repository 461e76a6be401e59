"""YAML pipelines of rsseg's stages run as Dask tasks: runner, stage kinds, clusters, run report.

Names load on first use, so that :mod:`rsseg.pipeline.process` (what entry points call first) imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsseg.lazy import attach

if TYPE_CHECKING:
    from rsseg.pipeline.runner import run, run_demo
    from rsseg.pipeline.spec import Pipeline, Stage, load_pipeline
    from rsseg.pipeline.stages import STAGES

__getattr__, __dir__, __all__ = attach(__name__, {
    "Pipeline": "spec", "Stage": "spec", "load_pipeline": "spec", "run": "runner", "run_demo": "runner",
    "STAGES": "stages",
})
