"""Building footprints prepared for a scene's pixel grid.

Footprints are read with pyogrio (geometry only); those whose envelope can touch the scene (a test in the
file's own CRS) are reprojected to the scene's CRS, repaired (:func:`shapely.make_valid`, polygonal parts
kept) and indexed in an STRtree, so each block of work gets only the footprints that intersect its windows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyogrio
import shapely
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from rsseg.errors import VectorError

__all__ = ["Footprints", "load_footprints"]

log = logging.getLogger(__name__)

_POLYGONAL = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)


@dataclass(frozen=True, slots=True)
class Footprints:
    """Polygons in the scene's CRS, with an STRtree over them and what preparing them found.

    Attributes:
        geoms: valid, non-empty polygons and multipolygons.
        counts: ``geometries_read`` (in the file), ``geometries_empty`` (missing or empty, skipped),
            ``geometries_outside`` (away from the scene, skipped), ``geometries_repaired`` (invalid, fixed by
            make_valid) and ``geometries_non_polygonal`` (points or lines, skipped).
    """

    geoms: np.ndarray
    counts: dict[str, int]
    tree: shapely.STRtree = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tree", shapely.STRtree(self.geoms))

    def within(self, bounds: tuple[float, float, float, float]) -> np.ndarray:
        """The footprints that intersect the rectangle (minx, miny, maxx, maxy), in file order."""
        return self.geoms[np.sort(self.tree.query(shapely.box(*bounds), predicate="intersects"))]


_COUNTS = ("geometries_read", "geometries_empty", "geometries_outside", "geometries_repaired",
           "geometries_non_polygonal")


def _fmt(bounds: Any) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in bounds) + ")"


def _overlaps(a: Any, b: Any) -> Any:
    """Whether rectangles (minx, miny, maxx, maxy) touch; elementwise when ``a`` holds arrays (NaN: False)."""
    return (a[0] <= b[2]) & (b[0] <= a[2]) & (a[1] <= b[3]) & (b[1] <= a[3])


def load_footprints(path: str | os.PathLike[str], crs: CRS | None,
                    bounds: tuple[float, float, float, float]) -> Footprints:
    """Read, reproject and repair the footprints in ``path`` that can touch a scene.

    Args:
        path: a vector file pyogrio reads (GeoJSON, GeoPackage, Shapefile, ...), any CRS. A file without a
            CRS is taken to be in the scene's CRS.
        crs: the scene's CRS (None: coordinates are used as they are).
        bounds: the scene's extent (minx, miny, maxx, maxy) in ``crs``.

    Raises:
        VectorError: the file cannot be read, or its footprints are all away from the scene (both extents
            named). A file without features is a scene without buildings (all-background labels).
    """
    try:
        frame = pyogrio.read_dataframe(path, columns=[])  # one pass: read_info's total bounds is a second
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        raise VectorError(f"{path}: not a raster or vector file GDAL can read "
                          f"({' '.join(str(exc).split())})") from exc
    if not len(frame):  # a scene without buildings: every label pixel is background
        log.warning("%s: no footprints; labels will be all background", path)
        return Footprints(np.empty(0, dtype=object), dict.fromkeys(_COUNTS, 0))
    file_crs = CRS.from_user_input(frame.crs) if frame.crs else None
    if file_crs is None or crs is None:
        if file_crs != crs:
            log.warning("%s: CRS %s, scene CRS %s; using the coordinates as they are", path, file_crs, crs)
        scene_in_file = bounds
    else:
        scene_in_file = transform_bounds(crs, file_crs, *bounds, densify_pts=21)
    geoms = np.asarray(frame.geometry.array, dtype=object)
    total_bounds = shapely.total_bounds(geoms)
    if not _overlaps(total_bounds, scene_in_file):
        raise VectorError(f"{path}: footprints do not overlap the scene: footprints extent "
                          f"{_fmt(total_bounds)}, scene extent {_fmt(scene_in_file)} "
                          f"(both in {file_crs or 'the same coordinates'})")
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    near = present & _overlaps(shapely.bounds(geoms).T, scene_in_file)
    if file_crs is not None and crs is not None and file_crs != crs:
        frame = frame[near].to_crs(crs)
    else:
        frame = frame[near]
    geoms = np.asarray(frame.geometry.array, dtype=object)
    invalid = ~shapely.is_valid(geoms)
    geoms[invalid] = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
    emptied = shapely.is_empty(geoms)
    polygonal = np.isin(shapely.get_type_id(geoms), _POLYGONAL)
    counts = {"geometries_read": len(present), "geometries_empty": int((~present).sum() + emptied.sum()),
              "geometries_outside": int(present.sum() - near.sum()),
              "geometries_repaired": int((invalid & ~emptied).sum()),
              "geometries_non_polygonal": int((~polygonal & ~emptied).sum())}
    keep = polygonal & ~emptied
    log.info("%s: %d footprints near the scene (%s)", path, int(keep.sum()), counts)
    return Footprints(geoms[keep], counts)

