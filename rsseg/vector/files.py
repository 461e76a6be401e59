"""Writing building polygons for GIS: GeoJSON (RFC 7946), GeoPackage and FlatGeobuf, atomically.

Every vector file rsseg writes goes through this module, written by pyogrio in one call (through Arrow
when pyarrow is installed). GeoJSON is written in EPSG:4326 with longitude first and rings oriented by
GDAL's ``RFC7946`` option; the other formats keep the polygons' CRS. A file is written under a
temporary name beside its final one and renamed when complete.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from pyproj import CRS

from rsseg.errors import VectorError
from rsseg.fileio import atomic_path

__all__ = ["FORMATS", "check_output", "merge_vectors", "output_driver", "write_vectors"]

#: Output drivers by file extension. GeoJSON is written in EPSG:4326 (RFC 7946), the others in the mask's CRS.
FORMATS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG", ".fgb": "FlatGeobuf"}
#: OGR layer geometry types by shapely type id.
_TYPE_NAMES = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
               6: "MultiPolygon"}
#: Write through Arrow (pyogrio's fast path) when pyarrow is there.
_USE_ARROW = importlib.util.find_spec("pyarrow") is not None


def output_driver(path: Path) -> str:
    """The OGR driver that the extension of ``path`` names, or :class:`VectorError` listing the supported ones."""
    driver = FORMATS.get(Path(path).suffix.lower())
    if driver is None:
        raise VectorError(f"{path}: unsupported output format {Path(path).suffix or '(no extension)'!r}; "
                          f"supported: {', '.join(FORMATS)}")
    return driver


def check_output(path: str | Path, overwrite: bool = False) -> str:
    """The driver for ``path``, after checking that it may be written (before any work is done).

    Raises:
        VectorError: an unsupported extension.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    driver = output_driver(Path(path))
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return driver


def _geometry_type(gdf: gpd.GeoDataFrame) -> str:
    """The layer's geometry type: the one type of its geometries, Polygon when empty, else Unknown."""
    kinds = {_TYPE_NAMES.get(k, "Unknown") for k in np.unique(shapely.get_type_id(gdf.geometry.array.to_numpy()))
             if k >= 0}
    return kinds.pop() if len(kinds) == 1 else ("Polygon" if not kinds else "Unknown")


def _layer(gdf: gpd.GeoDataFrame, path: Path, driver: str, layer: str) -> tuple[gpd.GeoDataFrame, dict]:
    """The polygons as ``driver`` stores them (GeoJSON: EPSG:4326) and pyogrio's options for the layer."""
    if gdf.crs is None:
        raise VectorError(f"{path}: the polygons have no CRS; set one (GeoDataFrame.set_crs) before writing")
    provenance = gdf.attrs.get("provenance", {})
    options: dict = {"driver": driver, "layer": layer, "geometry_type": _geometry_type(gdf)}
    if driver == "GeoJSON":
        if not gdf.crs.equals(CRS.from_epsg(4326)):
            gdf = gdf.to_crs(4326)
        options["layer_options"] = {"RFC7946": "YES"}
        if provenance:
            options["layer_options"]["FOREIGN_MEMBERS_COLLECTION"] = json.dumps({"rsseg": provenance})
    else:
        options["layer_metadata"] = {f"rsseg_{key}": value for key, value in provenance.items()}
    return gdf, options


def write_vectors(gdf: gpd.GeoDataFrame, path: str | Path, overwrite: bool = False) -> Path:
    """Write polygons atomically, in the format the extension names.

    GeoJSON (``.geojson``/``.json``) follows RFC 7946: EPSG:4326, longitude before latitude, exterior
    rings counter-clockwise and holes clockwise (GDAL's ``RFC7946`` option orients the rings);
    GeoPackage (``.gpkg``) and FlatGeobuf (``.fgb``) keep the data's CRS. ``gdf.attrs["provenance"]``
    goes into the layer metadata (``rsseg_*`` items) or, for GeoJSON, into an ``rsseg`` member of the
    FeatureCollection.

    Raises:
        VectorError: an unsupported extension, or polygons without a CRS.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    gdf, options = _layer(gdf, path, output_driver(path), path.stem)
    with atomic_path(path, overwrite=overwrite) as tmp:
        pyogrio.write_dataframe(gdf, tmp, use_arrow=_USE_ARROW, **options)
    return path


def merge_vectors(files: Sequence[Path], out: str | Path, layer: str = "buildings", overwrite: bool = False
                  ) -> Path:
    """Append every file's buildings to one layer (with a ``scene`` column), file by file, atomically.

    The merged layer keeps the files' CRS when they share one, else EPSG:4326 (always for GeoJSON). Memory
    holds one file's buildings at a time.
    """
    out = Path(out)
    driver = output_driver(out)
    crss = {pyogrio.read_info(f)["crs"] for f in files}
    target = crss.pop() if len(crss) == 1 and driver != "GeoJSON" else "EPSG:4326"
    with atomic_path(out, overwrite=overwrite) as tmp:
        for i, path in enumerate(files):
            gdf = pyogrio.read_dataframe(path).to_crs(target)
            gdf.insert(0, "scene", Path(path).stem)
            gdf, options = _layer(gdf, out, driver, layer)
            pyogrio.write_dataframe(gdf, tmp, append=i > 0, use_arrow=_USE_ARROW, **options)
    return out
