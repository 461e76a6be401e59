"""Training: config, datasets, D4 augmentation, Dice+BCE, the trainer and its torchrun launcher."""

from rsseg.training.config import TrainConfig, load_config
from rsseg.training.datasets import ChipDataset, TianchiDataset
from rsseg.training.launch import fit, launch
from rsseg.training.losses import DiceBCELoss

__all__ = ["ChipDataset", "DiceBCELoss", "TianchiDataset", "TrainConfig", "fit", "launch", "load_config"]
