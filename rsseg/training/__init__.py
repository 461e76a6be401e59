"""Training: config, datasets, D4 augmentation, Dice+BCE, the trainer and its torchrun launcher."""

from rsseg.training.config import LaunchOptions, TrainConfig, load_config
from rsseg.training.datasets import ChipDataset, TianchiDataset
from rsseg.training.launch import fit, launch
from rsseg.training.losses import DiceBCELoss

__all__ = [
    "ChipDataset",
    "DiceBCELoss",
    "LaunchOptions",
    "TianchiDataset",
    "TrainConfig",
    "fit",
    "launch",
    "load_config",
]
