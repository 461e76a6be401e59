"""Generated data for the demo, tests and benchmarks: georeferenced scenes and Tianchi-layout images."""

from rsseg.synth.generate import footprints_path, make_scene, make_tianchi, render_tile, scene_transform

__all__ = ["footprints_path", "make_scene", "make_tianchi", "render_tile", "scene_transform"]
