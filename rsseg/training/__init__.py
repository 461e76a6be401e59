"""Training: config, datasets, D4 augmentation, Dice+BCE, the trainer and its torchrun launcher.

Names load on first use, so the ``rsseg`` command can import :class:`LaunchOptions` without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsseg.lazy import attach

if TYPE_CHECKING:
    from rsseg.training.config import LaunchOptions, NodeOptions, TrainConfig, load_config
    from rsseg.training.datasets import ChipDataset, TianchiDataset
    from rsseg.training.imagefolders import ImageFolderDataset
    from rsseg.training.launch import fit, launch
    from rsseg.training.losses import DiceBCELoss

__getattr__, __dir__, __all__ = attach(__name__, {
    "LaunchOptions": "config", "NodeOptions": "config", "TrainConfig": "config", "load_config": "config",
    "ChipDataset": "datasets", "TianchiDataset": "datasets", "ImageFolderDataset": "imagefolders",
    "fit": "launch", "launch": "launch",
    "DiceBCELoss": "losses",
})
