"""Describe and validate ``train_mask.csv``: every bad row, a per-image table, the dataset's figures.

:func:`describe_masks` checks the rows in blocks (in this process or on any executor) and returns a
:class:`MaskReport`; :func:`write_mask_report` writes it to a folder; :meth:`MaskReport.raise_if_bad`
turns bad rows into one :class:`~rsseg.errors.DatasetError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator

from rsseg.errors import ConfigError, DatasetError, OutputExistsError, RLEError
from rsseg.fileio import atomic_path
from rsseg.metrics import count_buildings
from rsseg.options import Options, resolve
from rsseg.parallel import map_blocks
from rsseg.tianchi.files import MaskTable
from rsseg.tianchi.rle import TIANCHI_SHAPE, decode

__all__ = ["BadRow", "MaskOptions", "MaskReport", "describe_masks", "write_mask_report"]

PathLike = str | os.PathLike[str]

#: The columns of :attr:`MaskReport.table`, in order.
TABLE_COLUMNS = ("name", "line", "building_fraction", "empty", "buildings")
#: File names :func:`write_mask_report` writes in its folder.
REPORT_FILES = {"table": "masks.csv", "bad_rows": "bad_rows.csv", "summary": "summary.json",
                "mosaic": "mosaic.png"}


class MaskOptions(Options):
    """How :func:`describe_masks` reads and reports a mask file (the ``tianchi_masks`` stage's options)."""

    chunk_rows: int = Field(1000, ge=1, description="Rows of the mask file per block of parallel work.")
    image_size: list[int] = Field(list(TIANCHI_SHAPE), description="Height,width every image and mask must have.")
    histogram_bins: int = Field(20, ge=1, description="Equal bins over 0-1 of the building-fraction histogram.")
    mosaic_images: int = Field(12, ge=0, description="Images (with their masks outlined) in the quick-look mosaic.")

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, size: list[int]) -> list[int]:
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"image_size={size}: expected two positive integers, height,width (e.g. 512,512)")
        return size


@dataclass(frozen=True, slots=True)
class BadRow:
    """One bad row of a mask file: its 1-based line, the image it names, the kind of problem and the details.

    Kinds: ``format`` (not ``name<TAB>rle``), ``duplicate``, ``rle`` (does not decode), ``run_past_end`` (a run
    past the image's pixel count), ``missing_image``, ``unreadable_image``, ``wrong_size``.
    """

    line: int
    name: str
    kind: str
    problem: str


@dataclass(frozen=True, slots=True)
class _Block:
    """The rows one task checks: a :class:`MaskTable` of them only; the task reads their RLE where it runs."""

    rows: MaskTable
    images_dir: Path | None
    shape: tuple[int, int]


@dataclass(frozen=True)
class MaskReport:
    """What :func:`describe_masks` found in a mask file.

    Attributes:
        mask_csv: the mask file described.
        images_dir: the folder of its images (None: images not checked).
        options: the options it was described with.
        table: one row per good mask, in file order, columns :data:`TABLE_COLUMNS` (``buildings``: the
            4-connected building components).
        bad_rows: every bad row, sorted by line (a row may appear once per problem).
        unlisted_images: JPGs in ``images_dir`` that no row names (not an error: figures only).
    """

    mask_csv: Path
    images_dir: Path | None
    options: MaskOptions
    table: pd.DataFrame
    bad_rows: tuple[BadRow, ...] = ()
    unlisted_images: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no row is bad and there is at least one good row."""
        return not self.bad_rows and len(self.table) > 0

    def summary(self) -> dict[str, Any]:
        """The dataset's figures, JSON-able: counts, empty share, building-fraction histogram, buildings."""
        fractions = self.table["building_fraction"].to_numpy(float)
        empty = self.table["empty"].to_numpy(bool)
        counts, edges = np.histogram(fractions[~empty], bins=self.options.histogram_bins, range=(0.0, 1.0))
        kinds = pd.Series([row.kind for row in self.bad_rows], dtype=object).value_counts()
        return {
            "mask_csv": self.mask_csv.name,
            "images": int(fractions.size),
            "empty_images": int(empty.sum()),
            "empty_share": float(empty.mean()) if empty.size else 0.0,
            "building_fraction_mean": float(fractions.mean()) if fractions.size else 0.0,
            "buildings_mean": float(self.table["buildings"].mean()) if fractions.size else 0.0,
            "histogram": {"of": "building_fraction of non-empty images", "edges": edges.round(6).tolist(),
                          "counts": counts.tolist()},
            "bad_rows": len(self.bad_rows),
            "bad_rows_by_kind": {str(k): int(v) for k, v in kinds.items()},
            "unlisted_images": len(self.unlisted_images),
        }

    def raise_if_bad(self, listing: PathLike | None = None) -> None:
        """Raise one :class:`DatasetError` if a row is bad or no row is good.

        Args:
            listing: the file holding the full list of bad rows (``write_mask_report(...)["bad_rows"]``),
                named in the message.
        """
        if self.bad_rows:
            first = self.bad_rows[0]
            where = f"; full list in {listing}" if listing else "; write_mask_report() writes the full list"
            raise DatasetError(f"{self.mask_csv.name}: {len(self.bad_rows)} bad rows; first: line {first.line} "
                               f"({first.name or 'no name'}): {first.problem}{where}")
        if not len(self.table):
            raise DatasetError(f"{self.mask_csv.name} has no rows; expected one name<TAB>rle row per image")


def describe_masks(
    mask_csv: PathLike, images_dir: PathLike | None, options: MaskOptions | None = None, *,
    executor: Executor | None = None, **values: Any,
) -> MaskReport:
    """Decode and validate a Tianchi mask file block by block; every bad row is reported, none raises.

    A row must be ``name<TAB>rle`` with a new name, its RLE must decode inside the image, and the image must
    exist with the expected size (only its JPEG header is read); :class:`BadRow` lists the kinds of problem.

    Args:
        mask_csv: ``train_mask.csv`` (``name<TAB>rle`` rows, no header).
        images_dir: the folder of the images the rows name (``train/``); None skips the image checks.
        options: a :class:`MaskOptions`; None for the defaults.
        executor: runs the blocks (any ``concurrent.futures.Executor``, e.g. a Dask client's
            ``get_executor()``; its workers must see ``images_dir``); None: in this process. The report is
            the same either way.
        **values: fields of the options to override, e.g. ``chunk_rows=500``.

    Returns:
        A :class:`MaskReport`; call :meth:`MaskReport.raise_if_bad` to make bad rows an error.

    Raises:
        ConfigError: an unknown option or a wrong value.
        FileNotFoundError: ``mask_csv`` does not exist.
        DatasetError: ``images_dir`` is given but is not a folder.
    """
    opts = resolve(MaskOptions, options, values)
    mask_csv = Path(mask_csv)
    images = Path(images_dir) if images_dir is not None else None
    if images is not None and not images.is_dir():
        raise DatasetError(f"{images} is not a folder; expected the folder of the images {mask_csv.name} names")
    index = MaskTable(mask_csv, strict=False)
    shape = (opts.image_size[0], opts.image_size[1])
    names = list(index)
    blocks = [_Block(index.subset(names[i : i + opts.chunk_rows]), images, shape)
              for i in range(0, len(names), opts.chunk_rows)]
    good: list[tuple[Any, ...]] = []
    bad = [BadRow(line, name, "duplicate" if " duplicates line " in problem else "format", problem)
           for line, name, problem in index.problem_rows]
    for _, (block_good, block_bad) in map_blocks(_check_block, blocks, executor, desc="tianchi masks"):
        good.extend(block_good)
        bad.extend(block_bad)
    table = pd.DataFrame(sorted(good, key=lambda row: row[1]), columns=list(TABLE_COLUMNS))
    table = table.astype({"line": "int64", "building_fraction": "float64", "empty": "bool", "buildings": "int64"})
    listed = set(index) | {row.name for row in bad}
    unlisted = sorted(p.name for p in images.glob("*.jpg") if p.name not in listed) if images else []
    return MaskReport(mask_csv, images, opts, table, tuple(sorted(bad, key=lambda r: (r.line, r.kind))),
                      tuple(unlisted))


def _check_block(block: _Block) -> tuple[list[tuple[Any, ...]], list[BadRow]]:
    """One task: decode and check the block's rows; good rows as table rows, every problem as a BadRow."""
    good, bad = [], []
    with block.rows as table:
        for name in table:
            line, problems = table.line(name), []
            try:
                mask = decode(table[name], block.shape)
            except RLEError as exc:
                kind = "run_past_end" if "past the end" in str(exc) else "rle"
                problems.append(BadRow(line, name, kind, f"bad RLE: {exc}"))
            if block.images_dir is not None:
                problems.extend(_check_image(block.images_dir / name, line, name, block.shape))
            if problems:
                bad.extend(problems)
                continue
            pixels = int(np.count_nonzero(mask))
            good.append((name, line, pixels / mask.size, pixels == 0, count_buildings(mask) if pixels else 0))
    return good, bad


def _check_image(path: Path, line: int, name: str, shape: tuple[int, int]) -> list[BadRow]:
    """The image's problems: missing, unreadable, or not ``shape`` (height, width); reads the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        return [BadRow(line, name, "missing_image", f"image {path.name} is not in {path.parent}")]
    except (UnidentifiedImageError, OSError) as exc:
        return [BadRow(line, name, "unreadable_image", f"image {path} cannot be read: {exc}")]
    if (height, width) != shape:
        return [BadRow(line, name, "wrong_size", f"image {path.name} is {height}x{width} (height x width); "
                                                 f"expected {shape[0]}x{shape[1]}")]
    return []


def write_mask_report(report: MaskReport, out_dir: PathLike, *, overwrite: bool = False) -> dict[str, Path]:
    """Write a report to ``out_dir``: the table, every bad row, the figures and a quick-look mosaic.

    Files (each written atomically): ``masks.csv`` (the per-image table), ``bad_rows.csv`` (line, name,
    kind, problem; a header only when none is bad), ``summary.json`` (:meth:`MaskReport.summary`) and
    ``mosaic.png`` (a few images with their masks outlined in yellow; only with ``images_dir`` and good rows).

    Returns:
        The paths written, keyed ``table``, ``bad_rows``, ``summary`` and (when drawn) ``mosaic``.

    Raises:
        OutputExistsError: one of the files exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    paths = {key: out_dir / name for key, name in REPORT_FILES.items()}
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out_dir} already holds {', '.join(existing)}; pass overwrite=True "
                              "(CLI: --overwrite) or choose another folder")
    bad_rows = pd.DataFrame(report.bad_rows, columns=["line", "name", "kind", "problem"])
    for key, frame in (("bad_rows", bad_rows), ("table", report.table)):
        with atomic_path(paths[key]) as tmp:
            frame.to_csv(tmp, index=False)
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(json.dumps(report.summary(), indent=2) + "\n", encoding="utf-8")
    picks = mosaic_picks(report.table, report.options.mosaic_images)
    if report.images_dir is None or not picks:
        paths.pop("mosaic")
        return paths
    with atomic_path(paths["mosaic"]) as tmp:
        _mosaic(report, picks).save(tmp, format="PNG")
    return paths


def mosaic_picks(table: pd.DataFrame, n: int) -> list[str]:
    """``n`` image names spread over the range of building fraction (the first is the emptiest)."""
    if n <= 0 or table.empty:
        return []
    ordered = table.sort_values(["building_fraction", "name"], kind="stable")["name"].tolist()
    picks = np.unique(np.linspace(0, len(ordered) - 1, min(n, len(ordered))).round().astype(int))
    return [ordered[i] for i in picks]


def _mosaic(report: MaskReport, names: Sequence[str], thumb: int = 192) -> Image.Image:
    """A grid of images, each with its decoded mask's outline in yellow, ``thumb`` pixels a side."""
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    sheet = Image.new("RGB", (columns * thumb, rows * thumb), "white")
    shape = (report.options.image_size[0], report.options.image_size[1])
    with MaskTable(report.mask_csv, strict=False) as table:
        for i, name in enumerate(names):
            with Image.open(report.images_dir / name) as image:
                pixels = np.array(image.convert("RGB"))
            edge = _outline(decode(table[name], shape))
            pixels[edge] = (255, 255, 0)
            cell = Image.fromarray(pixels).resize((thumb, thumb), Image.Resampling.BILINEAR)
            sheet.paste(cell, ((i % columns) * thumb, (i // columns) * thumb))
    return sheet


def _outline(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """Building pixels within ``width`` pixels of the background (4-neighbourhood steps), as a bool array."""
    building = np.asarray(mask) != 0
    inner = building.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return building & ~inner
