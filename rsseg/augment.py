"""The dihedral group D4 on images and masks, and training transforms.

D4 has 8 elements: the rotations by 0, 90, 180 and 270 degrees, each with or without a mirror flip.
Element ``k`` (0..7) is "flip left-right if ``k >= 4``, then rotate counter-clockwise by ``(k % 4) * 90``
degrees". Rotations invert to the opposite rotation; the four flipped elements are their own inverses.
The same functions work on numpy arrays (spatial axes ``(0, 1)``: HW or HWC) and torch tensors (spatial
axes ``(-2, -1)``: HW, CHW or NCHW), so training, data loading and test-time augmentation share one
definition.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["D4_NAMES", "d4_apply", "d4_compose", "d4_inverse", "d4_invert"]

Array = TypeVar("Array", np.ndarray, torch.Tensor)

#: Human-readable names of the 8 elements, by index.
D4_NAMES = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def _axes(x: np.ndarray | torch.Tensor) -> tuple[int, int]:
    return (-2, -1) if isinstance(x, torch.Tensor) else (0, 1)


def _check(k: int) -> None:
    if not 0 <= k < 8:
        raise ValueError(f"D4 element {k!r} out of range; expected 0..7 ({', '.join(D4_NAMES)})")


def d4_apply(x: Array, k: int) -> Array:
    """Apply D4 element ``k`` to ``x`` (numpy: axes 0,1; torch: the last two dims)."""
    _check(k)
    h, w = _axes(x)
    if isinstance(x, torch.Tensor):
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


def d4_compose(a: int, b: int) -> int:
    """Index of the element equal to applying ``b`` first, then ``a``."""
    _check(a)
    _check(b)
    probe = np.arange(6).reshape(2, 3)  # asymmetric: every element maps it differently
    target = d4_apply(d4_apply(probe, b), a)
    return next(k for k in range(8) if d4_apply(probe, k).shape == target.shape
                and np.array_equal(d4_apply(probe, k), target))
