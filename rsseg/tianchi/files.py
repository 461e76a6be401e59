"""Competition files of the Tianchi "地表建筑物识别" building challenge.

Layout of ``train_mask.csv``, the truth files and submissions: one row per image, ``name<TAB>rle``, no
header, no index; an empty RLE field (or no field) means "no building". RLE strings follow
:mod:`rsseg.tianchi.rle` (column-major, 1-based starts). A submission has one row per test image, in the order
of the sample submission (``test_a_samplesubmit.csv``).

:class:`MaskTable` reads such a file lazily: it memory-maps it and indexes the rows with numpy, so a
30,000-row file costs a few arrays of offsets, and a mask is decoded only when asked for.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rsseg.errors import RLEError, SubmissionError
from rsseg.fileio import atomic_path
from rsseg.metrics import dice
from rsseg.tianchi import rle as rle_codec

__all__ = [
    "MaskTable",
    "iter_masks",
    "read_masks_csv",
    "score",
    "validate_submission",
    "write_mask_csv",
    "write_submission",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class _Row(NamedTuple):
    line: int  # 1-based line number in the file
    start: int  # byte offset of the RLE field
    end: int  # byte offset just past the RLE field


class MaskTable(Mapping[str, str]):
    """A ``name -> rle`` mapping over a Tianchi mask file, read lazily.

    Rows are indexed once (vectorised); RLE strings are sliced out of the memory-mapped file on access.
    Duplicated names and malformed lines are collected in :attr:`problems` (line-numbered messages);
    with ``strict=True`` (the default) the first one raises :class:`SubmissionError`.
    """

    def __init__(self, path: PathLike, strict: bool = True) -> None:
        self.path = Path(path)
        self.problems: list[str] = []
        self._data = self._map()
        self._rows: dict[str, _Row] = {}
        self._index(strict)

    def _map(self) -> bytes | mmap.mmap:
        with open(self.path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def _index(self, strict: bool) -> None:
        buf = np.frombuffer(self._data, dtype=np.uint8)
        marks = _control_bytes(buf)  # one pass for tabs and newlines (other control bytes are bad RLE)
        kinds = buf[marks]
        newlines, tabs = marks[kinds == 10], marks[kinds == 9]
        starts = np.concatenate(([0], newlines + 1))
        ends = np.concatenate((newlines, [buf.size]))
        if starts.size and starts[-1] == buf.size:  # the file ends with a newline
            starts, ends = starts[:-1], ends[:-1]
        ends = ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13))  # CRLF
        first_tab = np.searchsorted(tabs, starts)
        n_tabs = np.searchsorted(tabs, ends) - first_tab
        tab_pos = np.where(n_tabs > 0, tabs[np.minimum(first_tab, tabs.size - 1)], ends) if tabs.size else ends
        data = self._data
        rows = [_Row(line, min(tab + 1, end), end) for line, tab, end in
                zip(range(1, starts.size + 1), tab_pos.tolist(), ends.tolist(), strict=True)]
        names = [bytes(data[start:tab]).decode("utf-8", errors="replace")
                 for start, tab in zip(starts.tolist(), tab_pos.tolist(), strict=True)]
        self._rows = dict(zip(names, rows, strict=True))
        clean = (len(self._rows) == len(names) and not (n_tabs > 1).any()
                 and all(name.split() == [name] for name in names))  # no blank, empty or spaced name
        if not clean:  # find the problems line by line, in order
            self._rows = {}
            for row, name, count in zip(rows, names, n_tabs.tolist(), strict=True):
                self._add(row, name, count, strict)

    def _add(self, row: _Row, name: str, tabs: int, strict: bool) -> None:
        where = f"{self.path.name} line {row.line}"
        if not name and row.start == row.end:
            self._problem(f"{where}: blank line; expected name<TAB>rle", strict)
        elif tabs > 1:
            self._problem(f"{where}: {tabs} tabs; expected one (name<TAB>rle)", strict)
        elif name.split() != [name]:
            self._problem(f"{where}: image name {name!r} is empty or contains spaces; expected name<TAB>rle", strict)
        elif name in self._rows:
            self._problem(f"{where}: {name} duplicates line {self._rows[name].line}", strict)
        else:
            self._rows[name] = row

    def _problem(self, message: str, strict: bool) -> None:
        if strict:
            raise SubmissionError(message)
        self.problems.append(message)

    def __getitem__(self, name: str) -> str:
        row = self._rows[name]
        return bytes(self._data[row.start : row.end]).decode("ascii", errors="replace")

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def line(self, name: str) -> int:
        """The 1-based line number of ``name``'s row."""
        return self._rows[name].line

    def mask(self, name: str, shape: tuple[int, int] = rle_codec.TIANCHI_SHAPE) -> np.ndarray:
        """Decode ``name``'s mask; an :class:`RLEError` names the file and line."""
        try:
            return rle_codec.decode(self[name], shape)
        except RLEError as exc:
            raise RLEError(f"{self.path.name} line {self.line(name)} ({name}): {exc}") from None

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "rows": self._rows}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.path = state["path"]  # type: ignore[assignment]
        self._rows = state["rows"]  # type: ignore[assignment]
        self.problems = []
        self._data = self._map()


def _control_bytes(buf: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Offsets of the bytes <= 10 (tab, newline...), found chunk by chunk: no file-sized temporary array."""
    below = np.empty(min(chunk, buf.size), dtype=bool)
    parts = []
    for start in range(0, buf.size, chunk):
        part = buf[start : start + chunk]
        np.less_equal(part, 10, out=below[: part.size])
        parts.append(np.flatnonzero(below[: part.size]) + start)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.intp)


def read_masks_csv(path: PathLike) -> MaskTable:
    """Open a ``name<TAB>rle`` file (``train_mask.csv``, a truth file, a submission) lazily."""
    return MaskTable(path)


def iter_masks(path: PathLike, shape: tuple[int, int] = rle_codec.TIANCHI_SHAPE) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, mask)`` for each row of a mask file, decoding one mask at a time."""
    table = read_masks_csv(path)
    for name in table:
        yield name, table.mask(name, shape)


def write_mask_csv(rows: Iterable[tuple[str, str]], path: PathLike) -> Path:
    """Write ``name<TAB>rle`` rows (no header, no index) atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as fh:
        for name, code in rows:
            fh.write(f"{name}\t{code}\n")
    return path


def write_submission(predictions: Mapping[str, str | np.ndarray], path: PathLike, sample: PathLike) -> Path:
    """Write a submission: one row per image of the ``sample`` submission, in its order.

    Args:
        predictions: image name -> RLE string or mask array (encoded with :func:`rsseg.tianchi.rle.encode`).
        path: the submission CSV to write (atomically).
        sample: the sample submission whose names and order the submission must follow.

    Raises:
        SubmissionError: a sample image has no prediction, or a prediction names an unknown image.
    """
    names = list(read_masks_csv(sample))
    missing = [n for n in names if n not in predictions]
    extra = sorted(set(predictions) - set(names))
    if missing or extra:
        raise SubmissionError(f"predictions do not match {Path(sample).name}: {len(missing)} missing "
                              f"(e.g. {missing[:3]}), {len(extra)} not in the sample (e.g. {extra[:3]})")

    def rows() -> Iterator[tuple[str, str]]:
        for name in names:
            value = predictions[name]
            yield name, value if isinstance(value, str) else rle_codec.encode(value)

    return write_mask_csv(rows(), path)


def validate_submission(path: PathLike, sample: PathLike,
                        shape: tuple[int, int] = rle_codec.TIANCHI_SHAPE) -> list[str]:
    """Every problem of a submission, each with its line number; an empty list means valid.

    Checks: lines are ``name<TAB>rle``; no duplicated name; every sample image present, no other image;
    rows in the sample's order; every RLE decodes and stays inside a ``shape`` image.
    """
    sub = MaskTable(path, strict=False)
    ref = MaskTable(sample, strict=False)
    problems = list(sub.problems)
    name = Path(path).name
    for image in ref:
        if image not in sub:
            problems.append(f"{name}: missing {image} (line {ref.line(image)} of {Path(sample).name})")
    for image in sub:
        if image not in ref:
            problems.append(f"{name} line {sub.line(image)}: {image} is not in {Path(sample).name}")
    common = [image for image in sub if image in ref]
    expected = sorted(common, key=ref.line)
    if common != expected:
        first = next(a for a, b in zip(common, expected, strict=True) if a != b)
        problems.append(f"{name} line {sub.line(first)}: rows are not in the sample submission's order "
                        f"({first} is at line {ref.line(first)} there)")
    for image in sub:
        try:
            sub.mask(image, shape)
        except RLEError as exc:
            problems.append(str(exc))
    return problems


def score(submission: PathLike, truth: PathLike) -> dict[str, float | int]:
    """The competition metric: mean over the truth's images of the per-image Dice.

    Dice is ``2|X∩Y| / (|X| + |Y|)``; an image where prediction and truth are both empty scores 1.

    Raises:
        SubmissionError: the submission lacks some of the truth's images.
    """
    sub, ref = read_masks_csv(submission), read_masks_csv(truth)
    missing = [n for n in ref if n not in sub]
    if missing:
        raise SubmissionError(f"{Path(submission).name} lacks {len(missing)} of the {len(ref)} images of "
                              f"{Path(truth).name}, e.g. {missing[:3]}")
    if not len(ref):
        raise SubmissionError(f"{Path(truth).name} has no rows to score against")
    scores = np.array([dice(sub.mask(n), ref.mask(n)) for n in ref])
    return {"mean_dice": float(scores.mean()), "images": int(scores.size),
            "empty_truth": int(sum(rle_codec.is_missing(ref[n]) for n in ref))}
