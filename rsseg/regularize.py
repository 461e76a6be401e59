"""Squaring up building outlines: right angles along each building's dominant orientation.

A polygonised mask follows pixel edges, so a building at an angle to the grid becomes a staircase. For
each building this module (1) smooths the staircase away with a Douglas-Peucker simplification of about
a pixel, (2) finds the dominant orientation as the length-weighted mean edge direction modulo 90 degrees
(directions times four averaged on the unit circle, the continuous form of an edge-direction histogram),
(3) in a frame rotated to that orientation, classes every edge as horizontal or vertical, replaces each
run of same-class edges by one axis-parallel line at the run's length-weighted mean position, and
intersects consecutive lines, and (4) rotates back. Holes are squared the same way. A result that is not
a valid polygon, or whose area differs from the original's by more than ``max_change``, is replaced by
the original polygon, so regularisation never loses a building or moves its area much.
"""

from __future__ import annotations

import numpy as np
import shapely

__all__ = ["dominant_angle", "regularize_polygons", "square_ring"]


def dominant_angle(ring: np.ndarray) -> float:
    """Dominant edge direction of a closed ring, in radians in (-pi/4, pi/4].

    The length-weighted mean of the edge directions ``t`` modulo 90 degrees, computed as
    ``arg(sum(length * exp(4j * t))) / 4``, so edges at 0 and 90 degrees vote for the same orientation.
    """
    steps = np.diff(ring, axis=0)
    lengths = np.hypot(steps[:, 0], steps[:, 1])
    votes = np.sum(lengths * np.exp(4j * np.arctan2(steps[:, 1], steps[:, 0])))
    return float(np.angle(votes) / 4)


def square_ring(ring: np.ndarray) -> np.ndarray | None:
    """A rectilinear ring following ``ring``, whose dominant directions must already be the axes.

    Returns:
        The closed ring (first point repeated last), or None when the ring has fewer than two horizontal
        and two vertical runs of edges (nothing rectangular to make of it).
    """
    steps = np.diff(ring, axis=0)
    horizontal = np.abs(steps[:, 0]) >= np.abs(steps[:, 1])
    starts = np.flatnonzero(horizontal != np.roll(horizontal, 1))
    if len(starts) < 4:
        return None
    shift = -starts[0]
    horizontal = np.roll(horizontal, shift)
    lengths = np.roll(np.hypot(steps[:, 0], steps[:, 1]), shift)
    middles = np.roll((ring[:-1] + ring[1:]) / 2, shift, axis=0)
    run = np.cumsum(horizontal != np.roll(horizontal, 1)) - 1
    position = np.where(horizontal, middles[:, 1], middles[:, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.bincount(run, weights=lengths * position) / np.bincount(run, weights=lengths)
    run_horizontal = horizontal[np.flatnonzero(np.diff(run, prepend=-1))]
    following = np.roll(level, -1)
    corners = np.column_stack([np.where(run_horizontal, following, level),
                               np.where(run_horizontal, level, following)])
    return np.vstack([corners, corners[:1]])


def _regularize(polygon: shapely.Polygon, smoothing: float, max_change: float) -> shapely.Geometry:
    smooth = shapely.simplify(polygon, smoothing, preserve_topology=True)
    if not isinstance(smooth, shapely.Polygon) or smooth.is_empty:
        return polygon
    outer = shapely.get_coordinates(smooth.exterior)
    angle = dominant_angle(outer)
    centre = outer[:-1].mean(axis=0)
    cos, sin = np.cos(angle), np.sin(angle)
    to_axes = np.array([[cos, -sin], [sin, cos]])  # row vectors times this rotate by -angle
    rings = []
    for ring in [outer, *(shapely.get_coordinates(hole) for hole in smooth.interiors)]:
        squared = square_ring((ring - centre) @ to_axes)
        if squared is None:
            return polygon
        rings.append(squared @ to_axes.T + centre)
    result = shapely.remove_repeated_points(shapely.Polygon(rings[0], rings[1:]))
    if not result.is_valid or abs(result.area - polygon.area) > max_change * polygon.area:
        return polygon
    return result


def regularize_polygons(polygons: np.ndarray, pixel: float, max_change: float = 0.1) -> np.ndarray:
    """Square up building outlines (see the module docstring).

    Args:
        polygons: polygons in a projected frame where right angles on the ground are right angles.
        pixel: the mask's pixel size in that frame's units; staircases of about this size are smoothed.
        max_change: largest relative change of a building's area; beyond it the original is kept.

    Returns:
        The regularised polygons, one for each input, in the same order.
    """
    out = np.empty(len(polygons), dtype=object)
    for i, polygon in enumerate(polygons):
        out[i] = _regularize(polygon, pixel, max_change) if isinstance(polygon, shapely.Polygon) else polygon
    return out
