"""What training does differently per device: precision, SyncBatchNorm, the RNG states it resumes.

``run.precision: auto`` is decided from facts about the device: :func:`choose_precision` is a pure
function of :class:`DeviceFacts` (tests pass made-up facts); :func:`device_facts` reads them from torch
and the CPU's flags:

- a GPU with native bf16 (compute capability >= 8.0: A100, H100, RTX 30xx+) -> ``bf16``;
- an older GPU (T4, V100: compute capability < 8.0, where bf16 is emulated and slow) -> ``fp16`` with a
  :class:`torch.amp.GradScaler` (the trainer keeps one);
- a CPU with AVX512-BF16 or AMX -> ``bf16``; any other CPU -> ``fp32``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsseg.cores import usable_cores
from rsseg.errors import ConfigError

__all__ = ["DeviceFacts", "choose_precision", "cpu_has_bf16", "device_facts", "saved_rng",
           "compile_model", "compile_unavailable", "loader_workers", "sync_batchnorm",
           "uint8_batches", "usable_cores"]

log = logging.getLogger(__name__)

#: Per-GPU batches below this many images get SyncBatchNorm under multi-GPU DDP by default.
SYNC_BN_BELOW = 8

#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the precision depends on: the device type, a GPU's compute capability, a CPU's bf16 support."""

    type: str
    capability: tuple[int, int] | None = None
    cpu_bf16: bool = False


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU flags name AVX512-BF16 or AMX-BF16 (False where ``/proc/cpuinfo`` cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & CPU_BF16_FLAGS)


def device_facts(device: torch.device) -> DeviceFacts:
    """The facts :func:`choose_precision` needs about ``device`` (queried from torch or the CPU flags)."""
    if device.type == "cuda":
        return DeviceFacts("cuda", tuple(torch.cuda.get_device_capability(device)))  # type: ignore[arg-type]
    if device.type == "cpu":
        return DeviceFacts("cpu", cpu_bf16=cpu_has_bf16())
    return DeviceFacts(device.type)


def choose_precision(setting: str, facts: DeviceFacts) -> str:
    """``fp32``, ``bf16`` or ``fp16``: ``setting`` itself, or for ``auto`` the best one ``facts`` allow."""
    if setting != "auto":
        return setting
    if facts.type == "cuda":
        return "bf16" if facts.capability is not None and facts.capability >= (8, 0) else "fp16"
    if facts.type == "cpu" and facts.cpu_bf16:
        return "bf16"
    return "fp32"


def saved_rng(rngs: list[dict[str, Any]], rank: int, world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states from a checkpoint's per-rank list, for the devices that exist here.

    The list has one entry per rank of the run that saved it; with as many ranks now, each takes its own,
    else every rank takes rank 0's. A CUDA state is used only on a CUDA device: a single state, or from a
    per-device list (older checkpoints, saved with every visible GPU's) the one of this device's index when
    the list has it. A run saved with 8 visible GPUs thus resumes where 1 (or none) is visible.
    """
    rng = rngs[rank] if len(rngs) == world else rngs[0]
    out = {"torch": rng["torch"]} if isinstance(rng.get("torch"), torch.Tensor) else {}
    cuda = rng.get("cuda")
    if device.type == "cuda" and cuda is not None:
        index = device.index or 0
        if isinstance(cuda, torch.Tensor):
            out["cuda"] = cuda
        elif isinstance(cuda, list | tuple) and index < len(cuda):
            out["cuda"] = cuda[index]
        else:
            log.warning("the checkpoint holds no CUDA RNG state for %s: its stream starts afresh", device)
    return out


def sync_batchnorm(setting: bool | None, device: torch.device, world: int, per_rank: int) -> bool:
    """Whether to turn the model's BatchNorm layers into SyncBatchNorm (``run.sync_batchnorm``).

    None (the default) means: under multi-GPU DDP when each GPU's batch is below 8 images, where per-GPU
    batch statistics get noisy. True asks for it anywhere; torch synchronises CUDA tensors only, so on a
    CPU it is refused with more than one process (and a no-op with one).
    """
    if setting is None:
        return device.type == "cuda" and world > 1 and per_rank < SYNC_BN_BELOW
    if setting and device.type != "cuda" and world > 1:
        raise ConfigError(f"run.sync_batchnorm=true with {world} CPU processes: torch's SyncBatchNorm "
                          "synchronises CUDA tensors only; set run.sync_batchnorm=false (or leave it unset)")
    return setting


def loader_workers(setting: int | None, device: torch.device, local_world: int, cores: int | None = None) -> int:
    """DataLoader workers per process: ``data.num_workers``, or by default as the device suggests.

    0 on a CPU (the model needs the cores); on a GPU this machine's usable cores shared among its
    ``local_world`` processes (at most 8).
    """
    if setting is not None:
        return setting
    if device.type == "cpu":
        return 0
    return min(8, max(1, (cores or usable_cores()) // max(1, local_world)))


def uint8_batches(device: torch.device, datasets: tuple[Any, ...]) -> bool:
    """Whether batches cross to ``device`` as uint8 (4x fewer bytes than float32) and are normalised there.

    On CUDA, for datasets of uint8 data (Tianchi JPGs, uint8 chips or patches); the model (``Segmenter``)
    normalises on the GPU. Photometric augmentation's results are rounded back to uint8 (they stay in
    0-255). The CPU path keeps float32 items (nothing crosses a bus there).
    """
    if device.type != "cuda":
        return False
    return all(str(getattr(ds, "dtype", "uint8")) == "uint8" for ds in datasets)


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here (None: it can): no dynamo, or no compiler for inductor."""
    import shutil

    try:
        import torch._dynamo as dynamo
    except ImportError as exc:  # pragma: no cover - torch builds without dynamo
        return f"torch._dynamo cannot be imported ({exc})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python/platform"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++", "cc")):
        return "no C++ compiler on PATH (inductor builds CPU kernels with one)"
    return None


def compile_model(model: torch.nn.Module, setting: bool, device: torch.device) -> torch.nn.Module:
    """``torch.compile(model)`` when ``run.compile`` asks for it and it can run here, else ``model`` itself."""
    if not setting:
        return model
    reason = compile_unavailable(device)
    if reason is not None:
        log.warning("run.compile=true skipped: %s; training runs eagerly", reason)
        return model
    return torch.compile(model)
