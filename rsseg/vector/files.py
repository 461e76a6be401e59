"""Vector files for GIS: GeoJSON (RFC 7946), GeoPackage, FlatGeobuf and GeoParquet, written atomically.

Every vector file rsseg writes goes through this module: by pyogrio (through Arrow) in one call, GeoParquet
1.1 by geopandas (this GDAL has no Parquet driver). :func:`write_vectors` says what each format keeps;
:func:`merge_vectors` puts the buildings of several scenes in one layer, with ids unique across scenes
(``scene-number``, e.g. ``scene_a-17``) and the name and SHA-256 of each scene file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow
import pyarrow.parquet as pq
import pyogrio
import shapely
from pyproj import CRS
from pyproj.exceptions import CRSError

from rsseg.errors import OutputExistsError, VectorError
from rsseg.fileio import atomic_path, file_sha256

__all__ = ["FORMATS", "check_output", "merge_vectors", "output_driver", "read_vectors", "write_vectors"]

#: Output drivers by file extension. GeoJSON is written in EPSG:4326 (RFC 7946), the others in the mask's CRS.
#: "Parquet" is GeoParquet 1.1, written by geopandas.
FORMATS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".parquet": "Parquet"}
#: The GeoParquet version written (1.1: the ``bbox`` covering column).
GEOPARQUET_VERSION = "1.1.0"
#: OGR layer geometry types by shapely type id.
_TYPE_NAMES = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
               6: "MultiPolygon"}
#: Merged in one write: GeoParquet cannot be appended to, and GDAL's FlatGeobuf append drops the layer
#: metadata (its writer holds every feature in memory for the spatial index anyway).
_WRITTEN_AT_ONCE = {"Parquet", "FlatGeobuf"}


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
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    driver = output_driver(Path(path))
    if not overwrite and Path(path).exists():
        raise OutputExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
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
    elif driver == "Parquet":
        options["provenance"] = provenance
    else:
        options["layer_metadata"] = {f"rsseg_{key}": value for key, value in provenance.items()}
    return gdf, options


def write_vectors(gdf: gpd.GeoDataFrame, path: str | Path, overwrite: bool = False) -> Path:
    """Write polygons atomically, in the format the extension names.

    GeoJSON (``.geojson``/``.json``) follows RFC 7946: EPSG:4326, longitude before latitude, exterior
    rings counter-clockwise and holes clockwise (GDAL's ``RFC7946`` option orients the rings);
    GeoPackage (``.gpkg``), FlatGeobuf (``.fgb``) and GeoParquet (``.parquet``, version 1.1 with a ``bbox``
    covering column) keep the data's CRS. ``gdf.attrs["provenance"]`` goes into the layer metadata
    (``rsseg_*`` items), for GeoJSON into an ``rsseg`` member of the FeatureCollection, for GeoParquet into
    the ``attrs`` that geopandas keeps in the file's schema metadata (``PANDAS_ATTRS``).

    Raises:
        VectorError: an unsupported extension, or polygons without a CRS.
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    gdf, options = _layer(gdf, path, output_driver(path), path.stem)
    with atomic_path(path, overwrite=overwrite) as tmp:
        _write(gdf, options, tmp)
    return path


def _write(gdf: gpd.GeoDataFrame, options: dict, tmp: Path, append: bool = False) -> None:
    """Write one layer with the options of :func:`_layer` (GeoParquet: in one go, never appended)."""
    if options["driver"] == "Parquet":
        gdf = gdf.copy()
        gdf.attrs = {"provenance": options["provenance"]} if options["provenance"] else {}
        gdf.to_parquet(tmp, index=False, write_covering_bbox=True, schema_version=GEOPARQUET_VERSION)
    else:
        pyogrio.write_dataframe(gdf, tmp, append=append, use_arrow=True, **options)


def read_vectors(path: str | Path, role: str = "vector") -> gpd.GeoDataFrame:
    """The polygons of a vector file: GeoParquet by geopandas, anything else by pyogrio (any OGR format).

    Raises:
        VectorError: ``path`` does not exist or is not a vector file that can be read.
    """
    path = Path(path)
    if not path.exists():
        raise VectorError(f"{path}: no such file; expected {role} polygons in a vector file")
    try:
        if path.suffix.lower() == ".parquet":
            return gpd.read_parquet(path)
        return pyogrio.read_dataframe(path)
    except (pyogrio.errors.DataSourceError, pyarrow.ArrowException, ValueError) as exc:
        raise VectorError(f"{path}: not a vector file rsseg can read ({exc}); expected GeoJSON, GeoPackage, "
                          "FlatGeobuf, GeoParquet or another OGR format") from exc


def _crs_of(path: Path) -> str:
    """The CRS of a vector file's layer (GeoParquet: from its ``geo`` metadata, OGC:CRS84 when absent)."""
    try:
        if path.suffix.lower() == ".parquet":
            geo = json.loads(pq.read_schema(path).metadata[b"geo"])
            crs = geo["columns"][geo["primary_column"]].get("crs", "OGC:CRS84")
        else:
            crs = pyogrio.read_info(path)["crs"]
    except (pyogrio.errors.DataSourceError, pyarrow.ArrowException, KeyError, ValueError) as exc:
        raise VectorError(f"{path}: not a vector file rsseg can merge ({exc}); expected one written by "
                          "rsseg vectorize") from exc
    if crs is None:
        raise VectorError(f"{path}: no CRS; set one (e.g. ogr2ogr -a_srs EPSG:XXXX) before merging")
    try:
        return CRS.from_user_input(crs).to_string()
    except CRSError as exc:
        raise VectorError(f"{path}: a CRS pyproj cannot read ({exc})") from exc


def merge_vectors(files: Sequence[Path], out: str | Path, layer: str = "buildings", overwrite: bool = False
                  ) -> Path:
    """Put every file's buildings in one layer, atomically, with ids unique across the files.

    Each file is a scene (its name without extension). The merged layer has ``id`` = ``scene-number``
    (``scene_a-17``), ``scene``, ``number`` (the building's ``id`` in its scene file, else its position from
    1) and the files' other attributes. It keeps the files' CRS when they share one, else EPSG:4326 (always
    for GeoJSON). Its provenance lists each file's name and SHA-256. GeoJSON and GeoPackage are appended file by
    file (memory holds one file's buildings); GeoParquet and FlatGeobuf are written once from all of them.

    Raises:
        VectorError: an unsupported extension, two files of one scene name, or a file without a CRS.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
    """
    out, files = Path(out), [Path(f) for f in files]
    driver = output_driver(out)
    scenes = [f.stem for f in files]
    twice = sorted({s for s in scenes if scenes.count(s) > 1})
    if twice:
        raise VectorError(f"{out}: scene names {', '.join(twice)} come from more than one file; building ids "
                          "would repeat (rename the files so that each scene has one)")
    crss = {_crs_of(f) for f in files}
    target = crss.pop() if len(crss) == 1 and driver != "GeoJSON" else "EPSG:4326"
    provenance = {"code_version": version("rsseg"), "sources": json.dumps(
        [{"scene": f.stem, "file": f.name, "sha256": file_sha256(f)} for f in files])}
    frames = (_scene_frame(f, target) for f in files or [None])  # no files: one empty layer
    if driver in _WRITTEN_AT_ONCE:
        frames = [gpd.GeoDataFrame(pd.concat(list(frames), ignore_index=True), geometry="geometry", crs=target)]
    with atomic_path(out, overwrite=overwrite) as tmp:
        for i, gdf in enumerate(frames):
            gdf.attrs["provenance"] = provenance
            _write(*_layer(gdf, out, driver, layer), tmp, append=i > 0)
    return out


def _scene_frame(path: Path | None, target: str) -> gpd.GeoDataFrame:
    """One file's buildings in ``target`` with ``id`` (``scene-number``), ``scene`` and ``number`` first."""
    if path is None:
        return gpd.GeoDataFrame({"id": [], "scene": [], "number": []}, geometry=[], crs=target)
    gdf = read_vectors(path).to_crs(target)
    number = (gdf["id"].to_numpy() if "id" in gdf and gdf["id"].dtype.kind in "iu"
              else np.arange(1, len(gdf) + 1))
    gdf = gdf.drop(columns=[c for c in ("id", "scene", "number") if c in gdf])
    gdf.insert(0, "number", number.astype(np.int64))
    gdf.insert(0, "scene", path.stem)
    gdf.insert(0, "id", [f"{path.stem}-{n}" for n in number])
    return gdf
