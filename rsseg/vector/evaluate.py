"""Object-level evaluation of building polygons: the SpaceNet rule, plus area IoU and Dice.

Both files are read (any format GDAL reads), repaired where invalid, and reprojected to one projected CRS:
the truth's when it is projected, else the UTM zone of the truth's centre. Then, following SpaceNet,
each predicted building in turn (file order) is matched to the still unmatched truth building with which
it has the highest IoU, if that IoU is at least the threshold (0.5); candidates come from an STRtree
query. Matches are true positives, unmatched predictions false positives and unmatched truth buildings
false negatives. Area IoU and Dice compare the union of all predicted buildings with the union of all
truth buildings, free of any pixel grid.

Ratios with a zero denominator are 0, except that an empty prediction of an empty truth scores 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from pyproj import CRS

from rsseg.errors import ConfigError, VectorError
from rsseg.options import resolve
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
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise VectorError(f"{path}: no such file; expected {role} polygons in a vector file")
        try:
            gdf = pyogrio.read_dataframe(path)
        except pyogrio.errors.DataSourceError as exc:
            raise VectorError(f"{path}: not a vector file GDAL can read ({exc}); expected GeoJSON, "
                              "GeoPackage, FlatGeobuf or another OGR format") from exc
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


def evaluate_vectors(pred: str | Path | gpd.GeoDataFrame, truth: str | Path | gpd.GeoDataFrame,
                     options: EvaluateOptions | None = None, **values: Any) -> dict:
    """Score predicted building polygons against truth polygons (see the module docstring).

    Args:
        pred: predicted buildings: a vector file or a GeoDataFrame with a CRS.
        truth: truth buildings: the same.
        options: :class:`EvaluateOptions` (``iou``: least IoU for a predicted building to count as found).
        **values: options by name, overriding ``options`` (``evaluate_vectors(p, t, iou=0.3)``).

    Returns:
        A JSON-able dict: ``n_pred``, ``n_truth``, ``tp``, ``fp``, ``fn``, ``precision``, ``recall``,
        ``f1``, ``mean_iou`` (of the matches), ``area_iou`` and ``area_dice`` (of the unions), and the
        ``crs`` and ``iou_threshold`` used.

    Raises:
        ConfigError: an unknown option, or an IoU outside (0, 1].
        VectorError: a file that is not a vector file, has no CRS, or holds other geometries than polygons.
    """
    iou_threshold = resolve(EvaluateOptions, options, values).iou
    pred_gdf, truth_gdf = _read(pred, "prediction"), _read(truth, "truth")
    crs = _metric_crs(pred_gdf, truth_gdf)
    shapes_ = [shapely.make_valid(gdf.to_crs(crs).geometry.values.to_numpy(), method="structure")
               for gdf in (pred_gdf, truth_gdf)]
    p_geoms, t_geoms = shapes_
    _, _, iou = match_buildings(p_geoms, t_geoms, iou_threshold)
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
        "crs": crs.to_string(), "iou_threshold": iou_threshold,
        "n_pred": n_pred, "n_truth": n_truth, "tp": tp, "fp": n_pred - tp, "fn": n_truth - tp,
        "precision": precision, "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall, both_empty),
        "mean_iou": float(iou.mean()) if tp else 0.0,
        "area_iou": _ratio(overlap, total - overlap, both_empty),
        "area_dice": _ratio(2 * overlap, total, both_empty),
    }
    log.info("F1 %.4f (%d of %d predicted, %d truth buildings)", result["f1"], tp, n_pred, n_truth)
    return result
