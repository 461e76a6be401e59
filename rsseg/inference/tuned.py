"""Settings prediction takes from the checkpoint: the precision, and the threshold / ``min_pixels`` tuned on validation.

**Precision** ``auto`` (the default) follows the checkpoint's validation precision (``meta["precision"]``)
where the device runs it natively - ``bf16`` on CUDA GPUs of compute capability >= 8.0 and on CPUs with
AVX512-BF16/AMX, ``fp16`` on CUDA GPUs - and is ``fp32`` otherwise (and for checkpoints that record none).
The device facts come from :mod:`rsseg.training.devices`, the same ones training's ``auto`` uses.

**Threshold and min_pixels** default to the checkpoint's. Training chooses them per epoch on validation
with one view in the training precision, then, once all epochs are done, tunes ``best.pt`` again with
``run.tune_tta`` (default ``d4``, like ``rsseg predict --tta``) in the training precision
(:mod:`rsseg.training.tuning`) and records how: ``meta["threshold_tta"]`` and ``meta["threshold_precision"]``
(the single-view values stay as ``val_threshold`` / ``val_min_pixels``). Checkpoints without those keys (runs
stopped before the end, older runs) were tuned with one view: taken as ``none`` and ``meta["precision"]``.
A prediction with another TTA or precision than the tuning's is allowed and logged (averaged views are
smoother: the best threshold may shift a little); with the tuned ones nothing is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rsseg.training.devices import DeviceFacts, device_facts

__all__ = ["COMPUTE_PRECISIONS", "inference_precision", "setting", "supports", "tuned_with"]

log = logging.getLogger(__name__)

#: Precisions a forward pass runs in (``auto`` resolves to one of them).
COMPUTE_PRECISIONS = ("fp32", "bf16", "fp16")


def supports(precision: str, facts: DeviceFacts) -> bool:
    """Whether a device with ``facts`` runs ``precision`` natively (fp32 everywhere)."""
    if precision == "bf16":
        return (facts.type == "cuda" and facts.capability is not None and facts.capability >= (8, 0)) or \
            (facts.type == "cpu" and facts.cpu_bf16)
    if precision == "fp16":
        return facts.type == "cuda"
    return precision == "fp32"


def inference_precision(setting_: str, meta: dict[str, Any], device: torch.device,
                        facts: DeviceFacts | None = None) -> str:
    """The forward pass's precision: ``setting_`` itself, or for ``auto`` the checkpoint's where supported."""
    if setting_ != "auto":
        return setting_
    validated = meta.get("precision")
    if validated not in COMPUTE_PRECISIONS or validated == "fp32":
        return "fp32"
    facts = facts if facts is not None else device_facts(device)
    if supports(validated, facts):
        return validated
    log.info("the checkpoint was validated in %s, which %s does not run natively: predicting in fp32", validated,
             device)
    return "fp32"


def tuned_with(meta: dict[str, Any]) -> tuple[str, str]:
    """``(tta, precision)`` the checkpoint's threshold and ``min_pixels`` were chosen with."""
    tta = meta.get("threshold_tta") or "none"
    precision = meta.get("threshold_precision") or meta.get("precision") or "fp32"
    return str(tta), str(precision)


def setting(value: float | None, meta: dict[str, Any], key: str, default: float, tta: str, precision: str) -> float:
    """An explicit value, else the one chosen on validation (checkpoint meta), else ``default``.

    Taking the checkpoint's value with another TTA or precision than it was tuned with is logged.
    """
    if value is not None:
        return float(value)
    if meta.get(key) is None:
        return default
    tuned_tta, tuned_precision = tuned_with(meta)
    if (tta, precision) != (tuned_tta, tuned_precision):
        log.info("%s %s was tuned with TTA %s in %s; predicting with TTA %s in %s (pass %s to choose another)",
                 key, meta[key], tuned_tta, tuned_precision, tta, precision, key)
    return float(meta[key])
