"""The options of prediction, defined once: library calls, the ``rsseg predict`` command and pipeline stages.

:class:`PredictOptions` is taken by :func:`~rsseg.inference.predict.predict_raster`,
:func:`~rsseg.inference.predict.predict_images` and :func:`~rsseg.inference.predict.predict_path` (as a model
or as keywords), becomes the options of ``rsseg predict`` (:func:`rsseg.options.click_options`), and is the
base of the ``predict_scenes`` / ``predict_tianchi`` stage parameters. The TTA modes, precisions, output
kinds and probability pixel types are listed here only.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import AliasChoices, Field, field_validator

from rsseg.options import Options

__all__ = ["OUTPUT_KINDS", "PRECISIONS", "PROB_DTYPES", "OutputKind", "Precision", "PredictOptions", "ProbDtype",
           "TtaMode"]

#: Test-time augmentation: 1, 4 or 8 views (see :mod:`rsseg.inference.tta`).
TtaMode = Literal["none", "flip", "d4"]
#: Arithmetic of the forward pass (bf16/fp16: autocast; auto: the checkpoint's validation precision where the
#: device runs it natively, see :mod:`rsseg.inference.tuned`).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: What a raster prediction writes.
OutputKind = Literal["mask", "prob", "both"]
#: Pixel type of probability rasters.
ProbDtype = Literal["uint8", "float32"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)
PROB_DTYPES: tuple[str, ...] = get_args(ProbDtype)


class PredictOptions(Options):
    """How to predict: windows (rasters), TTA, batches, device, precision, thresholds, outputs."""

    window: int = Field(512, ge=1, validation_alias=AliasChoices("window", "tile"),
                        description="Window size in pixels (rasters).")
    overlap: int = Field(128, ge=0, description="Pixels shared by neighbouring windows (rasters).")
    bands: list[int] | None = Field(None, description="Scene bands the model reads, 1-based, in order, e.g. 4,3,2 "
                                                       "(default: the checkpoint's recorded bands, else all).")
    gsd: str = Field("auto", description="Resolution: auto reads windows resampled to the checkpoint's training GSD "
                                         "when the scene's differs by more than 10%; native reads the scene's "
                                         "pixels as they are; a number is the model's GSD in metres.")
    tta: TtaMode = Field("d4", description="Test-time augmentation: 1, 4 or 8 views per window, probabilities "
                                           "averaged.")
    batch_size: int | None = Field(None, ge=1, description="Windows per forward pass (times the TTA views; "
                                                            "default: views sized by the device's free memory).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Precision = Field("auto", description="Forward pass arithmetic; auto: the checkpoint's validation "
                                                     "precision where the device runs it natively (bf16: CUDA "
                                                     "compute capability >= 8.0, CPUs with AVX512-BF16/AMX; fp16: "
                                                     "CUDA), else fp32.")
    threshold: float | None = Field(None, description="Building probability threshold (default: the "
                                                      "checkpoint's validation threshold, else 0.5).")
    output_kind: OutputKind = Field("both", validation_alias=AliasChoices("output_kind", "output"),
                                    description="Raster outputs; with both, probabilities go to OUTPUT's "
                                                "sibling <stem>.prob.tif.")
    prob_dtype: ProbDtype = Field("uint8", description="Probabilities as 0-255 or 0-1.")
    min_pixels: int | None = Field(None, ge=0, description="JPG images: fewer building pixels than this -> "
                                                           "empty mask (default: the checkpoint's).")
    cog: bool = Field(True, description="Raster outputs as Cloud Optimized GeoTIFFs (overviews; a second pass "
                                        "over each output: 0.3 CPU-s for a 4096^2 mask + probabilities); "
                                        "--no-cog keeps the tiled GeoTIFFs as streamed.")
    overwrite: bool = Field(False, description="Replace OUTPUT if it exists.")

    @field_validator("bands")
    @classmethod
    def _band_indexes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"bands={value}: expected 1-based band indexes like 1,2,3")
        return value or None

    @field_validator("gsd", mode="before")
    @classmethod
    def _gsd(cls, value: object) -> object:
        """``auto``, ``native`` or a positive number of metres (kept as text: one type for click and YAML)."""
        text = str(value).strip().lower()
        if text in ("auto", "native"):
            return text
        try:
            metres = float(text)
        except ValueError:
            raise ValueError(f"gsd={value!r}: expected auto, native or a pixel size in metres like 0.3") from None
        if not metres > 0 or metres == float("inf"):
            raise ValueError(f"gsd={value!r}: expected a positive pixel size in metres")
        return f"{metres:g}"

    @field_validator("device", mode="before")
    @classmethod
    def _device_name(cls, value: object) -> object:
        """A :class:`torch.device` is taken by its name (``cuda:0``)."""
        return value if isinstance(value, str) or value is None else str(value)
