"""Tiling scenes into chips: the window grid, image and label chips, footprints.

Names load on first use (:mod:`rsseg.lazy`), so the ``rsseg`` command imports :class:`TileOptions` without
geopandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsseg.lazy import attach

if TYPE_CHECKING:
    from rsseg.tiling.chips import INDEX_COLUMNS, write_chips
    from rsseg.tiling.footprints import Footprints, load_footprints
    from rsseg.tiling.grid import Tile, TileGrid, grid_offsets
    from rsseg.tiling.options import TileOptions

__getattr__, __dir__, __all__ = attach(__name__, {
    "INDEX_COLUMNS": "chips", "write_chips": "chips", "TileOptions": "options",
    "Footprints": "footprints", "load_footprints": "footprints",
    "Tile": "grid", "TileGrid": "grid", "grid_offsets": "grid",
})
