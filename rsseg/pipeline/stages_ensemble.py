"""The ``ensemble`` stage kind: K fold runs become one ``ensemble.json``, tuned on their out-of-fold scores.

Registered in :data:`rsseg.pipeline.stages.STAGES` (kept apart so that the stage kinds module stays readable).
A ``predict_tianchi`` or ``predict_scenes`` stage then predicts with ``checkpoint: ${ensemble}/ensemble.json``.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, field_validator

from rsseg.pipeline.context import Params, StageContext, StageKind

__all__ = ["ENSEMBLE", "EnsembleParams"]


class EnsembleParams(Params):
    """``ensemble``: the fold run folders (``train`` stages' folders, each with best.pt and tuning.json)."""

    runs: list[str] = Field(min_length=1, description="The fold run folders, e.g. [\"${train@0}\", \"${train@1}\"]")

    @field_validator("runs", mode="before")
    @classmethod
    def _as_strings(cls, value: Any) -> Any:
        """One folder, or folders given as paths (a stage reference), as a list of strings."""
        if isinstance(value, str | os.PathLike):
            value = [value]
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value] if isinstance(value, list | tuple) \
            else value


def _ensemble(p: EnsembleParams, ctx: StageContext) -> dict[str, Any]:
    """Write ``ensemble.json`` (:func:`rsseg.inference.folds.fold_ensemble`); the summary is its tuned setting."""
    from rsseg.inference.ensemble import read_ensemble
    from rsseg.inference.folds import fold_ensemble

    path = fold_ensemble(p.runs, ctx.out_dir / "ensemble.json")
    meta = read_ensemble(path)[1]
    keys = ("folds", "threshold", "min_pixels", "tuned_dice", "tuned_dice_at_0.5", "threshold_tta",
            "threshold_precision", "per_fold")
    return {"ensemble": path.name, **{k: meta[k] for k in keys if k in meta}}


#: The stage kind.
ENSEMBLE = StageKind("ensemble", EnsembleParams, _ensemble)
