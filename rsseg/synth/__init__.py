"""Generated data for the demo, tests and benchmarks: georeferenced scenes and Tianchi-layout images.

Names load on first use, so that :mod:`rsseg.synth.options` (imported by the ``rsseg`` command for its
options) does not import rasterio, geopandas and shapely when the command starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rsseg.lazy import attach

if TYPE_CHECKING:
    from rsseg.synth.generate import footprints_path, make_scene, make_tianchi
    from rsseg.synth.options import SceneOptions, TianchiOptions

__getattr__, __dir__, __all__ = attach(__name__, {
    "footprints_path": "generate", "make_scene": "generate", "make_tianchi": "generate",
    "SceneOptions": "options", "TianchiOptions": "options",
})
