"""Grids of fixed-size windows over a raster: pure arithmetic, no I/O.

A grid covers a ``width`` x ``height`` raster with square windows of ``size`` pixels that overlap their
neighbours by ``overlap`` pixels (stride ``size - overlap``). Every pixel is covered, including the last
row and column: the last window of each axis is shifted inward so that it ends exactly at the raster
edge, and every window is full-size. A raster smaller than ``size`` on an axis gets one window at offset
0 on that axis, which extends beyond the raster (readers pad it with nodata).

Example:
    >>> grid = TileGrid(width=1000, height=600, size=512, overlap=64)
    >>> grid.n_rows, grid.n_cols, len(grid)
    (2, 3, 6)
    >>> grid.col_offsets
    (0, 448, 488)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from rasterio.windows import Window

from rsseg.errors import ConfigError, WindowIndexError

__all__ = ["Tile", "TileGrid", "grid_offsets"]


def _check(size: int, overlap: int) -> None:
    if size < 1:
        raise ConfigError(f"size={size}: expected a window size of at least 1 pixel")
    if overlap < 0:
        raise ConfigError(f"overlap={overlap}: expected 0 or more pixels")
    if overlap >= size:
        raise ConfigError(f"overlap={overlap}: expected less than size={size} (stride = size - overlap > 0)")


def grid_offsets(length: int, size: int, overlap: int) -> tuple[int, ...]:
    """Offsets of the windows along one axis of ``length`` pixels: ``min(i * stride, length - size)``.

    ``n = ceil((length - size) / stride) + 1`` windows, strictly increasing, the last one ending at ``length``;
    ``(0,)`` when ``length <= size``.

    Raises:
        ConfigError: ``length < 1`` or ``size``/``overlap`` out of range, named in the message (a ``ValueError``).
    """
    _check(size, overlap)
    if length < 1:
        raise ConfigError(f"length={length}: expected a raster of at least 1 pixel")
    if length <= size:
        return (0,)
    stride = size - overlap
    n = math.ceil((length - size) / stride) + 1
    last = length - size
    return tuple(min(i * stride, last) for i in range(n))


@dataclass(frozen=True, slots=True)
class Tile:
    """One window of a :class:`TileGrid`: grid ``row``/``col`` (0-based), pixel offsets and size in the raster."""

    row: int
    col: int
    col_off: int
    row_off: int
    width: int
    height: int

    def window(self) -> Window:
        """The window as a :class:`rasterio.windows.Window` (may extend past a raster smaller than it)."""
        return Window(self.col_off, self.row_off, self.width, self.height)

    @property
    def name(self) -> str:
        """A file stem naming the window by its grid indices, e.g. ``r0003_c0012``."""
        return f"r{self.row:04d}_c{self.col:04d}"


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Square windows of ``size`` pixels with stride ``size - overlap`` over a ``width`` x ``height`` raster.

    Offsets per axis are :func:`grid_offsets`; iteration is row-major.

    Raises:
        ConfigError: (a ``ValueError``) ``size < 1``, ``overlap < 0``, ``overlap >= size``, ``width < 1`` or
            ``height < 1``.
    """

    width: int
    height: int
    size: int
    overlap: int
    col_offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    row_offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(self.size, self.overlap)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name}={value}: expected a raster of at least 1 pixel")
        object.__setattr__(self, "col_offsets", grid_offsets(self.width, self.size, self.overlap))
        object.__setattr__(self, "row_offsets", grid_offsets(self.height, self.size, self.overlap))

    @property
    def n_rows(self) -> int:
        """Number of window rows."""
        return len(self.row_offsets)

    @property
    def n_cols(self) -> int:
        """Number of window columns."""
        return len(self.col_offsets)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def tile(self, row: int, col: int) -> Tile:
        """The window at grid position (``row``, ``col``); negative indexes count from the end.

        Raises:
            WindowIndexError: ``row`` or ``col`` outside the grid (an ``IndexError``).
        """
        if not (-self.n_rows <= row < self.n_rows and -self.n_cols <= col < self.n_cols):
            raise WindowIndexError(f"window ({row}, {col}) outside a grid of {self.n_rows} rows x {self.n_cols} cols; "
                                   f"expected rows -{self.n_rows}..{self.n_rows - 1}, "
                                   f"cols -{self.n_cols}..{self.n_cols - 1}")
        row, col = row % self.n_rows, col % self.n_cols
        return Tile(row, col, self.col_offsets[col], self.row_offsets[row], self.size, self.size)

    def row(self, i: int) -> tuple[Tile, ...]:
        """The windows of grid row ``i``, left to right."""
        return tuple(self.tile(i, j) for j in range(self.n_cols))

    def __iter__(self) -> Iterator[Tile]:
        for i in range(self.n_rows):
            yield from self.row(i)
