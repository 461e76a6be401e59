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
import re
from functools import lru_cache

import numpy as np

from rsseg.errors import RLEError

__all__ = ["decode", "encode", "is_missing"]

TIANCHI_SHAPE = (512, 512)

# Bytes allowed in an RLE string (ASCII digits and whitespace): deleting them must leave nothing.
_VALID_BYTES = b"0123456789 \t\n\r\x0b\x0c"

# numpy >= 2.3 raises ValueError for text that fromstring cannot parse; older versions warn and return what
# they read, so there the text is checked for stray bytes first.
_FROMSTRING_RAISES = np.lib.NumpyVersion(np.__version__) >= "2.3.0"

# Decoding fills little-endian 64-bit words of 8 pixels, so byte k of word w is pixel 8w + k on any machine.
_WORD = np.dtype("<u8")
_ONES = 0x0101010101010101
# _BELOW[k]: a word whose bytes below byte k are 1 (the pixels of a word that come before byte k).
_BELOW = np.array([_ONES & ((1 << 8 * k) - 1) for k in range(8)], dtype=_WORD)
# Word labels of alternating background/building segments (0, all ones, 0, ...), enough for 16,383 runs.
_ALTERNATING = ((np.arange(1 << 15) & 1) * _ONES).astype(_WORD)

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
    if width % 8 == 0 and mask.flags.c_contiguous:  # rows end on byte boundaries: one flat pass packs them
        packed = np.packbits(mask.reshape(-1)).reshape(height, width // 8)  # any non-zero value packs as 1
    else:
        packed = np.packbits(mask, axis=1)
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
    """The tokens of ``rle`` as uint64, or :class:`RLEError` naming the first one that is not all digits.

    Parsing as unsigned is faster than as int64 and takes digits only: no sign, which int64 would accept.
    """
    if _FROMSTRING_RAISES:
        try:
            return np.fromstring(rle, dtype=np.uint64, sep=" ")
        except ValueError:
            pass
    elif rle.isascii() and not rle.encode("ascii").translate(None, _VALID_BYTES):
        return np.fromstring(rle, dtype=np.uint64, sep=" ")
    _check_tokens(rle)
    raise RLEError(f"cannot read {rle[:40]!r}... as whitespace-separated integers")


def _check_tokens(rle: str) -> None:
    """Raise :class:`RLEError` for the first token of ``rle`` that is not a non-negative integer."""
    tokens = re.split(r"[ \t\n\r\v\f]+", rle.strip(" \t\n\r\v\f"))  # the separators fromstring takes
    bad = next((i for i, tok in enumerate(tokens) if not (tok.isascii() and tok.isdigit())), None)
    if bad is not None:
        raise RLEError(f"token {bad + 1} ({tokens[bad]!r}) is not a non-negative integer")


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
    tokens = _parse(rle)
    n = tokens.size
    if n % 2:
        raise RLEError(f"odd number of RLE tokens ({n}); expected start/length pairs")
    bounds = tokens - 1  # 0-based: run i covers pixels bounds[2i] <= p < bounds[2i + 1]
    # Valid (sorted, disjoint, non-empty runs inside the image) exactly when every token is in [1, size]
    # (one unsigned maximum: a token 0 wraps around; it also rules out overflow below), no gap between
    # runs is negative and the last run ends inside.
    if np.maximum.reduce(bounds) >= size:
        _raise_bad_run(rle, size, shape)
    bounds = bounds.view(np.int64)
    bounds[1::2] += tokens[0::2].view(np.int64)
    if bounds[-1] > size or np.minimum.reduce(bounds[2::2] - bounds[1:-1:2], initial=0) < 0:
        _raise_bad_run(rle, size, shape)
    return _fill(bounds, size).reshape(shape, order="F")


def _fill(bounds: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` pixels (uint8, 0/1) that alternate background/building at the sorted ``bounds``.

    Eight pixels at a time: ``np.repeat`` sets each 64-bit word to the state after its last pixel (the
    parity of the boundaries up to its end), then each boundary at byte k of a word corrects the bytes
    below k: a run's end adds 1 to them (they were still inside the run), a run's start subtracts 1.
    Every byte's sum is 0 or 1, so the word arithmetic never carries between bytes in the result.
    """
    n = bounds.size
    word_of = bounds >> 3
    counts = np.empty(n + 1, dtype=np.int64)  # words per segment; one spare word for a boundary at the end
    counts[0] = word_of[0]
    np.subtract(word_of[1:], word_of[:-1], out=counts[1:-1])
    counts[-1] = size // 8 + 1 - word_of[-1]
    labels = _ALTERNATING[: n + 1] if n < _ALTERNATING.size else ((np.arange(n + 1) & 1) * _ONES).astype(_WORD)
    words = np.repeat(labels, counts)
    below = _BELOW[bounds & 7]
    np.negative(below[0::2], out=below[0::2])  # starts subtract
    np.add.at(words, word_of, below)
    return words.view(np.uint8)[:size]


def _raise_bad_run(rle: str, size: int, shape: tuple[int, int]) -> None:
    """Raise :class:`RLEError` for the first run of ``rle`` (digit tokens, even count) that breaks the convention."""
    numbers = np.array([int(token) for token in rle.split()], dtype=object)  # exact, however large
    starts, lengths = numbers[0::2], numbers[1::2]
    if (bad := np.flatnonzero(starts < 1)).size:
        i = bad[0]
        raise RLEError(f"run {i + 1}: start {starts[i]} < 1; starts are 1-based")
    if (bad := np.flatnonzero(lengths < 1)).size:
        i = bad[0]
        raise RLEError(f"run {i + 1}: length {lengths[i]} < 1")
    ends = starts - 1 + lengths
    if (bad := np.flatnonzero(ends > size)).size:
        i = bad[0]
        raise RLEError(f"run {i + 1} ({starts[i]} {lengths[i]}) ends at pixel {ends[i]}, "
                       f"past the end of a {shape[0]}x{shape[1]} image ({size} pixels)")
    if (bad := np.flatnonzero(starts[1:] <= ends[:-1])).size:
        i = bad[0] + 1
        what = "out of order" if starts[i] < starts[i - 1] else "overlapping"
        raise RLEError(f"runs {i} and {i + 1} are {what}: run {i + 1} starts at {starts[i]}, before "
                       f"run {i} ends at {ends[i - 1]}; runs must be sorted and disjoint")
