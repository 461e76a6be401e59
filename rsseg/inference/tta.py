"""Test-time augmentation and the device-side forward pass of inference.

A TTA mode is a set of D4 elements (see :mod:`rsseg.training.augment`): every window is transformed by each
element, all the views go through the model as one batch, each prediction is mapped back with the
inverse element, and the probabilities (after the sigmoid) are averaged:

* ``none``: identity (1 view);
* ``flip``: identity, left-right flip, up-down flip, both flips (4 views: D4 elements 0, 4, 6, 2);
* ``d4``: the whole dihedral group, 4 rotations x optional mirror (8 views; square windows only).

:class:`Predictor` runs a model the fast way on its device: ``torch.inference_mode``, channels-last
memory format, optional bf16 autocast; on CUDA the raw windows (uint8 as read) travel from pinned memory
with ``non_blocking`` copies and are normalised on the GPU by :class:`~rsseg.models.Segmenter`.
"""

from __future__ import annotations

import logging
from typing import get_args

import torch
from torch import nn

from rsseg.errors import ConfigError
from rsseg.inference.options import PRECISIONS, TtaMode
from rsseg.training.augment import d4_apply, d4_invert

__all__ = ["PRECISIONS", "TTA_MODES", "Predictor", "resolve_device", "tta_views"]

log = logging.getLogger(__name__)

#: D4 elements of each TTA mode (element 4 flips left-right, 6 flips up-down, 2 is both flips), in the order
#: of :data:`rsseg.inference.options.TtaMode`.
TTA_MODES: dict[str, tuple[int, ...]] = dict(zip(get_args(TtaMode), ((0,), (0, 4, 6, 2), tuple(range(8))),
                                                 strict=True))


def tta_views(mode: str) -> tuple[int, ...]:
    """The D4 elements of TTA ``mode`` (``none``, ``flip`` or ``d4``).

    Raises:
        ConfigError: an unknown mode.
    """
    try:
        return TTA_MODES[mode]
    except KeyError as exc:
        raise ConfigError(f"tta={mode!r}: expected one of {', '.join(TTA_MODES)}") from exc


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values as torch understands them.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for on a machine without it.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device={device!r}: {exc}; expected auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


class Predictor:
    """Probabilities of a segmentation model with test-time augmentation, on one device.

    Args:
        model: takes raw pixels ``(N, C, H, W)`` (uint8 or float) and returns logits ``(N, 1, H, W)``,
            e.g. a :class:`~rsseg.models.Segmenter`. It is moved to ``device``, put in eval mode and
            channels-last format.
        device: where the model runs.
        tta: ``none``, ``flip`` or ``d4``.
        precision: ``fp32``, or ``bf16`` (autocast; on CPU this uses AVX512-BF16/AMX where present).

    torch's CPU threads are the process's (entry points size them: :mod:`rsseg.pipeline.process`).
    """

    def __init__(self, model: nn.Module, device: torch.device, tta: str = "d4", precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.views = tta_views(tta)
        self.tta = tta
        self.device = device
        self.precision = precision
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)

    def stack_views(self, batch: torch.Tensor) -> torch.Tensor:
        """The model input for ``batch`` (N, C, H, W, any device): its views, view-major, on the device."""
        x = batch.to(self.device, non_blocking=True)
        if x.dtype != torch.uint8:
            x = x.float()
        if len(self.views) > 1:
            if x.shape[-1] != x.shape[-2] and self.tta == "d4":
                raise ConfigError(f"tta='d4' rotates windows; they must be square, got {tuple(x.shape[-2:])}")
            x = torch.cat([d4_apply(x, k) for k in self.views])
        return x.contiguous(memory_format=torch.channels_last)

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """The bare forward pass on stacked views (inference mode, autocast as configured)."""
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            return self.model(views)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean probability over the views: ``(N, H, W)`` float32 on the device, for ``batch`` (N, C, H, W)."""
        n = batch.shape[0]
        with torch.inference_mode():
            probs = torch.sigmoid(self.logits(self.stack_views(batch)).float())[:, 0]
            if len(self.views) == 1:
                return probs
            total = torch.zeros_like(probs[:n])
            for k, view in zip(self.views, probs.split(n), strict=True):
                total += d4_invert(view, k)
            return total / len(self.views)
