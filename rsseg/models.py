"""Model factory and checkpoints.

:func:`create_model` builds a segmentation-models-pytorch network inside a :class:`Segmenter`, which
holds the input normalisation as buffers: it takes raw pixel values (uint8 or float, any device) and
returns logits, so callers never normalise by hand and checkpoints carry their own normalisation (training
sets it from the data's band statistics, :mod:`rsseg.training.bandstats`, unless ``model.mean/std`` are
given; prediction feeds raw pixels of any data type, so this is the one place where inputs are normalised).
Besides smp's architectures, ``arch`` may name a network class of your own as ``"package.module:Class"``.

A checkpoint is a plain dict of tensors and JSON-able values (loadable with ``weights_only=True``)::

    {"format": "rsseg-checkpoint", "version": 1, "model": {...create_model kwargs...},
     "state_dict": {...}, "meta": {...}, ...optional training state}
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsseg.errors import CheckpointError, ConfigError
from rsseg.fileio import atomic_path

__all__ = [
    "ARCHS",
    "Segmenter",
    "create_model",
    "load_checkpoint",
    "load_weights",
    "model_config",
    "model_from_checkpoint",
    "model_name",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "rsseg-checkpoint"
VERSION = 1
#: segmentation-models-pytorch architectures by name; any other network is an importable ``"module:Class"``.
ARCHS = ("unet", "unetplusplus", "fpn", "linknet", "deeplabv3plus", "manet", "pspnet")
#: ImageNet statistics in 0-255 units, the default normalisation of RGB uint8 input.
RGB_MEAN = (123.675, 116.28, 103.53)
RGB_STD = (58.395, 57.12, 57.375)


class Segmenter(nn.Module):
    """A segmentation network with its input normalisation: raw pixels in, logits out."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, H, W raw pixel values) and return logits (N, 1, H, W)."""
        x = (x.to(self.mean.dtype) - self.mean) / self.std
        return self.net(x)


def create_model(arch: str = "unet", encoder: str = "resnet34", encoder_weights: str | os.PathLike[str] | None = None,
                 in_channels: int = 3, classes: int = 1, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, **arch_kwargs: Any) -> Segmenter:
    """Build a segmentation model.

    Args:
        arch: a segmentation-models-pytorch architecture (``unet``, ``fpn``, ...), or a network of your own
            as ``"package.module:Class"``: an ``nn.Module`` subclass, importable wherever the model is built
            (training processes, prediction workers), called as ``Class(in_channels=..., classes=...,
            **arch_kwargs)`` and returning logits ``(N, classes, H, W)`` of a normalised input.
        encoder: an smp encoder name (``resnet34``, ``resnet18``, ``efficientnet-b0``, ...); ignored by
            ``"module:Class"`` networks.
        encoder_weights: None (random init), ``"imagenet"`` (needs smp's download cache: this project
            runs offline), or the path of a local encoder state dict (``torch.save(encoder.state_dict())``).
        in_channels: input bands.
        classes: output channels (1 for building / background).
        mean: per-band mean in raw pixel units (default ImageNet RGB in 0-255 units for 3 bands, else 0).
        std: per-band standard deviation in raw pixel units (default ImageNet RGB for 3 bands, else 255).
        **arch_kwargs: further arguments of the architecture, e.g. ``encoder_depth=4,
            decoder_channels=[128, 64, 32, 16]`` for a lighter U-Net.
    """
    if ":" in arch:
        net = _build(_network_class(arch), f"arch {arch!r}", in_channels=in_channels, classes=classes,
                     **arch_kwargs)
    elif arch.lower() not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}, or a network of your own "
                          "as 'package.module:Class'")
    else:
        import segmentation_models_pytorch as smp

        named = encoder_weights if encoder_weights in (None, "imagenet") else None
        net = _build(smp.create_model, f"{arch}/{encoder}", arch=arch, encoder_name=encoder, encoder_weights=named,
                     in_channels=in_channels, classes=classes, **arch_kwargs)
        if named is None and encoder_weights is not None:
            _load_encoder_weights(net, Path(encoder_weights))
    if mean is None:
        mean = RGB_MEAN if in_channels == 3 else (0.0,) * in_channels
    if std is None:
        std = RGB_STD if in_channels == 3 else (255.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std have {len(mean)}/{len(std)} values for {in_channels} input bands")
    return Segmenter(net, tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _network_class(arch: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass named by ``"package.module:Class"``."""
    module_name, _, class_name = arch.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ConfigError(f"arch {arch!r}: cannot import module {module_name!r} ({exc}); is it on the Python "
                          "path (PYTHONPATH) of every process that builds the model?") from exc
    except AttributeError as exc:
        raise ConfigError(f"arch {arch!r}: module {module_name!r} has no {class_name!r}") from exc
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ConfigError(f"arch {arch!r} is a {type(found).__name__}; expected a torch.nn.Module subclass")
    return found


def model_name(model_cfg: dict[str, Any]) -> str:
    """A model's short name from its ``create_model`` arguments: ``unet/resnet34``, or ``module:Class``."""
    arch = str(model_cfg.get("arch"))
    encoder = model_cfg.get("encoder")
    return arch if ":" in arch or not encoder else f"{arch}/{encoder}"


def _build(factory: Any, name: str, **kwargs: Any) -> nn.Module:
    """Call a network factory, turning its complaints about names and arguments into a ConfigError."""
    try:
        return factory(**kwargs)
    except KeyError as exc:
        raise ConfigError(f"unknown encoder for {name}: {exc}") from exc
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build {name} with {kwargs}: {type(exc).__name__}: {exc}") from exc


def _load_encoder_weights(net: nn.Module, path: Path) -> None:
    """Load a local encoder state dict into ``net.encoder``, strictly (every tensor must fit, none left over).

    Accepts ``torch.save(encoder.state_dict())`` of an smp encoder, a torchvision/timm backbone's state dict
    (smp drops the classifier, e.g. a ResNet's ``fc.*``), or either wrapped as ``{"state_dict": ...}`` or
    with a common ``encoder.``/``module.`` prefix.
    """
    if not path.is_file():
        raise CheckpointError(f"encoder weights {path} not found (no downloads here: pass a local state dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
        raise CheckpointError(f"encoder weights {path} are not a loadable torch state dict: "
                              f"{type(exc).__name__}: {exc}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"encoder weights {path}: expected a state dict (names -> tensors), got "
                              f"{type(state).__name__}; save one with torch.save(encoder.state_dict(), PATH)")
    for prefix in ("module.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    try:
        net.encoder.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the encoder: {_state_mismatch(net.encoder, state)}") from exc
    log.info("loaded encoder weights from %s (%d tensors)", path, len(state))


def _state_mismatch(module: nn.Module, state: dict[str, torch.Tensor], show: int = 4) -> str:
    """One line naming the missing and unexpected keys and the shape mismatches between ``module`` and ``state``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    parts = [f"{len(found)} {what} ({', '.join(found[:show])}{', ...' if len(found) > show else ''})"
             for what, found in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if found]
    return "; ".join(parts) + " - is it the state dict of this encoder (name, in_channels, depth)?"


def model_config(model: Segmenter, **create_kwargs: Any) -> dict[str, Any]:
    """The JSON-able ``create_model`` arguments that rebuild ``model`` (normalisation taken from it)."""
    return {**create_kwargs, "mean": [float(v) for v in model.mean.flatten()],
            "std": [float(v) for v in model.std.flatten()],
            "encoder_weights": None}  # the weights are in the checkpoint itself


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, model_cfg: dict[str, Any],
                    meta: dict[str, Any] | None = None, **state: Any) -> Path:
    """Write a checkpoint atomically.

    Args:
        path: the file to write.
        model: the model (a DDP wrapper is unwrapped).
        model_cfg: ``create_model`` keyword arguments that rebuild it (JSON-able).
        meta: JSON-able metadata (epoch, metrics, data source, rsseg version...).
        **state: further entries made of tensors and plain values (optimizer, scheduler, RNG state...).
    """
    module = getattr(model, "module", model)
    payload = {"format": FORMAT, "version": VERSION, "model": dict(model_cfg),
               "state_dict": module.state_dict(), "meta": dict(meta or {}), **state}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check an rsseg checkpoint (``weights_only=True``: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
        raise CheckpointError(f"{path} is not a loadable torch checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an rsseg checkpoint (expected format {FORMAT!r}; found {found})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} unsupported (expected {VERSION})")
    return ckpt


def model_from_checkpoint(checkpoint: str | os.PathLike[str] | dict[str, Any],
                          device: str | torch.device = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (a path or a loaded dict); returns ``(model, checkpoint)``."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    model = create_model(**ckpt["model"])
    load_weights(model, ckpt)
    return model.to(device).eval(), ckpt


def load_weights(model: Segmenter, checkpoint: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint's weights (and input normalisation) into ``model``, e.g. to fine-tune from it.

    Raises:
        CheckpointError: the checkpoint cannot be read, or its weights do not fit ``model`` (another
            architecture, encoder, decoder width or number of bands); the message names both.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    cfg = ckpt["model"]
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        source = "" if isinstance(checkpoint, dict) else f"{checkpoint}: "
        raise CheckpointError(f"{source}checkpoint weights ({model_name(cfg)}, {cfg.get('in_channels', 3)} bands) "
                              f"do not fit the model: {first}") from exc
    return ckpt
