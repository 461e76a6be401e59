"""Render a window of a generated scene from its vector :class:`~rsseg.synth.layout.Layout`.

Every pixel value is a function of the global pixel position, the layout and the style only: noise is
hashed from global lattice coordinates and features are rasterised from the same global geometries, so
windows of any size tile seamlessly (rendering with two window sizes gives identical pixels).

Drawing order: ground (two-colour land cover with texture and grain), roads, shadows of buildings and
trees, roofs (gable roofs shaded by side with a ridge line, flat roofs with a parapet, darker eaves), then
tree crowns, which may overhang a roof edge a little. The building mask is the roof footprint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize

from rsseg.synth.layout import TREE_CELL, TREE_RADIUS_M, Layout, Style, Trees, cell_trees, hash01, smoothstep

__all__ = ["Rendered", "Renderer", "value_noise"]

_SHADOW_TINT = np.array([0.46, 0.49, 0.58], dtype=np.float32)[:, None]


def value_noise(row0: int, col0: int, height: int, width: int, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1) on a pixel window, lattice spacing ``scale`` pixels.

    Separable: the lattice is interpolated along rows first (a small array), then along columns, so the
    cost is a few operations per pixel. Values depend only on global pixel centres.
    """

    def axis(start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = (np.arange(start, start + n, dtype=np.float64) + 0.5) / scale
        i = np.floor(f).astype(np.int64)
        return i, smoothstep((f - i).astype(np.float32)), np.arange(i[0], i[-1] + 2)

    ix, wx, lat_x = axis(col0, width)
    iy, wy, lat_y = axis(row0, height)
    lattice = hash01(lat_x[None, :], lat_y[:, None], seed)
    jx, jy = ix - lat_x[0], iy - lat_y[0]
    rows = lattice[:, jx] * (1 - wx) + lattice[:, jx + 1] * wx
    return rows[jy] * (1 - wy)[:, None] + rows[jy + 1] * wy[:, None]


def _rasterize(geoms, values: np.ndarray, row0: float, col0: float, height: int, width: int) -> np.ndarray:
    """Burn ``values`` of ``geoms`` (pixel coordinates) into a window; later geometries win; 0 elsewhere."""
    if not len(values):
        return np.zeros((height, width), dtype=np.int32)
    return rasterize(zip(geoms, values.tolist(), strict=True), out_shape=(height, width),
                     transform=Affine.translation(col0, row0), fill=0, dtype="int32")


def _burn_rings(trees: Trees, row0: float, col0: float, height: int, width: int) -> np.ndarray:
    """Rasterise the tree crowns meeting a window; each pixel gets its tree's index + 1 (or 0)."""
    lo, hi = trees.rings.min(axis=1), trees.rings.max(axis=1)
    meet = (hi[:, 0] > col0) & (lo[:, 0] < col0 + width) & (hi[:, 1] > row0) & (lo[:, 1] < row0 + height)
    meet = np.flatnonzero(meet)
    shapes = ({"type": "Polygon", "coordinates": [ring]} for ring in trees.rings[meet].tolist())
    return _rasterize(shapes, meet + 1, row0, col0, height, width)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered window: ``rgb`` (3, h, w) uint8 and the boolean building mask (h, w)."""

    rgb: np.ndarray
    buildings: np.ndarray


class Renderer:
    """Renders windows of one layout; holds the spatial indexes of its features."""

    def __init__(self, layout: Layout, style: Style):
        self.layout, self.style = layout, style
        families = ("roads", "shadows", "buildings", "parts")
        self._index = {name: shapely.STRtree(getattr(layout, name)) for name in families}
        self._cell = functools.lru_cache(maxsize=1024)(self._make_cell)
        light = -np.asarray(style.shadow_dir, dtype=np.float64)
        normal = np.column_stack([-layout.part_axis[:, 1], layout.part_axis[:, 0]])
        lit = normal @ light
        self._side_gain = np.column_stack([1 + 0.16 * lit, 1 - 0.16 * lit]).astype(np.float32)

    def _make_cell(self, col: int, row: int) -> Trees:
        return cell_trees(self.style, self.layout.gsd, col, row, self._index["buildings"], self._index["roads"])

    def _trees_near(self, row0: int, col0: int, height: int, width: int) -> Trees:
        """The trees whose crown or shadow may reach the window, in a fixed global order."""
        margin = 1.25 * TREE_RADIUS_M[1] / self.layout.gsd + np.abs(self.layout.tree_shadow).max()
        c0, c1 = (int(np.floor(v / TREE_CELL)) for v in (col0 - margin, col0 + width + margin))
        r0, r1 = (int(np.floor(v / TREE_CELL)) for v in (row0 - margin, row0 + height + margin))
        return Trees.concat([self._cell(c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)])

    def _burn(self, name: str, row0: float, col0: float, height: int, width: int) -> np.ndarray:
        """Rasterise features of family ``name`` meeting the window; each pixel gets index + 1 (or 0)."""
        idx = np.sort(self._index[name].query(shapely.box(col0, row0, col0 + width, row0 + height)))
        return _rasterize(getattr(self.layout, name)[idx], idx + 1, row0, col0, height, width)

    def render(self, row0: int, col0: int, height: int, width: int) -> Rendered:
        """Render the window with top-left pixel (row0, col0) and the given size."""
        style, lay = self.style, self.layout
        seed = style.seed
        cover = 0.65 * value_noise(row0, col0, height, width, 300, seed) + 0.35 * value_noise(
            row0, col0, height, width, 90, seed + 1)
        blend = np.clip((cover - style.cover_threshold) * 5 + 0.5, 0, 1)
        texture = 0.6 * value_noise(row0, col0, height, width, 14, seed + 2) + 0.4 * value_noise(
            row0, col0, height, width, 4, seed + 3)
        cols = np.arange(col0, col0 + width)[None, :]
        rows = np.arange(row0, row0 + height)[:, None]
        grain = hash01(cols, rows, seed + 4)
        shade = (0.8 + 0.4 * texture) * (0.94 + 0.12 * grain)
        g0, g1 = style.ground[0][:, None, None], style.ground[1][:, None, None]
        rgb = (g0 + (g1 - g0) * blend) * shade

        road = self._burn("roads", row0, col0, height, width) > 0
        rgb[:, road] = style.road_rgb[:, None] * (0.97 + 0.06 * texture[road]) * (0.95 + 0.1 * grain[road])
        dx, dy = lay.tree_shadow
        trees = self._trees_near(row0, col0, height, width)
        shadow = self._burn("shadows", row0, col0, height, width) > 0
        shadow |= _burn_rings(trees, row0 - dy, col0 - dx, height, width) > 0
        rgb[:, shadow] *= _SHADOW_TINT

        halo = self._burn("buildings", row0 - 1, col0 - 1, height + 2, width + 2)
        label = halo[1:-1, 1:-1]
        roof = label > 0
        if roof.any():
            inner = (halo[:-2, 1:-1] == label) & (halo[2:, 1:-1] == label)
            inner &= (halo[1:-1, :-2] == label) & (halo[1:-1, 2:] == label)
            rgb[:, roof] = self._roofs(label, inner, grain, row0, col0)
        tree = _burn_rings(trees, row0, col0, height, width)
        if tree.any():
            rgb[:, tree > 0] = self._crowns(trees, tree, texture, grain, row0, col0)
        rgb *= style.gain[:, None, None]
        if lay.valid is not None:
            valid = _rasterize([lay.valid], np.ones(1, int), row0, col0, height, width) > 0
            rgb[:, ~valid] = 0
            rgb[:, valid] = np.clip(rgb[:, valid], 1, 255)
        else:
            np.clip(rgb, 1, 255, out=rgb)
        return Rendered(rgb=(rgb + 0.5).astype(np.uint8), buildings=roof)

    def _roofs(self, label, inner, grain, row0: int, col0: int) -> np.ndarray:
        """Colours (3, k) of the roof pixels: per-building colour, shaded by roof side, ridge, eaves."""
        lay = self.layout
        r, c = np.nonzero(label)
        b = label[r, c] - 1
        part = self._burn("parts", row0, col0, *label.shape)[r, c] - 1
        part = np.where((part >= 0) & (lay.part_building[np.maximum(part, 0)] == b), part, lay.first_part[b])
        d = np.column_stack([c + col0 + 0.5, r + row0 + 0.5]) - lay.part_center[part]
        axis = lay.part_axis[part]
        along = np.abs(d[:, 0] * axis[:, 0] + d[:, 1] * axis[:, 1])
        across = d[:, 1] * axis[:, 0] - d[:, 0] * axis[:, 1]
        half = lay.part_half[part]
        flat = lay.flat[b]
        side = np.where(across > 0, self._side_gain[part, 0], self._side_gain[part, 1])
        ridge = (np.abs(across) < 1.0) & (along < half[:, 0] - half[:, 1])
        edge_dist = np.minimum(half[:, 0] - along, half[:, 1] - np.abs(across))
        gain = np.where(flat, np.where(edge_dist < 2.5, 1.12, 0.98), np.where(ridge, 1.18, side))
        gain = gain * np.where(inner[r, c], 1.0, 0.78) * (0.95 + 0.1 * grain[r, c])
        return (lay.roof_rgb[b] * gain[:, None].astype(np.float32)).T

    def _crowns(self, trees: Trees, tree, texture, grain, row0: int, col0: int) -> np.ndarray:
        """Colours (3, k) of tree-crown pixels: darker rim, lit towards the sun, leafy texture."""
        r, c = np.nonzero(tree)
        t = tree[r, c] - 1
        d = (np.column_stack([c + col0 + 0.5, r + row0 + 0.5]) - trees.center[t]) / trees.radius[t][:, None]
        rim = np.minimum((d * d).sum(axis=1), 1.0)
        lit = -(d @ np.asarray(self.style.shadow_dir))
        gain = (1.05 - 0.3 * rim + 0.18 * lit) * (0.75 + 0.5 * texture[r, c]) * (0.9 + 0.2 * grain[r, c])
        return (trees.rgb[t] * gain[:, None].astype(np.float32)).T
