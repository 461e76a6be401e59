"""Tiling scenes into chips: the window grid, image and label chips, footprints."""

from rsseg.tiling.chips import INDEX_COLUMNS, TileOptions, write_chips
from rsseg.tiling.footprints import Footprints, load_footprints
from rsseg.tiling.grid import Tile, TileGrid, grid_offsets

__all__ = ["INDEX_COLUMNS", "Footprints", "Tile", "TileGrid", "TileOptions", "grid_offsets", "load_footprints",
           "write_chips"]
