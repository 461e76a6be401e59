"""The dihedral group D4 on images and masks, and training transforms.

D4 has 8 elements: the rotations by 0, 90, 180 and 270 degrees, each with or without a mirror flip.
Element ``k`` (0..7) is "flip left-right if ``k >= 4``, then rotate counter-clockwise by ``(k % 4) * 90``
degrees". Rotations invert to the opposite rotation; the four flipped elements are their own inverses.
The same functions work on numpy arrays (spatial axes ``(0, 1)``: HW or HWC) and torch tensors (spatial
axes ``(-2, -1)``: HW, CHW or NCHW), so training, data loading and test-time augmentation share one
definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from rsseg.errors import ConfigError

__all__ = [
    "D4_NAMES",
    "TrainTransform",
    "colour_matrix",
    "d4_apply",
    "d4_inverse",
    "d4_invert",
    "random_crop",
]

Array = TypeVar("Array", np.ndarray, torch.Tensor)

#: Human-readable names of the 8 elements, by index.
D4_NAMES = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def _axes(x: np.ndarray | torch.Tensor) -> tuple[int, int]:
    return (-2, -1) if isinstance(x, torch.Tensor) else (0, 1)


def _check(k: int) -> None:
    if not 0 <= k < 8:
        raise ConfigError(f"D4 element {k!r} out of range; expected 0..7 ({', '.join(D4_NAMES)})")


def d4_apply(x: Array, k: int) -> Array:
    """Apply D4 element ``k`` to ``x`` (numpy: axes 0,1; torch: the last two dims)."""
    _check(k)
    h, w = _axes(x)
    if isinstance(x, torch.Tensor):
        if k == 0:  # the identity: x itself, as numpy's rot90 gives a view (torch's would copy)
            return x
        if k >= 4:
            x = torch.flip(x, dims=(w,))
        return torch.rot90(x, k % 4, dims=(h, w))
    if k >= 4:
        x = np.flip(x, axis=w)
    return np.rot90(x, k % 4, axes=(h, w))


def d4_invert(x: Array, k: int) -> Array:
    """Undo D4 element ``k``: ``d4_invert(d4_apply(x, k), k)`` equals ``x``."""
    return d4_apply(x, d4_inverse(k))


def d4_inverse(k: int) -> int:
    """Index of the inverse of element ``k``."""
    _check(k)
    return (4 - k) % 4 if k < 4 else k


# ------------------------------------------------------------------------------------- training transforms
#: RGB -> YIQ; hue rotates the (I, Q) chroma plane, saturation scales it, Y (luma) is kept.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_SHAPE_KEEPING = (0, 2, 4, 6)  # the D4 elements that keep an H x W image H x W when H != W


def colour_matrix(hue: float, saturation: float) -> np.ndarray:
    """The 3x3 RGB matrix that rotates hue by ``hue`` turns and scales saturation by ``saturation``.

    ``rgb @ colour_matrix(h, s).T`` works in YIQ space: luma is unchanged, the chroma vector (I, Q) is
    rotated by ``2 * pi * h`` and multiplied by ``s``; ``colour_matrix(0, 1)`` is the identity.
    """
    angle = 2.0 * np.pi * hue
    cos, sin = np.cos(angle), np.sin(angle)
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, saturation * cos, -saturation * sin],
                       [0.0, saturation * sin, saturation * cos]])
    return np.linalg.inv(_YIQ) @ chroma @ _YIQ


@dataclass(frozen=True, slots=True)
class TrainTransform:
    """A random training transform applied jointly to an image (H, W, C) and its masks (H, W).

    In order: a random ``crop`` x ``crop`` window (same window for image and masks), a random D4 element
    (a uniform draw among the 8; among the 4 that keep the shape if the image is not square), then
    photometric changes to the image only: hue rotation and saturation (3-band images only), contrast
    around the image mean and brightness gain, each drawn uniformly within ``1 +- value`` (hue: ``+-value``
    turns), finally clipped to ``[min_value, max_value]`` (the data type's range). All randomness comes
    from the ``rng`` argument, so a caller that seeds it per item gets the same result in any worker and
    after a resume.

    Attributes:
        d4: apply a random D4 element.
        crop: side of a random square crop, or None for the whole image.
        brightness: maximum relative gain change (0.1: a gain in [0.9, 1.1]).
        contrast: maximum relative contrast change.
        saturation: maximum relative saturation change (RGB only).
        hue: maximum hue rotation in turns (0.02 = 7.2 degrees; RGB only).
        max_value: clip photometric results to at most ``max_value`` (the data type's: 255 for uint8, 65535
            for uint16); None: no upper clip (float data).
        min_value: clip photometric results to at least ``min_value`` (0 for unsigned types, -32768 for
            int16); None: no lower clip.
    """

    d4: bool = True
    crop: int | None = None
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    max_value: float | None = 255.0
    min_value: float | None = 0.0

    def __call__(self, image: np.ndarray, masks: tuple[np.ndarray, ...],
                 rng: np.random.Generator) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Transform ``image`` (H, W, C float) and ``masks`` (each H, W); returns new arrays (may be views)."""
        if self.crop is not None:
            image, masks = random_crop(image, masks, self.crop, rng)
        if self.d4:
            square = image.shape[0] == image.shape[1]
            k = int(rng.integers(8)) if square else _SHAPE_KEEPING[int(rng.integers(4))]
            image, masks = d4_apply(image, k), tuple(d4_apply(m, k) for m in masks)
        return self.photometric(image, rng), masks

    def photometric(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply the random colour, contrast and brightness changes to ``image`` (H, W, C) only."""
        if not (self.hue or self.saturation or self.contrast or self.brightness):
            return image
        out = np.asarray(image, dtype=np.float32)
        if image.shape[-1] == 3 and (self.hue or self.saturation):
            matrix = colour_matrix(rng.uniform(-self.hue, self.hue),
                                   rng.uniform(1.0 - self.saturation, 1.0 + self.saturation))
            out = out @ matrix.T.astype(np.float32)
        if self.contrast:
            mean = out.mean(axis=(0, 1), keepdims=True)
            out = (out - mean) * np.float32(rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)) + mean
        if self.brightness:
            out = out * np.float32(rng.uniform(1.0 - self.brightness, 1.0 + self.brightness))
        if self.min_value is None and self.max_value is None:
            return out
        return np.clip(out, self.min_value, self.max_value)


def random_crop(image: np.ndarray, masks: tuple[np.ndarray, ...], size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Cut the same random ``size`` x ``size`` window out of ``image`` (H, W, ...) and each mask (views)."""
    height, width = image.shape[:2]
    if size > min(height, width):
        raise ConfigError(f"crop {size} is larger than the {height}x{width} image; use crop <= {min(height, width)}")
    row, col = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
    window = (slice(row, row + size), slice(col, col + size))
    return image[window], tuple(m[window] for m in masks)
