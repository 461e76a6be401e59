"""Tiling scenes into chips: the window grid, image and label chips, footprints."""

from rsseg.tiling.footprints import Footprints, load_footprints
from rsseg.tiling.grid import Tile, TileGrid, grid_offsets
from rsseg.tiling.tiler import INDEX_COLUMNS, write_chips

__all__ = ["INDEX_COLUMNS", "Footprints", "Tile", "TileGrid", "grid_offsets", "load_footprints", "write_chips"]
