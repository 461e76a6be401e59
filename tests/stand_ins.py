"""Stand-ins for tests: a tiny network, used through ``model.arch: "stand_ins:TinyNet"``.

Child processes that tests start (``rsseg train``, torchrun ranks, pipeline workers) import it through the
``PYTHONPATH`` that the ``stand_ins`` fixture of conftest.py sets.
"""

import torch
from torch import nn

#: The ``model.arch`` of a training config (or ``create_model``'s ``arch``) that builds :class:`TinyNet`.
TINY_ARCH = "stand_ins:TinyNet"


class TinyNet(nn.Module):
    """A two-level encoder-decoder of a few convolutions without normalisation layers.

    It trains in seconds on a CPU, and having no batch statistics, a batch split across DDP ranks gives
    exactly the gradients of the whole batch in one process.
    """

    def __init__(self, in_channels: int = 3, classes: int = 1, width: int = 8) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(nn.Conv2d(3 * width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, classes, H, W)`` of a normalised ``(N, C, H, W)`` input (H, W even)."""
        skip = self.enc1(x)
        return self.dec(torch.cat([skip, self.up(self.enc2(skip))], dim=1))


class FailingNet(TinyNet):
    """:class:`TinyNet` whose ``fail_after + 1``-th training forward pass in a process raises, like a CUDA OOM."""

    def __init__(self, in_channels: int = 3, classes: int = 1, fail_after: int = 4) -> None:
        super().__init__(in_channels, classes)
        self.fail_after, self.calls = fail_after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """TinyNet's logits, until the training pass after ``fail_after`` of them."""
        if self.training:
            self.calls += 1
            if self.calls > self.fail_after:
                raise RuntimeError("CUDA out of memory (stand-in failure)")
        return super().forward(x)
