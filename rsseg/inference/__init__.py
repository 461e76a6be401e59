"""Inference: sliding-window prediction with TTA streamed over rasters, and Tianchi submissions."""

from rsseg.inference.predict import predict_images, predict_path, predict_raster, prob_path, read_tags
from rsseg.inference.tta import PRECISIONS, TTA_MODES, Predictor

__all__ = [
    "PRECISIONS",
    "TTA_MODES",
    "Predictor",
    "predict_images",
    "predict_path",
    "predict_raster",
    "prob_path",
    "read_tags",
]
