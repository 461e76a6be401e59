"""Inference: sliding-window prediction with TTA streamed over rasters, and Tianchi submissions.

Names load on first use, so that :mod:`rsseg.inference.options` (imported by the ``rsseg`` command for its
options) does not import torch before the command's entry point has set up the process
(:func:`rsseg.pipeline.process.configure_process`: OpenMP reads its wait policy when torch loads).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PRECISIONS",
    "TTA_MODES",
    "PredictOptions",
    "Predictor",
    "predict_images",
    "predict_path",
    "predict_raster",
    "prob_path",
    "read_tags",
]

_HOMES = {
    "PRECISIONS": "options",
    "PredictOptions": "options",
    "TTA_MODES": "tta",
    "Predictor": "tta",
    "predict_images": "predict",
    "predict_path": "predict",
    "predict_raster": "predict",
    "prob_path": "predict",
    "read_tags": "predict",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
