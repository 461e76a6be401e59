"""What ``write_chips``, ``rsseg tile`` and the pipeline's ``tile`` stage can be asked: defined once."""

from __future__ import annotations

from pydantic import Field, field_validator

from rsseg.errors import ConfigError
from rsseg.options import Options

__all__ = ["TileOptions"]


class TileOptions(Options):
    """How a scene is cut into chips (``write_chips``, ``rsseg tile`` and the pipeline's ``tile`` stage)."""

    size: int = Field(512, description="Chip width and height in pixels.")
    overlap: int = Field(64, description="Pixels shared by neighbouring chips (stride size - overlap).")
    bands: list[int] | None = Field(None, description="1-based band indexes to keep, e.g. 1,2,3 (default: all).")
    max_nodata: float = Field(0.5, description="Skip chips with a larger nodata fraction than this.")
    allow_no_crs: bool = Field(False, description="Accept a scene without a CRS (chips then have none).")
    overwrite: bool = Field(False, description="Replace OUT_DIR if it exists (once the new one is complete).")
    compress: str | None = Field(None, description="GDAL compression for the chips, e.g. deflate "
                                                   "(default: uncompressed, fastest to write and read).")
    label_ignore: float | None = Field(None, description="Value of a label raster that marks pixels to ignore "
                                                         "(255 in label chips); overrides the raster's nodata "
                                                         "value (default: its nodata value unless that is 0).")

    @field_validator("max_nodata")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            # pydantic reports a ValueError (ConfigError is one) as a validation error naming the field
            raise ConfigError(f"max_nodata={value}: expected a fraction between 0 and 1")
        return value
