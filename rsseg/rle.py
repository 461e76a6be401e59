"""The Tianchi run-length codec for building masks.

Convention (exactly the competition's): the mask's pixels are taken in **column-major** (Fortran) order,
so pixel ``(row r, col c)`` of an ``H x W`` mask has the 1-based index ``c * H + r + 1``; each run of
building pixels is written as ``start length`` with a **1-based** start; the pairs are joined by single
spaces; a mask with no building is the empty string. Runs continue across columns: in a 512x512 mask,
rows 510-511 of column 0 plus rows 0-1 of column 1 are the single run ``"511 4"``.

Known vectors for 512x512: only (0, 0) set -> ``"1 1"``; only (1, 0) -> ``"2 1"``; only (0, 1) ->
``"513 1"``; everything set -> ``"1 262144"``.

Both directions are vectorised numpy (no Python loop over runs); :func:`decode` validates its input and
raises :class:`~rsseg.errors.RLEError` naming the problem.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from rsseg.errors import RLEError

__all__ = ["decode", "encode", "is_missing"]

TIANCHI_SHAPE = (512, 512)

# Bytes allowed in an RLE string (ASCII digits and whitespace): deleting them must leave nothing.
_VALID_BYTES = b"0123456789 \t\n\r\x0b\x0c"

# Labels of the segments of a decoded mask (background, building, background...), enough for 512x512.
_ALTERNATING = np.arange(TIANCHI_SHAPE[0] * TIANCHI_SHAPE[1] + 1, dtype=np.uint8) & 1

# Formatting by table lookup is used up to this many pixels (the table costs 8 bytes per number).
_TABLE_LIMIT = 1 << 20


@lru_cache(maxsize=2)
def _number_table(limit: int) -> np.ndarray:
    """Entry ``i`` holds the bytes of ``str(i)``, one space, then NUL padding, as one uint64 (``i <= limit``)."""
    digits = np.array([f"{i} " for i in range(limit + 1)], dtype="S8")
    return digits.view(np.uint64)


def is_missing(rle: object) -> bool:
    """True for the values that mean "no building": None, NaN, and blank strings."""
    if rle is None:
        return True
    if isinstance(rle, float):
        return math.isnan(rle)
    return isinstance(rle, str) and (not rle or rle.isspace())


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (non-zero = building) as a Tianchi RLE string.

    Args:
        mask: a 2-D array of any shape and dtype; every non-zero pixel is a building pixel.

    Returns:
        Space-separated ``start length`` pairs, 1-based starts in column-major order; ``""`` if empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D mask, got an array of shape {mask.shape}")
    if mask.size == 0:
        return ""
    if mask.dtype.kind not in "biu":  # packbits takes booleans and integers
        mask = mask != 0
    height, width = mask.shape
    bounds = _change_points(mask)
    if mask[-1, -1]:
        bounds = np.append(bounds, height * width)
    if bounds.size == 0:
        return ""
    bounds[1::2] -= bounds[::2]  # ends -> lengths
    bounds[::2] += 1  # 0-based -> 1-based starts
    if height * width <= _TABLE_LIMIT:
        table = _number_table(max(TIANCHI_SHAPE[0] * TIANCHI_SHAPE[1], height * width))
        return table[bounds].tobytes().translate(None, b"\0")[:-1].decode("ascii")
    return " ".join(map(str, bounds.tolist()))


def _change_points(mask: np.ndarray) -> np.ndarray:
    """Sorted 0-based column-major indices where the pixel sequence changes value (starting from 0).

    Works on the mask packed to bits along its rows (an eighth of the bytes), each row padded to a power of
    two of at least 8 bytes. Above row 0 goes a row holding, for each column, the pixel that precedes its
    top in column-major order (the bottom of the previous column; 0 for the first). XOR of each row with
    the one above marks every change, found 64-bit word, then byte, then bit; rows come out increasing
    within each column, so a stable sort by column (radix on 16-bit keys) gives the column-major order.
    """
    height, width = mask.shape
    packed = np.packbits(mask, axis=1)  # any non-zero value packs as 1
    row_bytes = max(8, 1 << (packed.shape[1] - 1).bit_length())
    before = np.zeros(width, dtype=bool)
    before[1:] = mask[-1, :-1]
    diff = np.zeros((height, row_bytes), dtype=np.uint8)
    np.bitwise_xor(packed[1:], packed[:-1], out=diff[1:, : packed.shape[1]])
    np.bitwise_xor(np.packbits(before), packed[0], out=diff[0, : packed.shape[1]])
    words = diff.view(np.uint64).reshape(-1)
    hot_words = np.flatnonzero(words != 0)
    hot = words[hot_words].view(np.uint8)
    nonzero = np.flatnonzero(hot != 0)
    hot_bytes = (hot_words[nonzero >> 3] << 3) | (nonzero & 7)  # byte indices into diff
    bits = np.flatnonzero(np.unpackbits(hot[nonzero]).view(bool))
    flat = (hot_bytes[bits >> 3] << 3) | (bits & 7)  # bit indices into diff
    shift = row_bytes.bit_length() + 2  # log2 of the bits per row of diff
    cols = flat & ((1 << shift) - 1)
    keys = cols * height + (flat >> shift)
    return keys[np.argsort(cols.astype(np.uint16) if width <= 1 << 16 else cols, kind="stable")]


def _parse(rle: str) -> np.ndarray:
    """The integer tokens of ``rle``, or :class:`RLEError` naming the first bad token."""
    if not rle.isascii() or rle.encode("ascii").translate(None, _VALID_BYTES):
        tokens = rle.split()
        bad = next(i for i, tok in enumerate(tokens) if not (tok.isascii() and tok.isdigit()))
        raise RLEError(f"token {bad + 1} ({tokens[bad]!r}) is not a non-negative integer")
    return np.fromstring(rle, dtype=np.int64, sep=" ")


def decode(rle: str | float | None, shape: tuple[int, int] = TIANCHI_SHAPE) -> np.ndarray:
    """Decode a Tianchi RLE string into a ``uint8`` mask of ``shape`` (1 = building).

    Args:
        rle: space-separated ``start length`` pairs (1-based starts, column-major order). None, NaN and
            blank strings mean an empty mask.
        shape: ``(height, width)`` of the mask.

    Returns:
        A ``uint8`` array of ``shape`` holding 0 and 1. It is a column-major (Fortran-ordered) view, as
        the runs are; ``np.ascontiguousarray`` makes a row-major copy if one is needed.

    Raises:
        RLEError: a token that is not an integer, an odd number of tokens, a start < 1, a length < 1, a
            run past the end of the image, or runs that overlap or are out of order.
    """
    height, width = shape
    size = height * width
    if is_missing(rle):
        return np.zeros(shape, dtype=np.uint8, order="F")
    if not isinstance(rle, str):
        raise RLEError(f"expected an RLE string, got {type(rle).__name__} {rle!r}")
    values = _parse(rle)
    if values.size % 2:
        raise RLEError(f"odd number of RLE tokens ({values.size}); expected start/length pairs")
    starts, lengths = values[0::2], values[1::2]  # starts 1-based
    # The image as alternating background/building segments: gap, run, gap, run, ..., gap. The runs are
    # valid (sorted, disjoint, inside the image) exactly when no gap is negative and no run is empty.
    segments = np.empty(values.size + 1, dtype=np.int64)
    segments[1::2] = lengths
    gaps = segments[2:-1:2]
    np.subtract(starts[1:], starts[:-1], out=gaps)
    gaps -= lengths[:-1]
    segments[0] = starts[0] - 1
    segments[-1] = size - (starts[-1] - 1 + lengths[-1])
    if np.minimum.reduce(lengths) < 1 or np.minimum.reduce(segments) < 0:
        _raise_bad_run(starts - 1, lengths, starts - 1 + lengths, size, shape)
    n = segments.size
    labels = _ALTERNATING[:n] if n <= _ALTERNATING.size else np.arange(n, dtype=np.uint8) & 1  # wraps evenly
    return np.repeat(labels, segments).reshape(shape, order="F")


def _raise_bad_run(starts: np.ndarray, lengths: np.ndarray, ends: np.ndarray, size: int,
                   shape: tuple[int, int]) -> None:
    """Raise :class:`RLEError` for the first run that breaks the convention (all checks vectorised)."""
    if (bad := np.flatnonzero(starts < 0)).size:
        i = bad[0]
        raise RLEError(f"run {i + 1}: start {starts[i] + 1} < 1; starts are 1-based")
    if (bad := np.flatnonzero(lengths < 1)).size:
        i = bad[0]
        raise RLEError(f"run {i + 1}: length {lengths[i]} < 1")
    if (bad := np.flatnonzero(ends > size)).size:
        i = bad[0]
        raise RLEError(f"run {i + 1} ({starts[i] + 1} {lengths[i]}) ends at pixel {ends[i]}, past the "
                       f"end of a {shape[0]}x{shape[1]} image ({size} pixels)")
    if (bad := np.flatnonzero(starts[1:] < ends[:-1])).size:
        i = bad[0] + 1
        what = "out of order" if starts[i] < starts[i - 1] else "overlapping"
        raise RLEError(f"runs {i} and {i + 1} are {what}: run {i + 1} starts at {starts[i] + 1}, before "
                       f"run {i} ends at {ends[i - 1]}; runs must be sorted and disjoint")
