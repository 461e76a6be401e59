"""The window grid: every pixel covered, nothing outside the raster, full-size windows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from rsseg.tiling.grid import Tile, TileGrid, grid_offsets


@st.composite
def size_overlap(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, 600))
    return size, draw(st.integers(0, size - 1))


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 5000), so=size_overlap())
def test_offsets_cover_every_pixel_and_stay_inside(length: int, so: tuple[int, int]) -> None:
    size, overlap = so
    offsets = grid_offsets(length, size, overlap)
    assert offsets[0] == 0
    assert list(offsets) == sorted(set(offsets)), "strictly increasing"
    if length <= size:
        assert offsets == (0,)
        return
    stride = size - overlap
    assert all(0 <= o <= length - size for o in offsets), "no window outside the raster"
    assert offsets[-1] == length - size, "last window ends at the last pixel"
    steps = np.diff(offsets)
    assert (steps[:-1] == stride).all(), "regular stride before the last window"
    assert 0 < steps[-1] <= stride, "last window shifted inward, never leaving a gap"
    covered = np.zeros(length, bool)
    for o in offsets:
        covered[o : o + size] = True
    assert covered.all()


@st.composite
def grids(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """Rasters up to 1500 px a side and at most ~40 windows a side (keeps the test fast)."""
    size, overlap = draw(size_overlap())
    limit = min(1500, 40 * max(size - overlap, 1) + size)
    return draw(st.integers(1, limit)), draw(st.integers(1, limit)), size, overlap


@settings(max_examples=150, deadline=None)
@given(params=grids())
def test_grid_covers_raster_row_major(params: tuple[int, int, int, int]) -> None:
    width, height, size, overlap = params
    grid = TileGrid(width, height, size, overlap)
    tiles = list(grid)
    assert len(tiles) == len(grid) == grid.n_rows * grid.n_cols
    assert [(t.row, t.col) for t in tiles] == [(i, j) for i in range(grid.n_rows) for j in range(grid.n_cols)]
    covered = np.zeros((height, width), bool)
    for t in tiles:
        assert (t.width, t.height) == (size, size)
        assert t.col_off == 0 or t.col_off + size <= width
        assert t.row_off == 0 or t.row_off + size <= height
        covered[t.row_off : t.row_off + size, t.col_off : t.col_off + size] = True
    assert covered.all()
    assert grid.row(grid.n_rows - 1) == tuple(tiles[-grid.n_cols :])


def test_known_offsets_and_small_raster() -> None:
    assert grid_offsets(1000, 512, 64) == (0, 448, 488)
    assert grid_offsets(512, 512, 64) == (0,)
    assert grid_offsets(960, 512, 64) == (0, 448)
    assert grid_offsets(100, 512, 64) == (0,)
    small = TileGrid(100, 30, 64, 8)
    assert (small.n_rows, small.n_cols) == (1, 2)
    assert small.tile(0, 1) == Tile(0, 1, 36, 0, 64, 64)
    assert small.tile(-1, -1).window() == Window(36, 0, 64, 64)
    assert small.tile(0, 0).name == "r0000_c0000"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(width=10, height=10, size=0, overlap=0), "size=0"),
        (dict(width=10, height=10, size=8, overlap=-1), "overlap=-1"),
        (dict(width=10, height=10, size=8, overlap=8), "overlap=8"),
        (dict(width=0, height=10, size=8, overlap=0), "width=0"),
        (dict(width=10, height=-3, size=8, overlap=0), "height=-3"),
    ],
)
def test_invalid_grid_names_the_value(kwargs: dict[str, int], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        TileGrid(**kwargs)


def test_value_objects_are_frozen_and_bounds_checked() -> None:
    grid = TileGrid(100, 100, 32, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.size = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.tile(0, 0).row = 3  # type: ignore[misc]
    assert grid == TileGrid(100, 100, 32, 0)
    with pytest.raises(IndexError, match="outside a grid of 4 rows x 4 cols"):
        grid.tile(4, 0)
    with pytest.raises(ValueError, match="length=0"):
        grid_offsets(0, 8, 0)
