"""Label rasters as class maps: which pixels are buildings, which are background, which are ignored.

A label raster on the scene's grid becomes label chips of 0 (background), 1 (building) and 255 (ignore):

- one band (0/1, 0/255, any class map): building where the value is > 0, background where it is 0 or less;
- several bands (a 3-band 0/255 mask saved as RGB; an alpha band is left out): building where any band
  is > 127;
- ignore where every band equals the ignore value: ``label_ignore`` when given, else the raster's nodata
  value, unless that equals the background value 0. GDAL-rasterised building masks (SpaceNet's among them)
  often carry ``nodata=0``; taking it literally would make every background pixel "ignore" and leave a
  model no background to learn, so such a nodata value is not used, with one warning line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from rsseg.errors import RasterError

__all__ = ["BACKGROUND", "IGNORE", "LabelRaster", "open_label_raster"]

log = logging.getLogger(__name__)

#: Label chip values.
BACKGROUND, BUILDING, IGNORE = 0, 1, 255


@dataclass(frozen=True, slots=True)
class LabelRaster:
    """A label raster checked against its scene: where it is and how its values become classes.

    Attributes:
        path: what rasterio opens (a local path or a remote name such as ``/vsicurl/https://...``).
        bands: 1-based bands that carry the classes (an alpha band left out).
        ignore: the value that marks ignore (NaN allowed), or None.
    """

    path: str
    bands: tuple[int, ...]
    ignore: float | None

    @property
    def rule(self) -> str:
        """The building rule, in words (written to ``index.json``)."""
        return "band 1 > 0" if len(self.bands) == 1 else f"any of bands {list(self.bands)} > 127"

    def classes(self, raw: np.ndarray) -> np.ndarray:
        """Label values (uint8: 0, 1 or 255) of ``raw`` pixels (bands, rows, cols) of the label raster."""
        building = raw[0] > 0 if raw.shape[0] == 1 else (raw > 127).any(axis=0)
        labels = building.astype(np.uint8)
        if self.ignore is not None:
            hit = np.isnan(raw) if math.isnan(self.ignore) else raw == self.ignore
            labels[hit.all(axis=0)] = IGNORE
        return labels

    def read(self, window: Window) -> np.ndarray:
        """Labels of ``window`` (rows, cols); pixels beyond the raster's edge are ignore (255)."""
        with rasterio.open(self.path) as src:
            inside = window.intersection(Window(0, 0, src.width, src.height))
            raw = src.read(list(self.bands), window=inside)
        labels = np.full((window.height, window.width), IGNORE, np.uint8)
        labels[inside.row_off - window.row_off :, inside.col_off - window.col_off :][
            : inside.height, : inside.width] = self.classes(raw)
        return labels


def _ignore_value(name: str, nodata: float | None, label_ignore: float | None) -> float | None:
    if label_ignore is not None:
        return label_ignore
    if nodata is not None and nodata == BACKGROUND:
        log.warning("%s: the label raster's nodata value 0 is also its background value; 0 is read as "
                    "background, nothing as ignore (pass --label-ignore VALUE to mark another value as ignore)",
                    name)
        return None
    return nodata


def _check_grid(labels: rasterio.DatasetReader, scene: dict[str, Any]) -> None:
    """Raise :class:`RasterError` unless ``labels`` lies on the scene's pixel grid (size, transform, CRS)."""
    found = (labels.width, labels.height)
    expected = (scene["width"], scene["height"])
    if found != expected:
        raise RasterError(f"{labels.name}: label raster is {found[0]}x{found[1]} px; expected the scene's "
                          f"{expected[0]}x{expected[1]}")
    if not labels.transform.almost_equals(scene["transform"]):
        raise RasterError(f"{labels.name}: label raster transform {tuple(labels.transform)[:6]} differs from "
                          f"the scene's {tuple(scene['transform'])[:6]}")
    if labels.crs != scene["crs"]:
        raise RasterError(f"{labels.name}: label raster CRS {labels.crs} differs from the scene's {scene['crs']}")


def open_label_raster(path: str, scene: dict[str, Any], label_ignore: float | None) -> LabelRaster:
    """Check the label raster at ``path`` against ``scene`` (same size, transform and CRS).

    Args:
        path: what rasterio opens.
        scene: ``width``, ``height``, ``transform`` and ``crs`` of the scene.
        label_ignore: the value that marks ignore; None: the raster's nodata value unless it is 0.

    Raises:
        RasterError: another grid, or no band besides an alpha band.
    """
    with rasterio.open(path) as src:
        _check_grid(src, scene)
        bands = tuple(i for i, ci in enumerate(src.colorinterp, 1) if ci != ColorInterp.alpha)
        if not bands:
            raise RasterError(f"{path}: label raster has only an alpha band; expected a class map "
                              "(0 background, > 0 building)")
        nodata = src.nodata
    return LabelRaster(path, bands, _ignore_value(path, nodata, label_ignore))
