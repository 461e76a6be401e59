"""Inference: sliding-window prediction with TTA streamed over rasters, Tianchi submissions, ensembles.

Names load on first use, so that :mod:`rsseg.inference.options` (imported by the ``rsseg`` command for its
options) does not import torch before the command's entry point has set up the process
(:func:`rsseg.pipeline.process.configure_process`: OpenMP reads its wait policy when torch loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsseg.lazy import attach

if TYPE_CHECKING:
    from rsseg.inference.ensemble import Ensemble, read_ensemble, write_ensemble
    from rsseg.inference.folds import fold_ensemble
    from rsseg.inference.options import PRECISIONS, PredictOptions
    from rsseg.inference.predict import predict_images, predict_path, predict_raster, prob_path, read_tags
    from rsseg.inference.tta import TTA_MODES, Predictor

__getattr__, __dir__, __all__ = attach(__name__, {
    "Ensemble": "ensemble", "read_ensemble": "ensemble", "write_ensemble": "ensemble", "fold_ensemble": "folds",
    "PRECISIONS": "options", "PredictOptions": "options",
    "predict_images": "predict", "predict_path": "predict", "predict_raster": "predict", "prob_path": "predict",
    "read_tags": "predict",
    "Predictor": "tta", "TTA_MODES": "tta",
})
