"""YAML pipelines of rsseg's stages run as Dask tasks: runner, stage kinds, clusters, run report."""

from rsseg.pipeline.runner import Pipeline, Stage, load_pipeline, run, run_demo
from rsseg.pipeline.stages import STAGES

__all__ = ["STAGES", "Pipeline", "Stage", "load_pipeline", "run", "run_demo"]
