"""Squaring up building outlines: right angles along each building's dominant orientation.

A polygonised mask follows pixel edges, so a building at an angle to the grid becomes a staircase. For
each building this module

1. smooths the staircase with a Douglas-Peucker simplification of about a pixel;
2. takes two candidate orientations: the length-weighted mean direction of the smoothed edges modulo
   90 degrees (directions times four averaged on the unit circle, the continuous form of an
   edge-direction histogram), and the orientation of the minimum rotated rectangle;
3. for each, in a frame rotated to that orientation, classes the smoothed edges as horizontal or
   vertical, and replaces each run of same-class edges by one axis-parallel line at the level that
   keeps the area under the original staircase (its mean height over the run), then intersects
   consecutive lines; holes are squared the same way;
4. keeps the candidate closest to the original (highest IoU).

A result that is not a valid polygon, or whose area differs from the original's by more than
``max_change``, is replaced by the original polygon, so regularisation never loses a building or moves
its area much.
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


def _subsequence(ring: np.ndarray, smooth: np.ndarray) -> np.ndarray | None:
    """Indexes in ``ring`` of the vertices of ``smooth`` (a simplification keeps a subsequence)."""
    found, k = [], 0
    for point in smooth[:-1]:
        while k < len(ring) - 1 and not np.array_equal(ring[k], point):
            k += 1
        if k == len(ring) - 1:
            return None
        found.append(k)
    return np.array([*found, len(ring) - 1])


def square_ring(ring: np.ndarray, smooth: np.ndarray) -> np.ndarray | None:
    """A rectilinear ring following ``ring``, whose dominant directions must already be the axes.

    Args:
        ring: a closed ring (first point repeated last).
        smooth: a simplification of ``ring`` (a subsequence of its vertices) whose edges decide which
            parts of ``ring`` are horizontal and which vertical.

    Returns:
        The closed rectilinear ring, or None when there are fewer than two horizontal and two vertical
        runs of edges (nothing rectangular to make of it).
    """
    steps = np.diff(smooth, axis=0)
    horizontal = np.abs(steps[:, 0]) >= np.abs(steps[:, 1])
    starts = np.flatnonzero(horizontal != np.roll(horizontal, 1))
    if len(starts) < 4:
        return None
    run = (np.cumsum(horizontal != np.roll(horizontal, 1)) - 1) % len(starts)  # first and last may join
    index = _subsequence(ring, smooth)
    if index is None:  # not a subsequence: level by the smoothed edges themselves
        ring, index = smooth, np.arange(len(smooth))
    smooth_edge = np.searchsorted(index, np.arange(len(ring) - 1), side="right") - 1  # of each edge of ring
    edge_run, edge_horizontal = run[smooth_edge], horizontal[smooth_edge]
    start, end = ring[:-1], ring[1:]
    along = np.where(edge_horizontal, end[:, 0] - start[:, 0], end[:, 1] - start[:, 1])
    across = np.where(edge_horizontal, start[:, 1] + end[:, 1], start[:, 0] + end[:, 0]) / 2
    span = np.bincount(edge_run, weights=along, minlength=len(starts))
    length = np.bincount(edge_run, weights=np.hypot(*(end - start).T), minlength=len(starts))
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(np.abs(span) > 1e-9 * length,
                         np.bincount(edge_run, weights=along * across, minlength=len(starts)) / span,
                         np.bincount(edge_run, weights=np.hypot(*(end - start).T) * across,
                                     minlength=len(starts)) / length)
    run_horizontal = np.zeros(len(starts), bool)
    run_horizontal[run] = horizontal
    following = np.roll(level, -1)
    corners = _drop_straight(np.column_stack([np.where(run_horizontal, following, level),
                                              np.where(run_horizontal, level, following)]))
    return None if len(corners) < 4 else np.vstack([corners[-1:], corners])


def _drop_straight(corners: np.ndarray) -> np.ndarray:
    """Remove corners where the ring goes straight on or turns back (spikes, zero-length runs)."""
    while len(corners) >= 4:
        before, after = corners - np.roll(corners, 1, axis=0), np.roll(corners, -1, axis=0) - corners
        cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        size = np.hypot(*before.T) * np.hypot(*after.T)
        straight = np.abs(cross) <= 1e-9 * max(float(size.max()), 1e-300)
        if not straight.any():
            break
        corners = corners[~straight]
    return corners


def _squared(polygon: shapely.Polygon, smooth: shapely.Polygon, angle: float) -> shapely.Geometry | None:
    """``polygon`` squared along ``angle`` (None when a ring has nothing rectangular to make of it)."""
    centre = np.asarray(polygon.exterior.coords[0])
    cos, sin = np.cos(angle), np.sin(angle)
    turn = np.array([[cos, -sin], [sin, cos]])  # row vectors times it turn by -angle, times its transpose back
    rings = []
    pairs = zip([polygon.exterior, *polygon.interiors], [smooth.exterior, *smooth.interiors], strict=True)
    for ring, simple in pairs:
        squared = square_ring((shapely.get_coordinates(ring) - centre) @ turn,
                              (shapely.get_coordinates(simple) - centre) @ turn)
        if squared is None:
            return None
        rings.append(squared @ turn.T + centre)
    return shapely.Polygon(rings[0], rings[1:])


def _envelope_angle(polygon: shapely.Polygon) -> float:
    corners = shapely.get_coordinates(shapely.oriented_envelope(polygon))
    dx, dy = corners[1] - corners[0]
    return float((np.arctan2(dy, dx) + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def _regularize(polygon: shapely.Polygon, smoothing: float, max_change: float) -> shapely.Geometry:
    smooth = shapely.simplify(polygon, smoothing, preserve_topology=True)
    if not isinstance(smooth, shapely.Polygon) or len(smooth.interiors) != len(polygon.interiors):
        return polygon
    best, best_iou = polygon, -1.0
    for angle in (dominant_angle(shapely.get_coordinates(smooth.exterior)), _envelope_angle(polygon)):
        result = _squared(polygon, smooth, angle)
        if result is None or not result.is_valid or abs(result.area - polygon.area) > max_change * polygon.area:
            continue
        overlap = shapely.area(shapely.intersection(result, polygon))
        iou = overlap / (result.area + polygon.area - overlap)
        if iou > best_iou:
            best, best_iou = result, iou
    return best


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
