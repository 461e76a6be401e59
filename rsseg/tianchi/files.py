"""Competition files of the Tianchi "地表建筑物识别" building challenge.

Layout of ``train_mask.csv``, the truth files and submissions: one row per image, ``name<TAB>rle``, no
header, no index; an empty RLE field (or no field) means "no building". RLE strings follow
:mod:`rsseg.tianchi.rle` (column-major, 1-based starts). A submission has one row per test image, in the order
of the sample submission (``test_a_samplesubmit.csv``). :class:`MaskTable` reads such a file lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

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
    """A ``name -> rle`` mapping over a Tianchi mask file; an RLE string is read from the file when asked for.

    Opening reads the file once, line by line, and keeps each name's line number and the byte range of its
    RLE field (a 30,000-row file costs one small dict). A name missing from the file raises ``KeyError``;
    a row without building maps to ``""``. Duplicated names and malformed lines are collected in
    :attr:`problem_rows` (line, name, problem) and read as line-numbered messages from :attr:`problems`;
    with ``strict=True`` (the default) the first one raises :class:`SubmissionError`.

    Each lookup opens the file for itself, so a table holds no open file and pickles as its index. Used as a
    context manager (``with read_masks_csv(path) as table:``) it keeps one file handle open for the block,
    for many lookups in a row; :meth:`close` closes it.
    """

    def __init__(self, path: PathLike, strict: bool = True) -> None:
        self.path = Path(path)
        self.problem_rows: list[tuple[int, str, str]] = []
        self._rows: dict[str, _Row] = {}
        self._file: BinaryIO | None = None
        with open(self.path, "rb") as fh:
            offset = 0
            for number, raw in enumerate(fh, 1):
                self._add(raw, number, offset, strict)
                offset += len(raw)

    def _add(self, raw: bytes, number: int, offset: int, strict: bool) -> None:
        line = raw.removesuffix(b"\n").removesuffix(b"\r")
        field, tab, rle = line.partition(b"\t")
        name = field.decode("utf-8", errors="replace")
        if not field and not rle:
            problem = "blank line; expected name<TAB>rle"
        elif (tabs := line.count(b"\t")) > 1:
            problem = f"{tabs} tabs; expected one (name<TAB>rle)"
        elif name.split() != [name]:
            problem = f"image name {name!r} is empty or contains spaces; expected name<TAB>rle"
        elif name in self._rows:
            problem = f"{name} duplicates line {self._rows[name].line}"
        else:
            self._rows[name] = _Row(number, offset + len(field) + len(tab), offset + len(line))
            return
        if strict:
            raise SubmissionError(f"{self.path.name} line {number}: {problem}")
        self.problem_rows.append((number, name.strip(), problem))

    @property
    def problems(self) -> list[str]:
        """The malformed and duplicated rows as messages naming the file and line."""
        return [f"{self.path.name} line {number}: {problem}" for number, _, problem in self.problem_rows]

    def __getitem__(self, name: str) -> str:
        row = self._rows[name]
        if row.start == row.end:
            return ""
        if self._file is not None:
            return _read(self._file, row)
        with open(self.path, "rb") as fh:
            return _read(fh, row)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __enter__(self) -> MaskTable:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by __exit__ / close()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file handle a ``with`` block opened (lookups after it open the file each time)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def line(self, name: str) -> int:
        """The 1-based line number of ``name``'s row."""
        return self._rows[name].line

    def mask(self, name: str, shape: tuple[int, int] = rle_codec.TIANCHI_SHAPE) -> np.ndarray:
        """Decode ``name``'s mask; an :class:`RLEError` names the file and line."""
        try:
            return rle_codec.decode(self[name], shape)
        except RLEError as exc:
            raise RLEError(f"{self.path.name} line {self.line(name)} ({name}): {exc}") from exc

    def subset(self, names: Iterable[str]) -> MaskTable:
        """A table of ``names`` only (the same file; no problems): it pickles as ~40 bytes a row, not the RLE."""
        sub = MaskTable.__new__(MaskTable)
        sub.__setstate__({"path": self.path, "rows": {name: self._rows[name] for name in names}})
        return sub

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "rows": self._rows, "problem_rows": self.problem_rows}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.path = state["path"]  # type: ignore[assignment]
        self._rows = state["rows"]  # type: ignore[assignment]
        self.problem_rows = state.get("problem_rows", [])  # type: ignore[assignment]
        self._file = None


def _read(fh: BinaryIO, row: _Row) -> str:
    fh.seek(row.start)
    return fh.read(row.end - row.start).decode("ascii", errors="replace")


def read_masks_csv(path: PathLike) -> MaskTable:
    """Open a ``name<TAB>rle`` file (``train_mask.csv``, a truth file, a submission) lazily."""
    return MaskTable(path)


def iter_masks(path: PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, mask)`` for each row of a mask file, decoding one 512x512 mask at a time."""
    with read_masks_csv(path) as table:
        for name in table:
            yield name, table.mask(name)


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
    rows = ((name, predictions[name]) for name in names)
    return write_mask_csv(((n, v if isinstance(v, str) else rle_codec.encode(v)) for n, v in rows), path)


def validate_submission(path: PathLike, sample: PathLike) -> list[str]:
    """Every problem of a submission, each with its line number; an empty list means valid.

    Checks: lines are ``name<TAB>rle``; no duplicated name; every sample image present, no other image;
    rows in the sample's order; every RLE decodes and stays inside a 512x512 image.
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
    with sub:
        for image in sub:
            try:
                sub.mask(image)
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
    with sub, ref:
        scores = np.array([dice(sub.mask(n), ref.mask(n)) for n in ref])
        empty_truth = sum(rle_codec.is_missing(ref[n]) for n in ref)
    return {"mean_dice": float(scores.mean()), "images": int(scores.size), "empty_truth": int(empty_truth)}
