"""Vector layout of a generated aerial scene: roads, buildings and their shadows placed globally; trees per cell.

Everything here is in *pixel* coordinates of the scene (x = column, y = row, y down; a pixel's centre is
at ``(col + 0.5, row + 0.5)``), so the same layout renders identically whatever window size is used.
Sizes are drawn in metres and converted with the ground sampling distance ``gsd`` (metres per pixel).

Placement is cheap and vectorised (shapely 2 arrays and :class:`shapely.STRtree` queries); only the
greedy rejection of overlapping buildings is a Python loop over candidate pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

__all__ = [
    "TREE_CELL", "TREE_RADIUS_M", "Layout", "Style", "Trees", "cell_trees", "hash01", "place", "random_style",
    "smoothstep", "value_noise_at",
]

#: Ground covers as (RGB low, RGB high) pairs blended by a low-frequency noise field.
GROUNDS = (
    ((78, 104, 56), (120, 128, 82)),  # grass and dry grass
    ((66, 96, 50), (138, 116, 90)),  # lawn and soil
    ((132, 122, 96), (168, 152, 124)),  # dry soil and bare ground
    ((92, 112, 64), (150, 148, 138)),  # grass and paved yards
)
#: Roof colours; the last group is deliberately close to asphalt, soil or grass.
ROOFS = np.array(
    [
        (158, 72, 56), (178, 100, 72), (196, 196, 190), (222, 220, 212), (150, 150, 146),
        (72, 108, 158), (96, 148, 168), (122, 84, 70), (190, 170, 140), (60, 128, 132),
        (92, 92, 96), (126, 110, 92), (104, 118, 84),
    ],
    dtype=np.float32,
)
_N_DISTINCT_ROOFS = 10
TREES = np.array([(46, 72, 36), (60, 86, 42), (38, 64, 44), (74, 92, 48)], dtype=np.float32)
#: Trees are drawn per square cell of this many pixels, each cell from its own seed (see cell_trees).
TREE_CELL = 256
TREE_RADIUS_M = (1.5, 4.5)
ROAD_RGB = np.array([(92, 92, 94), (112, 110, 106), (78, 80, 84)], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Style:
    """Look of one scene or Tianchi image: colours, densities, sun; all drawn from one seed.

    Attributes:
        seed: seed of the noise fields (texture, land cover) of this scene.
        ground: the two ground colours blended by the land-cover field, shape (2, 3).
        cover_threshold: land-cover field value where the two ground colours meet (0-1).
        road_rgb: asphalt colour.
        road_angle: orientation of the road grid and of most buildings, radians.
        road_spacing_m: (min, max) distance between parallel roads, or None for no roads.
        building_density: probability (0-1) that a candidate building is kept before overlap rejection.
        urban_scale_px: wavelength of the field that varies building density in space (None: uniform).
        confusable_roofs: fraction of roofs coloured like asphalt, soil or grass.
        tree_density: trees per 100 m2 where the clumping field allows trees.
        shadow_dir: unit vector (x, y) in which shadows fall.
        shadow_ratio: shadow length per metre of height.
        gain: per-band gain applied last (exposure and colour balance), shape (3,).
    """

    seed: int
    ground: np.ndarray
    cover_threshold: float
    road_rgb: np.ndarray
    road_angle: float
    road_spacing_m: tuple[float, float] | None
    building_density: float
    urban_scale_px: float | None
    confusable_roofs: float
    tree_density: float
    shadow_dir: np.ndarray
    shadow_ratio: float
    gain: np.ndarray


@dataclass(frozen=True, slots=True)
class Layout:
    """Features of a scene as shapely arrays in pixel coordinates, with their rendering attributes.

    Buildings are split into convex rectangular *parts* (one for a rectangle, two for an L) that carry
    the roof geometry: centre, unit ridge axis and half sizes along and across the ridge. ``shadows``
    are the buildings' shadows. Trees are not stored: :func:`cell_trees` draws them per cell on demand;
    they cast their crown shifted by ``tree_shadow`` (x, y) pixels.
    """

    buildings: np.ndarray
    kind: np.ndarray
    height_m: np.ndarray
    roof_rgb: np.ndarray
    flat: np.ndarray
    parts: np.ndarray
    part_building: np.ndarray
    part_center: np.ndarray
    part_axis: np.ndarray
    part_half: np.ndarray
    first_part: np.ndarray
    shadows: np.ndarray
    roads: np.ndarray
    gsd: float
    tree_shadow: tuple[float, float]
    valid: shapely.Polygon | None


@dataclass(frozen=True, slots=True)
class Trees:
    """Tree crowns: closed outline rings (n, 13, 2), centres (n, 2), radii (n,) in pixels, colours (n, 3)."""

    rings: np.ndarray
    center: np.ndarray
    radius: np.ndarray
    rgb: np.ndarray

    @classmethod
    def concat(cls, parts: list[Trees]) -> Trees:
        """All trees of ``parts``, in order."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("rings", "center", "radius", "rgb")))


def hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) for each integer lattice point (splitmix64 mixing)."""
    h = np.asarray(ix).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h = h + np.asarray(iy).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    h = h + np.uint64(seed & 0xFFFFFFFFFFFF)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def smoothstep(t: np.ndarray) -> np.ndarray:
    """Hermite easing ``3t^2 - 2t^3`` of values in [0, 1]."""
    return t * t * (3.0 - 2.0 * t)


def value_noise_at(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1) at points (x, y), with lattice spacing ``scale`` pixels."""
    fx, fy = np.asarray(x, dtype=np.float64) / scale, np.asarray(y, dtype=np.float64) / scale
    ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    wx, wy = smoothstep(fx - ix), smoothstep(fy - iy)
    top = hash01(ix, iy, seed) * (1 - wx) + hash01(ix + 1, iy, seed) * wx
    bottom = hash01(ix, iy + 1, seed) * (1 - wx) + hash01(ix + 1, iy + 1, seed) * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def random_style(rng: np.random.Generator, *, empty: bool = False, urban_scale_px: float | None = None,
                 roads: bool | None = None) -> Style:
    """Draw the look of a scene or image; ``empty``: no buildings; ``roads``: force or forbid roads (None: 80%)."""
    azimuth = rng.uniform(0, 2 * np.pi)
    return Style(
        seed=int(rng.integers(1, 2**31)),
        ground=np.array(GROUNDS[rng.integers(len(GROUNDS))], dtype=np.float32)[:: rng.choice([-1, 1])],
        cover_threshold=float(rng.uniform(0.3, 0.7)),
        road_rgb=ROAD_RGB[rng.integers(len(ROAD_RGB))],
        road_angle=float(rng.uniform(0, np.pi / 2)),
        road_spacing_m=(80.0, 220.0) if (rng.random() < 0.8 if roads is None else roads) else None,
        building_density=0.0 if empty else float(rng.uniform(0.35, 0.9)),
        urban_scale_px=urban_scale_px,
        confusable_roofs=float(rng.uniform(0.03, 0.12)),
        tree_density=float(rng.uniform(0.2, 1.2)),
        shadow_dir=np.array([np.cos(azimuth), np.sin(azimuth)]),
        shadow_ratio=float(rng.uniform(0.3, 0.8)),
        gain=rng.uniform(0.9, 1.1, 3).astype(np.float32) * np.float32(rng.uniform(0.85, 1.15)),
    )


def _roads(style: Style, bounds: tuple[float, float, float, float], gsd: float, rng: np.random.Generator):
    """Two families of parallel straight roads (a perturbed grid) covering ``bounds``, as polygons."""
    if style.road_spacing_m is None:
        return np.empty(0, dtype=object)
    x0, y0, x1, y1 = bounds
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    half = np.hypot(x1 - x0, y1 - y0) / 2 + 1
    lines, widths = [], []
    for angle in (style.road_angle, style.road_angle + np.pi / 2):
        along = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-along[1], along[0]])
        lo, hi = (s / gsd for s in style.road_spacing_m)
        offsets = np.cumsum(rng.uniform(lo, hi, int(2 * half / lo) + 2)) - half - rng.uniform(0, hi)
        offsets = offsets[offsets < half]
        mid = centre + offsets[:, None] * normal
        lines.append(np.stack([mid - half * along, mid + half * along], axis=1))
        widths.append(rng.uniform(6, 12, len(offsets)) / gsd)
    coords, width = np.concatenate(lines), np.concatenate(widths)
    return shapely.buffer(shapely.linestrings(coords), width / 2, cap_style="flat")


def _rotate(local: np.ndarray, angle: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Rotate local (n, k, 2) coordinates by ``angle`` (n,) and move them to ``centre`` (n, 2)."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = local[..., 0], local[..., 1]
    return np.stack([c * x - s * y, s * x + c * y], axis=-1) + centre[:, None, :]


def _box(x0, y0, x1, y1) -> np.ndarray:
    """Corner coordinates (n, 4, 2) of axis-aligned boxes."""
    return np.stack([np.stack(p, axis=-1) for p in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], axis=1)


def _candidates(centre: np.ndarray, style: Style, gsd: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random rectangle and L-shaped building candidates at ``centre`` (footprints, parts, attributes)."""
    n = len(centre)
    length = np.exp(rng.uniform(np.log(8), np.log(40), n)) / gsd
    width = np.maximum(length * rng.uniform(0.45, 0.95, n), 6 / gsd)
    angle = style.road_angle + rng.integers(0, 4, n) * np.pi / 2 + rng.normal(0, 0.03, n)
    angle = np.where(rng.random(n) < 0.15, rng.uniform(0, np.pi, n), angle)
    is_l = (rng.random(n) < 0.3) & (length > 14 / gsd)
    arm_x = np.maximum(length * rng.uniform(0.35, 0.6, n), 5 / gsd)
    arm_y = np.maximum(width * rng.uniform(0.35, 0.6, n), 5 / gsd)
    a, b = length / 2, width / 2
    ring = _box(-a, -b, a, b)
    l_ring = np.stack(
        [np.stack(p, axis=-1) for p in ((-a, -b), (a, -b), (a, -b + arm_y), (-a + arm_x, -b + arm_y),
                                        (-a + arm_x, b), (-a, b))], axis=1)
    part_a = np.where(is_l[:, None, None], _box(-a, -b, -a + arm_x, b), ring)
    part_b = _box(-a + arm_x, -b, a, -b + arm_y)
    footprints = np.empty(n, dtype=object)
    footprints[~is_l] = shapely.polygons(_rotate(ring[~is_l], angle[~is_l], centre[~is_l]))
    footprints[is_l] = shapely.polygons(_rotate(l_ring[is_l], angle[is_l], centre[is_l]))
    return {
        "is_l": is_l, "footprints": footprints,
        "part_a": _rotate(part_a, angle, centre), "part_b": _rotate(part_b, angle, centre),
        "height_m": 3 + length * gsd * rng.uniform(0.1, 0.45, n),
        "roof": np.where(rng.random(n) < style.confusable_roofs,
                         rng.integers(_N_DISTINCT_ROOFS, len(ROOFS), n), rng.integers(0, _N_DISTINCT_ROOFS, n)),
        "roof_gain": rng.uniform(0.9, 1.1, n),
        "flat": rng.random(n) < 0.45,
    }


def _non_overlapping(geoms: np.ndarray, gap: float) -> np.ndarray:
    """Greedy selection (in index order) of geometries at least ``gap`` apart; returns a boolean mask."""
    i, j = shapely.STRtree(geoms).query(geoms, predicate="dwithin", distance=gap)
    earlier = [[] for _ in range(len(geoms))]
    for a, b in zip(i[i < j].tolist(), j[i < j].tolist(), strict=True):
        earlier[b].append(a)
    keep = np.ones(len(geoms), dtype=bool)
    for b, conflicts in enumerate(earlier):
        keep[b] = not any(keep[a] for a in conflicts)
    return keep


def _part_frame(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre, unit ridge axis (along the longer side) and (half length, half width) of rectangles."""
    centre = corners.mean(axis=1)
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 3] - corners[:, 0]
    l1, l2 = np.hypot(*e1.T), np.hypot(*e2.T)
    long_first = (l1 >= l2)[:, None]
    axis = np.where(long_first, e1 / l1[:, None], e2 / l2[:, None])
    half = np.column_stack([np.maximum(l1, l2), np.minimum(l1, l2)]) / 2
    return centre, axis, half


def cell_trees(style: Style, gsd: float, col: int, row: int, buildings: shapely.STRtree,
               roads: shapely.STRtree) -> Trees:
    """The clumped trees of one :data:`TREE_CELL` cell, drawn from a seed of their own.

    A function of the style and the cell only, so every window that needs the cell gets the same trees
    and no scene-wide list is kept. Crowns are irregular round outlines (plain coordinate arrays: no
    shapely objects to convert when rasterising); a crown may overhang a roof by
    at most about a metre; no tree stands on a road.
    """
    rng = np.random.default_rng([style.seed, col + 2**31, row + 2**31])
    n = int(rng.poisson((TREE_CELL * gsd) ** 2 / 100 * style.tree_density))
    xy = (np.array([col, row]) + rng.random((n, 2))) * TREE_CELL
    xy = xy[value_noise_at(xy[:, 0], xy[:, 1], 40 / gsd, style.seed + 7) > 0.55]
    radius = rng.uniform(*TREE_RADIUS_M, len(xy)) / gsd
    points = shapely.points(xy)
    clear = np.minimum(radius - 1.0 / gsd, 0.6 * radius)
    bad = np.zeros(len(xy), dtype=bool)
    bad[buildings.query(points, predicate="dwithin", distance=clear)[0]] = True
    bad[roads.query(points, predicate="intersects")[0]] = True
    xy, radius = xy[~bad], radius[~bad]
    k = 12
    theta = np.linspace(0, 2 * np.pi, k, endpoint=False)[None, :] + rng.uniform(0, np.pi, (len(xy), 1))
    r = radius[:, None] * np.clip(rng.normal(1, 0.1, (len(xy), k)), 0.8, 1.2)
    ring = np.stack([np.cos(theta) * r, np.sin(theta) * r], axis=-1) + xy[:, None, :]
    rgb = TREES[rng.integers(len(TREES), size=len(xy))] * rng.uniform(0.85, 1.15, (len(xy), 1))
    return Trees(np.concatenate([ring, ring[:, :1]], axis=1), xy, radius, rgb.astype(np.float32))


def place(
    style: Style,
    bounds: tuple[float, float, float, float],
    gsd: float,
    rng: np.random.Generator,
    *,
    keep_within: shapely.Geometry | None = None,
    min_visible: shapely.Geometry | None = None,
    valid: shapely.Polygon | None = None,
) -> Layout:
    """Place roads and buildings in ``bounds`` (pixel coordinates) and derive the buildings' shadows.

    Args:
        style: the look of the scene (densities, orientation, colours, sun).
        bounds: (xmin, ymin, xmax, ymax) of the area to fill, in pixels.
        gsd: metres per pixel.
        rng: the random generator (the only source of randomness).
        keep_within: keep only buildings entirely inside this geometry (a scene's extent or valid area).
        min_visible: keep only buildings with at least half their area (and 40 m2) inside this geometry
            (an image cut from a larger area).
        valid: the scene's valid (not nodata) area, kept for rendering.
    """
    x0, y0, x1, y1 = bounds
    area_m2 = (x1 - x0) * (y1 - y0) * gsd * gsd
    roads = _roads(style, bounds, gsd, rng)
    n = int(rng.poisson(area_m2 / 350 * style.building_density))
    centre = np.column_stack([rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)])
    if style.urban_scale_px is not None:
        urban = value_noise_at(centre[:, 0], centre[:, 1], style.urban_scale_px, style.seed + 3)
        centre = centre[rng.random(n) < np.clip(2.2 * urban - 0.5, 0.03, 1.0)]
    cand = _candidates(centre, style, gsd, rng)
    idx = _kept(cand["footprints"], roads, gsd, keep_within, min_visible)
    return _layout(cand, idx, style, roads, gsd, valid)


def _kept(footprints: np.ndarray, roads: np.ndarray, gsd: float, keep_within: shapely.Geometry | None,
          min_visible: shapely.Geometry | None) -> np.ndarray:
    """Indexes of the candidate ``footprints`` kept: inside the area, off the roads, apart from each other."""
    keep = np.ones(len(footprints), dtype=bool)
    if keep_within is not None:
        keep &= shapely.contains_properly(keep_within, footprints)
    if min_visible is not None:
        visible = shapely.area(shapely.intersection(footprints, min_visible))
        keep &= (visible >= 0.5 * shapely.area(footprints)) & (visible * gsd * gsd >= 40)
    if len(roads):
        keep[shapely.STRtree(roads).query(footprints, predicate="dwithin", distance=1.5 / gsd)[0]] = False
    idx = np.flatnonzero(keep)
    return idx[_non_overlapping(footprints[idx], 2.0 / gsd)]


def _layout(cand: dict[str, np.ndarray], idx: np.ndarray, style: Style, roads: np.ndarray, gsd: float,
            valid: shapely.Polygon | None) -> Layout:
    """The :class:`Layout` of the candidates ``idx``: their roof parts (two per L) and shadows derived."""
    is_l = cand["is_l"][idx]
    part_corners = np.concatenate([cand["part_a"][idx], cand["part_b"][idx][is_l]])
    part_building = np.concatenate([np.arange(len(idx)), np.flatnonzero(is_l)])
    order = np.argsort(part_building, kind="stable")
    part_corners, part_building = part_corners[order], part_building[order]
    centre, axis, half = _part_frame(part_corners)
    offset = (cand["height_m"][idx][part_building] * style.shadow_ratio / gsd)[:, None, None] * style.shadow_dir
    shadows = shapely.convex_hull(shapely.multipoints(np.concatenate([part_corners, part_corners + offset], axis=1)))
    return Layout(
        buildings=cand["footprints"][idx],
        kind=np.where(is_l, "L", "rect"),
        height_m=cand["height_m"][idx],
        roof_rgb=(ROOFS[cand["roof"][idx]] * cand["roof_gain"][idx][:, None]).astype(np.float32),
        flat=cand["flat"][idx] & ~is_l,
        parts=shapely.polygons(part_corners),
        part_building=part_building,
        part_center=centre,
        part_axis=axis,
        part_half=half,
        first_part=np.searchsorted(part_building, np.arange(len(idx))),
        shadows=shadows,
        roads=roads,
        gsd=gsd,
        # all trees cast the shadow of a 7 m tree; a dyadic offset keeps windows bit-identical
        tree_shadow=tuple(np.round(style.shadow_dir * 7 * style.shadow_ratio / gsd * 64) / 64),
        valid=valid,
    )
