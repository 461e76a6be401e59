"""Prediction at the model's resolution: windows resampled to the training GSD, outputs on the scene's grid.

A checkpoint may record the ground sampling distance its model was trained at (``meta["gsd_m"]``, metres;
older checkpoints lack it). When a scene's pixel size differs from it by more than :data:`TOLERANCE`,
:func:`model_grid` describes the scene resampled to the model's GSD (same CRS and extent); prediction reads
its windows through a :class:`rasterio.vrt.WarpedVRT` (bilinear), streams the blended probabilities to a
float32 GeoTIFF on that grid, and :func:`write_back` resamples them (bilinear) onto the scene's own grid,
rows at a time, into the usual writer: masks and probabilities keep the scene's size, transform and nodata.
``gsd="native"`` turns it off; ``gsd=0.5`` gives the model's GSD for checkpoints that lack one.

The scene's GSD is its pixel size in metres: a projected CRS's unit converted to metres, a geographic CRS's
degrees measured on the ellipsoid at the scene's centre (pyproj). A scene without a CRS is read natively.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rasterio
from affine import Affine
from rasterio.windows import Window

from rsseg.errors import ConfigError
from rsseg.fileio import raster_env
from rsseg.inference.outputs import BLOCK, COMPRESSION
from rsseg.inference.streams import RowWriter, warped
from rsseg.training.bandstats import gsd_metres

__all__ = ["TOLERANCE", "model_grid", "stream_resampled"]

log = logging.getLogger(__name__)

#: Relative GSD difference above which windows are resampled to the model's GSD.
TOLERANCE = 0.10


def _model_gsd(gsd: str, meta: dict[str, Any]) -> float | None:
    if gsd == "native":
        return None
    if gsd != "auto":
        return float(gsd)
    value = meta.get("gsd_m")
    try:
        return float(value) if value is not None and float(value) > 0 else None
    except (TypeError, ValueError):
        log.warning("checkpoint meta gsd_m=%r is not a number of metres: predicting at the scene's GSD", value)
        return None


def model_grid(src: str | Path, info: dict[str, Any], meta: dict[str, Any], gsd: str) -> dict[str, Any] | None:
    """The scene's grid resampled to the model's GSD (``width``, ``height``, ``transform``, ``crs``), or None.

    None means: predict natively (``gsd="native"``, no model GSD, no scene CRS, or GSDs within
    :data:`TOLERANCE`).
    """
    model = _model_gsd(gsd, meta)
    if model is None:
        return None
    scene = gsd_metres(info["crs"], info["transform"], info["width"], info["height"])
    if scene is None:
        log.info("%s has no CRS: its GSD is unknown, predicting at its own pixel size", src)
        return None
    if abs(scene / model - 1) <= TOLERANCE:
        return None
    width = max(1, round(info["width"] * scene / model))
    height = max(1, round(info["height"] * scene / model))
    if width * height > 4 * 65536 ** 2:
        raise ConfigError(f"{src}: resampling {scene:.3g} m pixels to the model's {model:.3g} m gives "
                          f"{width}x{height} pixels; pass gsd='native' (--gsd native) or a coarser gsd")
    transform = info["transform"] @ Affine.scale(info["width"] / width, info["height"] / height)
    log.info("%s: %.3g m pixels, the model's are %.3g m: predicting on a %dx%d resampled grid", src, scene,
             model, width, height)
    return dict(width=width, height=height, transform=transform, crs=info["crs"], scene_gsd=scene, model_gsd=model)


def stream_resampled(stream: Callable[[RowWriter], None], info: dict[str, Any], grid: dict[str, Any],
                     staged: Path, writer: RowWriter) -> None:
    """Predict on the model's ``grid``, then write the probabilities on the scene's grid ``info``.

    ``stream`` (windows of ``grid`` in, blended rows out) writes float32 probabilities to ``staged``;
    :func:`write_back` resamples them into ``writer``; ``staged`` is removed.
    """
    profile = dict(driver="GTiff", width=grid["width"], height=grid["height"], count=1, crs=grid["crs"],
                   transform=grid["transform"], dtype="float32", nodata=None, predictor=3, tiled=True,
                   blockxsize=BLOCK, blockysize=BLOCK, bigtiff="IF_SAFER", **COMPRESSION)
    try:
        first = RowWriter(None, {"prob": (staged, profile)}, {}, 0.5)
        try:
            stream(first)
        except BaseException:
            first.close(ok=False)
            raise
        first.close()
        write_back(staged, info, writer)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()


def write_back(staged: Path, info: dict[str, Any], writer: RowWriter) -> None:
    """Resample the probabilities at ``staged`` onto the scene's grid ``info``, :data:`BLOCK` rows at a time."""
    scene = dict(crs=info["crs"], transform=info["transform"], width=info["width"], height=info["height"])
    with raster_env(), rasterio.open(staged) as ds, warped(ds, scene) as vrt:
        for row0 in range(0, info["height"], BLOCK):
            rows = min(BLOCK, info["height"] - row0)
            writer.submit(row0, vrt.read(1, window=Window(0, row0, info["width"], rows)))
