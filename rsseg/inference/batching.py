"""How much goes through the model at once: forward batches sized in views, by the memory the device has.

A forward pass takes *views* (windows x TTA views). With ``batch_size`` left at None (the default), the
number of views per forward pass is what fits a share of the device's free memory (CPU: available RAM,
:func:`psutil.virtual_memory`; CUDA: :func:`torch.cuda.mem_get_info`), capped per device type, and the
windows read per batch are those views divided by the TTA views, so ``--tta d4`` holds no more activations
than ``--tta none``. An explicit ``batch_size`` (windows) wins: ``batch_size`` x views per forward pass, as
before. On a CUDA out-of-memory error the :class:`~rsseg.inference.tta.Predictor` halves its views per
forward pass and retries.
"""

from __future__ import annotations

import os

import psutil
import torch

__all__ = ["BYTES_PER_PIXEL", "MAX_VIEWS", "MEMORY_SHARE", "batch_plan", "free_memory", "reader_threads",
           "views_per_forward"]

#: Peak bytes of a forward pass per input pixel and view, fp32: measured on a resnet34 U-Net on CPU
#: (``rsseg predict`` on a 2048^2 scene peaked at 10.2 GB with 8 windows x 8 d4 views per forward pass and
#: 2.4 GB with 8 x 1: about 140 MB, 530 B/pixel, a 512^2 view), rounded up. bf16/fp16 autocast halves it.
BYTES_PER_PIXEL = 600
#: The share of the free memory one forward pass may take (the rest: blending strip, queued batches and
#: rows, GDAL's cache, other processes; on a GPU, the allocator's fragmentation).
MEMORY_SHARE = {"cpu": 0.25, "cuda": 0.5}
#: Views per forward pass at most. CPU: throughput per view does not grow past a few views, and 8 is the
#: old default's 8 windows with TTA none, so every TTA mode peaks like ``none`` did. CUDA: enough to keep
#: an H100 busy (1,500+ windows/s at 32 windows with TTA none) without holding much memory.
MAX_VIEWS = {"cpu": 8, "cuda": 128}


def free_memory(device: torch.device) -> int:
    """Bytes free for the next forward pass: available RAM (CPU) or free memory on the GPU (CUDA)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def views_per_forward(device: torch.device, window: int, precision: str = "fp32", free: int | None = None) -> int:
    """Views of ``window`` x ``window`` pixels that one forward pass may take on ``device`` (at least 1).

    ``free``: bytes free (default: :func:`free_memory`); a parameter so that tests can set it.
    """
    free = free_memory(device) if free is None else free
    per_view = BYTES_PER_PIXEL * window * window // (2 if precision in ("bf16", "fp16") else 1)
    fit = int(free * MEMORY_SHARE.get(device.type, MEMORY_SHARE["cpu"])) // max(1, per_view)
    return max(1, min(MAX_VIEWS.get(device.type, MAX_VIEWS["cpu"]), fit))


def batch_plan(batch_size: int | None, n_views: int, device: torch.device, window: int, precision: str = "fp32",
               free: int | None = None) -> tuple[int, int]:
    """``(windows per batch read, views per forward pass)`` for ``n_views`` TTA views a window.

    An explicit ``batch_size`` gives ``(batch_size, batch_size * n_views)``; None sizes the views by the
    device's memory (:func:`views_per_forward`), and reads as many windows as fill them (at least one; a
    window whose views do not fit goes through the model in several passes).
    """
    if batch_size is not None:
        return batch_size, batch_size * n_views
    views = views_per_forward(device, window, precision, free)
    return max(1, views // n_views), views


def reader_threads(device: torch.device) -> int:
    """Threads reading and decoding batches of windows ahead of the model.

    CPU: 1 (the model takes the cores and is far slower than reading: one thread keeps up). CUDA: half the
    cores this process may use, 2 to 4: one thread decoded about 600 windows of 512^2 (3 bands, DEFLATE)
    per CPU-second on the development machine, below the 1,500 windows/s a GPU takes with TTA none.
    """
    if device.type != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, min(4, cores // 2))
