"""Object-level evaluation of building polygons: the SpaceNet rule, plus area IoU and Dice.

Both files are read (any format GDAL reads), repaired where invalid, and reprojected to one projected CRS:
the truth's when it is projected, else the UTM zone of the truth's centre. Then, following SpaceNet,
each predicted building in turn (file order) is matched to the still unmatched truth building with which
it has the highest IoU, if that IoU is at least the threshold (0.5); candidates come from an STRtree
query. Matches are true positives, unmatched predictions false positives and unmatched truth buildings
false negatives. Area IoU and Dice compare the union of all predicted buildings with the union of all
truth buildings, free of any pixel grid.

With ``min_area`` (m2 on the ground, whatever the CRS), polygons smaller than that are left out on both
sides before anything is counted, as SpaceNet-2 leaves out buildings under 20 pixels; the result says
which rule was applied and how many polygons each side lost to it.

Ratios with a zero denominator are 0, except that an empty prediction of an empty truth scores 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS

from rsseg.errors import ConfigError, VectorError
from rsseg.options import resolve
from rsseg.vector.cleaning import projected_ground_area
from rsseg.vector.files import read_vectors
from rsseg.vector.options import EvaluateOptions

__all__ = ["evaluate_vectors", "match_buildings"]

log = logging.getLogger(__name__)


def match_buildings(pred: np.ndarray, truth: np.ndarray,
                    iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match predicted to truth polygons one to one by the SpaceNet rule.

    Args:
        pred: predicted polygons, in the order they are matched.
        truth: truth polygons, in the same projected CRS.
        iou_threshold: least IoU of a match.

    Returns:
        The indexes into ``pred`` and into ``truth`` of the matched pairs, and their IoUs.
    """
    if not 0 < iou_threshold <= 1:
        raise ConfigError(f"IoU threshold {iou_threshold}: expected a value in (0, 1], e.g. 0.5")
    p, t = shapely.STRtree(truth).query(pred, predicate="intersects")
    overlap = shapely.area(shapely.intersection(pred[p], truth[t]))
    iou = overlap / (shapely.area(pred[p]) + shapely.area(truth[t]) - overlap)
    good = iou >= iou_threshold
    p, t, iou = p[good], t[good], iou[good]
    taken = np.zeros(len(truth), bool)
    done = np.zeros(len(pred), bool)
    keep = []
    for k in np.lexsort((t, -iou, p)):  # each prediction in order, its candidates by falling IoU
        if not done[p[k]] and not taken[t[k]]:
            done[p[k]] = taken[t[k]] = True
            keep.append(k)
    keep = np.array(keep, dtype=np.int64)
    return p[keep], t[keep], iou[keep]


def _read(source: str | Path | gpd.GeoDataFrame, role: str) -> gpd.GeoDataFrame:
    if isinstance(source, gpd.GeoDataFrame):
        gdf, name = source, f"{role} polygons"
    else:
        gdf, name = read_vectors(source, role), str(source)
    if gdf.crs is None:
        raise VectorError(f"{name} ({role}): no CRS; set one (e.g. ogr2ogr -a_srs EPSG:XXXX) to compare maps")
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    kinds = set(gdf.geom_type) - {"Polygon", "MultiPolygon"}
    if kinds:
        raise VectorError(f"{name} ({role}): expected building polygons, found {', '.join(sorted(kinds))}")
    return gdf


def _ratio(num: float, den: float, both_empty: bool) -> float:
    return 1.0 if both_empty else (num / den if den else 0.0)


def _metric_crs(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame) -> CRS:
    """The truth's CRS if projected, else the local UTM zone of the buildings (any CRS when there are none)."""
    if truth.crs.is_projected:
        return truth.crs
    for gdf in (truth, pred):
        if len(gdf):
            return gdf.estimate_utm_crs()
    return truth.crs  # nothing to measure


def _polygons(pred: str | Path | gpd.GeoDataFrame, truth: str | Path | gpd.GeoDataFrame, min_area: float
              ) -> tuple[CRS, np.ndarray, np.ndarray, dict[str, int]]:
    """Both sides' polygons, repaired, in one metric CRS, less those under ``min_area`` m2 (and how many)."""
    pred_gdf, truth_gdf = _read(pred, "prediction"), _read(truth, "truth")
    crs = _metric_crs(pred_gdf, truth_gdf)
    sides = {}
    left_out = {}
    for side, gdf in (("pred", pred_gdf), ("truth", truth_gdf)):
        geoms = shapely.make_valid(gdf.to_crs(crs).geometry.values.to_numpy(), method="structure")
        if min_area > 0 and len(geoms):
            geoms = geoms[projected_ground_area(geoms, crs.to_wkt()) >= min_area]
        sides[side], left_out[side] = geoms, len(gdf) - len(geoms)
    return crs, sides["pred"], sides["truth"], left_out


def evaluate_vectors(pred: str | Path | gpd.GeoDataFrame, truth: str | Path | gpd.GeoDataFrame,
                     options: EvaluateOptions | None = None, **values: Any) -> dict:
    """Score predicted building polygons against truth polygons (see the module docstring).

    Args:
        pred: predicted buildings: a vector file or a GeoDataFrame with a CRS.
        truth: truth buildings: the same.
        options: :class:`EvaluateOptions` (``iou``: least IoU for a predicted building to count as found;
            ``min_area``: polygons under this many m2 are left out on both sides).
        **values: options by name, overriding ``options`` (``evaluate_vectors(p, t, iou=0.3)``).

    Returns:
        A JSON-able dict: ``n_pred``, ``n_truth`` (the polygons scored), ``tp``, ``fp``, ``fn``,
        ``precision``, ``recall``, ``f1``, ``mean_iou`` (of the matches), ``area_iou`` and ``area_dice`` (of
        the unions), the ``crs`` used, and the rule applied: ``rule`` (in words), ``iou_threshold``,
        ``min_area_m2`` and ``left_out`` (polygons under ``min_area`` per side, ``{"pred": n, "truth": n}``).

    Raises:
        ConfigError: an unknown option, an IoU outside (0, 1] or a negative ``min_area``.
        VectorError: a file that is not a vector file, has no CRS, or holds other geometries than polygons.
    """
    opts = resolve(EvaluateOptions, options, values)
    crs, p_geoms, t_geoms, left_out = _polygons(pred, truth, opts.min_area)
    _, _, iou = match_buildings(p_geoms, t_geoms, opts.iou)
    n_pred, n_truth, tp = len(p_geoms), len(t_geoms), len(iou)
    both_empty = n_pred == n_truth == 0
    precision = _ratio(tp, n_pred, both_empty)
    recall = _ratio(tp, n_truth, both_empty)
    p_union, t_union = shapely.union_all(p_geoms), shapely.union_all(t_geoms)
    overlap = shapely.area(shapely.intersection(p_union, t_union))
    total = shapely.area(p_union) + shapely.area(t_union)
    result = {
        "pred": str(pred) if not isinstance(pred, gpd.GeoDataFrame) else None,
        "truth": str(truth) if not isinstance(truth, gpd.GeoDataFrame) else None,
        "crs": crs.to_string(), "rule": _rule(opts), "iou_threshold": opts.iou, "min_area_m2": opts.min_area,
        "left_out": left_out,
        "n_pred": n_pred, "n_truth": n_truth, "tp": tp, "fp": n_pred - tp, "fn": n_truth - tp,
        "precision": precision, "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall, both_empty),
        "mean_iou": float(iou.mean()) if tp else 0.0,
        "area_iou": _ratio(overlap, total - overlap, both_empty),
        "area_dice": _ratio(2 * overlap, total, both_empty),
    }
    log.info("F1 %.4f (%d of %d predicted, %d truth buildings; %d and %d under %g m2 left out)", result["f1"],
             tp, n_pred, n_truth, left_out["pred"], left_out["truth"], opts.min_area)
    return result


def _rule(opts: EvaluateOptions) -> str:
    """The matching rule in words, for the result."""
    rule = (f"SpaceNet: each predicted building in file order matched to the unmatched truth building of "
            f"highest IoU, if at least {opts.iou:g}")
    if opts.min_area > 0:
        rule += f"; polygons under {opts.min_area:g} m2 left out on both sides"
    return rule
