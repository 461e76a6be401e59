"""Writing building polygons for GIS: GeoJSON (RFC 7946), GeoPackage and FlatGeobuf, atomically.

GeoJSON is written in EPSG:4326 with longitude first and rings oriented by GDAL's ``RFC7946`` option;
the other formats keep the polygons' CRS. Given a Dask client with several worker threads, GeoJSON
features are formatted by GDAL on the workers in chunks and spliced in order into exactly the bytes of
one serial write.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from distributed import Client
from pyproj import CRS

from rsseg.errors import VectorError
from rsseg.fileio import atomic_path

__all__ = ["FORMATS", "output_driver", "write_vectors"]

#: Output drivers by file extension. GeoJSON is written in EPSG:4326 (RFC 7946), the others in the mask's CRS.
FORMATS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG", ".fgb": "FlatGeobuf"}
#: OGR layer geometry types by shapely type id.
_TYPE_NAMES = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
               6: "MultiPolygon"}
#: Features per GeoJSON chunk formatted by one Dask task (rounded so every worker gets as many chunks).
_GEOJSON_CHUNK = 10_000
#: How GDAL's GeoJSON writer opens the feature list, and how it closes the file.
_GEOJSON_FEATURES = b'"features": [\n'
_GEOJSON_END = b"\n]\n}\n"


def output_driver(path: Path) -> str:
    """The OGR driver that the extension of ``path`` names, or :class:`VectorError` listing the supported ones."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise VectorError(f"{path}: unsupported output format {path.suffix or '(no extension)'!r}; "
                          f"supported: {', '.join(FORMATS)}") from None


def _geojson_text(wkb: np.ndarray, attributes: pd.DataFrame, crs: CRS, options: dict) -> bytes:
    """Features as a GeoJSON FeatureCollection, formatted by GDAL (a Dask task of :func:`write_vectors`)."""
    buffer = io.BytesIO()
    pyogrio.write_dataframe(gpd.GeoDataFrame(attributes, geometry=shapely.from_wkb(wkb), crs=crs), buffer,
                            driver="GeoJSON", **options)
    return buffer.getvalue()


def _write_geojson_on(client: Client, threads: int, gdf: gpd.GeoDataFrame, tmp: Path, options: dict) -> None:
    """Write GeoJSON with GDAL formatting the features on the workers, in chunks spliced in order.

    GDAL writes a FeatureCollection as a header ending in ``"features": [``, one feature per line with
    ``,`` line ends, then ``]`` and ``}`` lines; every chunk is written with the same options, so its
    header and footer are the same and its feature lines are those the whole layer would have: the
    file is byte for byte what one ``write_dataframe`` call writes.
    """
    n_chunks = threads * -(-len(gdf) // (threads * _GEOJSON_CHUNK))
    bounds = np.linspace(0, len(gdf), n_chunks + 1).astype(int)
    wkb = shapely.to_wkb(gdf.geometry.array.to_numpy())
    attributes = pd.DataFrame(gdf.drop(columns=gdf.geometry.name))
    futures = [client.submit(_geojson_text, wkb[a:b], attributes.iloc[a:b], gdf.crs, options, pure=False)
               for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    head = b""
    with tmp.open("wb") as out:
        while futures:
            text = futures.pop(0).result()  # dropping the future frees the chunk on its worker
            start = text.find(_GEOJSON_FEATURES) + len(_GEOJSON_FEATURES)
            if not head:
                head = text[:start]
                out.write(head)
            else:
                out.write(b",\n")
            if start < len(_GEOJSON_FEATURES) or text[:start] != head or not text.endswith(_GEOJSON_END):
                raise VectorError(f"{tmp}: GDAL {pyogrio.__gdal_version_string__} laid GeoJSON out "
                                  "unexpectedly; write it in one process (scheduler='sync')")
            out.write(text[start:-len(_GEOJSON_END)])
        out.write(_GEOJSON_END)


def write_vectors(gdf: gpd.GeoDataFrame, path: str | Path, overwrite: bool = True,
                  client: Client | None = None) -> Path:
    """Write polygons atomically, in the format the extension names.

    GeoJSON (``.geojson``/``.json``) follows RFC 7946: EPSG:4326, longitude before latitude, exterior
    rings counter-clockwise and holes clockwise (GDAL's ``RFC7946`` option orients the rings);
    GeoPackage (``.gpkg``) and FlatGeobuf (``.fgb``) keep the data's CRS. ``gdf.attrs["provenance"]``
    goes into the layer metadata (``rsseg_*`` items) or, for GeoJSON, into an ``rsseg`` member of the
    FeatureCollection. Given a Dask ``client`` with two or more worker threads, GeoJSON features are
    formatted on the workers in chunks (the same bytes as formatting them here).

    Raises:
        VectorError: an unsupported extension, or polygons without a CRS.
    """
    path = Path(path)
    driver = output_driver(path)
    if gdf.crs is None:
        raise VectorError(f"{path}: the polygons have no CRS; set one (GeoDataFrame.set_crs) before writing")
    provenance = gdf.attrs.get("provenance", {})
    options: dict = {"layer": path.stem}
    if driver == "GeoJSON":
        if not gdf.crs.equals(CRS.from_epsg(4326)):
            gdf = gdf.to_crs(4326)
        options["layer_options"] = {"RFC7946": "YES"}
        if provenance:
            options["layer_options"]["FOREIGN_MEMBERS_COLLECTION"] = json.dumps({"rsseg": provenance})
    else:
        options["layer_metadata"] = {f"rsseg_{key}": value for key, value in provenance.items()}
    kinds = {_TYPE_NAMES.get(k, "Unknown") for k in np.unique(shapely.get_type_id(gdf.geometry.array.to_numpy()))
             if k >= 0}
    options["geometry_type"] = kinds.pop() if len(kinds) == 1 else ("Polygon" if not kinds else "Unknown")
    threads = sum(client.nthreads().values()) if client is not None and driver == "GeoJSON" else 1
    with atomic_path(path, overwrite=overwrite) as tmp:
        if 1 < threads <= len(gdf):
            _write_geojson_on(client, threads, gdf, tmp, options)
        else:
            pyogrio.write_dataframe(gdf, tmp, driver=driver, **options)
    return path
