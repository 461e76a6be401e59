"""The Tianchi run-length codec for building masks.

Convention (exactly the competition's): the mask's pixels are taken in **column-major** (Fortran) order,
so pixel ``(row r, col c)`` of an ``H x W`` mask has the 1-based index ``c * H + r + 1``; each run of
building pixels is written as ``start length`` with a **1-based** start; the pairs are joined by single
spaces; a mask with no building is the empty string. Runs continue across columns: in a 512x512 mask,
rows 510-511 of column 0 plus rows 0-1 of column 1 are the single run ``"511 4"``.

Known vectors for 512x512: only (0, 0) set -> ``"1 1"``; only (1, 0) -> ``"2 1"``; only (0, 1) ->
``"513 1"``; everything set -> ``"1 262144"``. Both directions are plain vectorised numpy.
"""

from __future__ import annotations

import math
import re

import numpy as np

from rsseg.errors import RLEError

__all__ = ["TIANCHI_SHAPE", "decode", "encode", "is_missing"]

#: ``(height, width)`` of a Tianchi image and mask.
TIANCHI_SHAPE = (512, 512)

_ALTERNATING = np.arange(2, dtype=np.uint8)  # background, building
_DIGITS_AND_SPACE = b"0123456789 \t\n\r\x0b\x0c"  # the bytes of a well-formed RLE string


def is_missing(rle: object) -> bool:
    """True for the values that mean "no building": None, NaN, and blank strings."""
    return rle is None or (isinstance(rle, float) and math.isnan(rle)) or (isinstance(rle, str) and not rle.strip())


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (non-zero = building) as a Tianchi RLE string.

    Args:
        mask: a 2-D array of any shape, dtype and memory layout; every non-zero pixel is a building pixel.

    Returns:
        Space-separated ``start length`` pairs, 1-based starts in column-major order; ``""`` if empty.

    Raises:
        RLEError: ``mask`` is not 2-D.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"encode expects a 2-D mask (height, width), got an array of shape {mask.shape}; "
                       "pass one band, e.g. mask[0] or mask[..., 0]")
    if mask.size == 0:
        return ""
    bounds = _change_points(mask != 0)
    bounds[1::2] -= bounds[::2]  # ends -> lengths
    bounds[::2] += 1  # 0-based -> 1-based starts
    return " ".join(["%d"] * bounds.size) % tuple(bounds.tolist())


def _change_points(mask: np.ndarray) -> np.ndarray:
    """The 0-based column-major indices where runs of ``mask`` (bool) start and end, alternating.

    A pixel starts or ends a run where it differs from the one before it in column-major order: the pixel
    above it, or for row 0 the bottom of the previous column (background before the first pixel); a run
    touching the last pixel ends at ``mask.size``. Comparing whole rows keeps the (row-major) mask's memory
    order; the few change points are then sorted into column-major order.
    """
    height, width = mask.shape
    changes = np.empty((height, width), dtype=bool)
    np.not_equal(mask[1:], mask[:-1], out=changes[1:])
    np.not_equal(mask[0, 1:], mask[-1, :-1], out=changes[0, 1:])
    changes[0, :1] = mask[0, :1]
    flat = np.flatnonzero(changes)  # row-major
    keys = np.sort(flat % width * height + flat // width)  # column-major
    return np.append(keys, mask.size) if mask[-1, -1] else keys


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
        raise RLEError(f"expected an RLE string (or None/NaN for no building), got {type(rle).__name__} {rle!r}")
    tokens = _parse(rle)
    if tokens.size % 2:
        raise RLEError(f"odd number of RLE tokens ({tokens.size}); expected start/length pairs")
    if tokens.min() < 1 or tokens.max() > size:  # then no sum below can overflow
        _raise_bad_run(rle, size, shape)
    bounds = tokens - 1  # 0-based starts; run i covers bounds[2i] <= p < bounds[2i] + tokens[2i + 1]
    bounds[1::2] = bounds[0::2] + tokens[1::2]  # lengths -> ends
    # Pixels between consecutive boundaries: background before each start, building from start to end.
    counts = np.empty(bounds.size + 1, dtype=np.int64)
    counts[0], counts[-1] = bounds[0], size - bounds[-1]
    np.subtract(bounds[1:], bounds[:-1], out=counts[1:-1])
    if counts.min() < 0:  # sorted, disjoint runs inside the image (lengths are >= 1 already)
        _raise_bad_run(rle, size, shape)
    return np.repeat(_ALTERNATING[np.arange(counts.size) & 1], counts).reshape(shape, order="F")


def _parse(rle: str) -> np.ndarray:
    """The whitespace-separated tokens of ``rle`` as int64, or :class:`RLEError` naming the first bad one.

    Only ASCII digits separated by ASCII whitespace make tokens (no signs, no ``_``, no other scripts'
    digits, all of which :class:`int` would take). A number too large for int64 reads as the int64 maximum,
    which is past the end of any image; the error then names the exact number.
    """
    data = rle.encode("ascii", errors="replace")  # any other character becomes "?", a bad byte
    if data.translate(None, _DIGITS_AND_SPACE):
        tokens = re.split(r"[ \t\n\r\v\f]+", rle.strip(" \t\n\r\v\f"))
        bad = next(i for i, tok in enumerate(tokens) if not (tok.isascii() and tok.isdigit()))
        raise RLEError(f"token {bad + 1} ({tokens[bad]!r}) is not a non-negative integer; "
                       "expected space-separated 'start length' pairs of digits")
    return np.fromstring(data, dtype=np.int64, sep=" ")  # only digits and whitespace: reads to the end


def _raise_bad_run(rle: str, size: int, shape: tuple[int, int]) -> None:
    """Raise :class:`RLEError` for the first run of ``rle`` (digit tokens, an even count) that is not valid."""
    numbers = [int(token) for token in rle.split()]  # exact, however large
    starts, lengths = numbers[0::2], numbers[1::2]
    previous_end = 0
    for i, (start, length) in enumerate(zip(starts, lengths, strict=True), 1):
        end = start - 1 + length
        if start < 1:
            raise RLEError(f"run {i}: start {start} < 1; starts are 1-based")
        if length < 1:
            raise RLEError(f"run {i}: length {length} < 1; every run covers at least one pixel")
        if end > size:
            raise RLEError(f"run {i} ({start} {length}) ends at pixel {end}, past the end of a "
                           f"{shape[0]}x{shape[1]} image ({size} pixels)")
        if i > 1 and start <= previous_end:
            what = "out of order" if start < starts[i - 2] else "overlapping"
            raise RLEError(f"runs {i - 1} and {i} are {what}: run {i} starts at {start}, before run {i - 1} "
                           f"ends at {previous_end}; runs must be sorted and disjoint")
        previous_end = end
    raise RLEError(f"runs outside a {shape[0]}x{shape[1]} image; expected sorted, disjoint 'start length' pairs")
