"""Test-time augmentation and the device-side forward pass of inference.

A TTA mode is a set of D4 elements (see :mod:`rsseg.training.augment`): every window is transformed by each
element, the views go through the model (``max_views`` per forward pass: see
:mod:`rsseg.inference.batching`), each prediction is mapped back with the inverse element, and the
probabilities (after the sigmoid) are averaged:

* ``none``: identity (1 view);
* ``flip``: identity, left-right flip, up-down flip, both flips (4 views: D4 elements 0, 4, 6, 2);
* ``d4``: the whole dihedral group, 4 rotations x optional mirror (8 views; square windows only).

:class:`Predictor` runs a model the fast way on its device: ``torch.inference_mode``, channels-last
memory format, optional bf16 autocast; on CUDA the raw windows (uint8 as read) travel from pinned memory
with ``non_blocking`` copies and are normalised on the GPU by :class:`~rsseg.models.Segmenter`. A
``torch.OutOfMemoryError`` halves the views per forward pass and the pass is retried (logged).
:func:`on_device` makes ``cuda:N`` the current device of a block (``torch.cuda.set_device`` for its
duration, restored after), so that streams, events and pinned buffers belong to GPU N.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any, get_args

import torch
from torch import nn

from rsseg.errors import ConfigError
from rsseg.inference.options import PRECISIONS, TtaMode
from rsseg.inference.tuned import COMPUTE_PRECISIONS
from rsseg.training.augment import d4_apply, d4_invert

__all__ = ["PRECISIONS", "TTA_MODES", "Predictor", "on_device", "on_device_iter", "resolve_device", "tta_views"]

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

    CUDA devices come back with their index (``cuda`` -> ``cuda:<current device>``), so that
    :func:`on_device` and the row writer's events address the right GPU.

    Raises:
        ConfigError: an unknown device name, a GPU index the machine does not have, or CUDA asked for on a
        machine without it.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device={device!r}: {exc}; expected auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise ConfigError(f"device={device!r}: this process sees {count} CUDA device(s) (cuda:0 .. "
                              f"cuda:{count - 1}; CUDA_VISIBLE_DEVICES renumbers them); choose one of those")
        dev = torch.device("cuda", index)
    return dev


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` the current CUDA device of this thread while in the block (then restore it).

    Work on ``cuda:N`` (pinned buffers, streams, events, cuDNN handles) then lands on GPU N, not GPU 0;
    the process's current device is left as it was. A no-op on CPU.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_device_iter(device: torch.device, items: Iterable[Any]) -> Iterator[Any]:
    """``items`` iterated with ``device`` current (:func:`on_device`): for a reader thread's pinned batches."""
    with on_device(device):
        yield from items


class Predictor:
    """Probabilities of a segmentation model with test-time augmentation, on one device.

    Args:
        model: takes raw pixels ``(N, C, H, W)`` (uint8 or float) and returns logits ``(N, 1, H, W)``,
            e.g. a :class:`~rsseg.models.Segmenter`. It is moved to ``device``, put in eval mode and
            channels-last format.
        device: where the model runs.
        tta: ``none``, ``flip`` or ``d4``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; bf16 on CPU uses AVX512-BF16/AMX where present).
        max_views: views (windows x TTA views) per forward pass; None: all the views of a batch at once
            (:func:`rsseg.inference.batching.batch_plan` sizes it by the device's memory). Halved on an
            out-of-memory error.

    torch's CPU threads are the process's (entry points size them: :mod:`rsseg.pipeline.process`).
    """

    def __init__(self, model: nn.Module, device: torch.device, tta: str = "d4", precision: str = "fp32",
                 max_views: int | None = None) -> None:
        if max_views is not None and max_views < 1:
            raise ConfigError(f"max_views={max_views}: expected 1 or more views per forward pass")
        if precision not in COMPUTE_PRECISIONS:
            raise ConfigError(f"precision={precision!r}: expected one of {', '.join(COMPUTE_PRECISIONS)} "
                              "(auto is resolved by rsseg.inference.tuned.inference_precision)")
        self.views = tta_views(tta)
        self.tta = tta
        self.device = device
        self.precision = precision
        self.max_views = max_views
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)

    def stack_views(self, batch: torch.Tensor) -> torch.Tensor:
        """The model input for ``batch`` (N, C, H, W, any device): all its views, view-major, on the device."""
        x = self._input(batch)
        return self._views(x, 0, x.shape[0] * len(self.views))

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """The bare forward pass on stacked views (inference mode, autocast as configured)."""
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32"):
            return self.model(views)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean probability over the views: ``(N, H, W)`` float32 on the device, for ``batch`` (N, C, H, W).

        The ``N x views`` views go through the model ``max_views`` at a time (all at once if None); on an
        out-of-memory error, ``max_views`` halves (for this and later batches, logged) and the pass is retried.
        """
        x = self._input(batch)
        n, total_views = x.shape[0], x.shape[0] * len(self.views)
        step = total_views if self.max_views is None else min(self.max_views, total_views)
        total, start = None, 0
        with torch.inference_mode():
            while start < total_views:
                stop = min(total_views, start + step)
                probs = self._forward(x, start, stop, last_try=step <= 1)
                if probs is None:  # out of memory (the error's frames are released by now)
                    step = self._halve(step)
                    continue
                if stop - start == total_views and len(self.views) == 1:
                    return probs
                total = torch.zeros((n, *probs.shape[1:]), device=probs.device) if total is None else total
                self._accumulate(total, probs, start, n)
                start = stop
        return total / len(self.views)

    def _forward(self, x: torch.Tensor, start: int, stop: int, last_try: bool) -> torch.Tensor | None:
        """Probabilities of views ``start .. stop``; None on an out-of-memory error unless ``last_try``."""
        try:
            return torch.sigmoid(self.logits(self._views(x, start, stop)).float())[:, 0]
        except torch.OutOfMemoryError:
            if last_try:
                raise
            return None

    def _input(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        if x.dtype != torch.uint8:
            x = x.float()
        if self.tta == "d4" and x.shape[-1] != x.shape[-2]:
            raise ConfigError(f"tta='d4' rotates windows; they must be square, got {tuple(x.shape[-2:])}")
        return x

    def _views(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Views ``start .. stop`` of the view-major stack of ``x``'s views, channels-last.

        View ``j`` is TTA element ``j // N`` of window ``j % N``.
        """
        n, parts = x.shape[0], []
        for v in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start, v * n) - v * n, min(stop, (v + 1) * n) - v * n
            parts.append(d4_apply(x[lo:hi], self.views[v]))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.contiguous(memory_format=torch.channels_last)

    def _accumulate(self, total: torch.Tensor, probs: torch.Tensor, start: int, n: int) -> None:
        """Add views ``start .. start + len(probs)`` mapped back (inverse D4 element) to their windows."""
        stop = start + probs.shape[0]
        for v in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start, v * n), min(stop, (v + 1) * n)
            total[lo - v * n : hi - v * n] += d4_invert(probs[lo - start : hi - start], self.views[v])

    def _halve(self, step: int) -> int:
        """Half ``step`` views after an out-of-memory error, for this and later batches (logged)."""
        self.max_views = max(1, step // 2)
        log.warning("out of memory on %s with %d views per forward pass; retrying with %d", self.device, step,
                    self.max_views)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.max_views
