"""The generators' options, defined once.

:func:`~rsseg.synth.make_scene`, :func:`~rsseg.synth.make_tianchi`, ``rsseg synth`` and the ``synth_scene``
/ ``synth_tianchi`` pipeline stages all take these models.

Each check raises :class:`~rsseg.errors.ConfigError` naming the value and the fix; through
:func:`rsseg.options.resolve` (library calls, the CLI) and pydantic (pipeline YAML) that message is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from rsseg.errors import ConfigError
from rsseg.options import Options

if TYPE_CHECKING:
    from pyproj import CRS

__all__ = ["COMPRESSION", "GTIFF_TILE", "SceneOptions", "TianchiOptions", "parse_crs"]

#: Internal tile size (GDAL's block size) of the written GeoTIFFs; render windows are multiples of it.
GTIFF_TILE = 512
#: GeoTIFF compression presets (benchmarks/bench_synth.py compares them; data_cards/synthetic.md).
COMPRESSION = {
    "deflate": {"compress": "deflate", "predictor": 2, "zlevel": 6},
    "zstd": {"compress": "zstd", "predictor": 2, "zstd_level": 9},
    "lzw": {"compress": "lzw", "predictor": 2},
}


def parse_crs(crs: str | int) -> CRS:
    """``crs`` as a pyproj CRS, or :class:`ConfigError` with the cause chained."""
    from pyproj import CRS  # here: the ``rsseg`` command imports this module before it runs a command
    from pyproj.exceptions import CRSError

    try:
        return CRS.from_user_input(crs)
    except CRSError as exc:
        raise ConfigError(
            f"crs={crs!r}: unknown coordinate reference system ({exc}); use e.g. 'EPSG:32650' or 'EPSG:4326'"
        ) from exc


class SceneOptions(Options):
    """A generated georeferenced scene (:func:`rsseg.synth.make_scene`, ``rsseg synth scene``)."""

    size: int = Field(4096, description="Width and height in pixels.")
    crs: str | int = Field("EPSG:32650", description="Any CRS pyproj understands (EPSG code, WKT, ...).")
    seed: int = Field(0, description="Random seed: the same seed gives the same pixels and footprints.")
    gsd: float = Field(0.3, description="Pixel size in metres (degrees scaled for a geographic CRS).")
    nodata_border: bool = Field(False, description="Surround the scene with an irregular nodata (0) collar.")
    window: int = Field(1024, description="Render window size in pixels, a multiple of 512 (output unchanged).")
    compress: str = Field("deflate", description=f"GeoTIFF compression: {', '.join(COMPRESSION)}.")

    @field_validator("size")
    @classmethod
    def _size(cls, size: int) -> int:
        if size < 1:
            raise ConfigError(f"size={size!r}: expected a positive number of pixels, e.g. 4096")
        return size

    @field_validator("crs")
    @classmethod
    def _crs(cls, crs: str | int) -> str | int:
        parse_crs(crs)
        return crs

    @field_validator("gsd")
    @classmethod
    def _gsd(cls, gsd: float) -> float:
        if not gsd > 0:
            raise ConfigError(f"gsd={gsd!r}: expected a positive pixel size in metres, e.g. 0.3")
        return gsd

    @field_validator("window")
    @classmethod
    def _window(cls, window: int) -> int:
        if window < 1 or window % GTIFF_TILE:
            raise ConfigError(f"window={window!r}: expected a positive multiple of the {GTIFF_TILE}-pixel "
                              "GeoTIFF tile, e.g. 1024")
        return window

    @field_validator("compress")
    @classmethod
    def _compress(cls, compress: str) -> str:
        if compress not in COMPRESSION:
            raise ConfigError(f"compress={compress!r}: expected one of {sorted(COMPRESSION)}")
        return compress


class TianchiOptions(Options):
    """A generated dataset in the Tianchi layout (:func:`rsseg.synth.make_tianchi`, ``rsseg synth tianchi``)."""

    n_train: int = Field(400, description="Number of training images (at least 1).")
    n_test: int = Field(100, description="Number of test_a images (0 or more).")
    seed: int = Field(0, description="Random seed: the same seed gives the same files, byte for byte.")

    @field_validator("n_train")
    @classmethod
    def _n_train(cls, n_train: int) -> int:
        if n_train < 1:
            raise ConfigError(f"n_train={n_train!r}: expected at least 1 training image")
        return n_train

    @field_validator("n_test")
    @classmethod
    def _n_test(cls, n_test: int) -> int:
        if n_test < 0:
            raise ConfigError(f"n_test={n_test!r}: expected 0 or more test images")
        return n_test
