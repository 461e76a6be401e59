"""The training precision for a device: ``run.precision: auto`` decided from facts about the device.

:func:`choose_precision` is a pure function of :class:`DeviceFacts` (tests pass made-up facts);
:func:`device_facts` reads them from torch and the CPU's flags:

- a GPU with native bf16 (compute capability >= 8.0: A100, H100, RTX 30xx+) -> ``bf16``;
- an older GPU (T4, V100: compute capability < 8.0, where bf16 is emulated and slow) -> ``fp16`` with a
  :class:`torch.amp.GradScaler` (the trainer keeps one);
- a CPU with AVX512-BF16 or AMX -> ``bf16``; any other CPU -> ``fp32``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "DeviceFacts", "choose_precision", "cpu_has_bf16", "device_facts"]

#: Values of ``run.precision``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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
