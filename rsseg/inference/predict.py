"""Sliding-window inference: large GeoTIFF scenes to probability / mask GeoTIFFs, Tianchi images to a submission.

:func:`predict_raster` streams a scene of any size: windows of a :class:`~rsseg.tiling.grid.TileGrid` are read
in batches ahead of the model by a background thread (:mod:`rsseg.inference.streams`), predicted with test-time
augmentation (:mod:`rsseg.inference.tta`), blended without seams in a strip of rows on the model's device
(:mod:`rsseg.inference.blend`), and written behind by another thread to tiled GeoTIFFs as rows complete,
made COGs at the end.
Peak memory depends on the window size, the batch size and the scene's width, not on its height:
measured, about 13 KB per column of scene width (the strip's sums and the weight sums it no longer keeps, rows
queued and staged for writing) on top of a fixed part (model, batches in flight, 64 MB of GDAL cache).

**Raster outputs** are single-band Cloud Optimized GeoTIFFs (:mod:`rsseg.inference.outputs`: 512 x 512
internal tiles, overviews; masks DEFLATE, probabilities ZSTD) with the source's CRS and transform, tagged
``rsseg:checkpoint_sha256``, ``rsseg:checkpoint`` (its file name, for a checkpoint given by path; an ensemble's
``rsseg:members`` lists each member's ``<folder>/<file>`` and SHA-256 as JSON),
``rsseg:threshold``, ``rsseg:tta``, ``rsseg:precision``, ``rsseg:source`` (the scene's file name),
``rsseg:source_sha256``, ``rsseg:output``, ``rsseg:tile`` (the window size), ``rsseg:overlap`` (GDAL metadata
domain ``rsseg``: read them with :func:`read_tags`; no absolute local paths), written atomically:

* mask (``output_kind="mask"`` or ``"both"``, at ``dst``): uint8, 1 building (probability > threshold),
  0 background, 255 (the declared nodata) where the source is nodata, with a colour table (buildings red);
* probabilities (``output_kind="prob"``: at ``dst``; ``"both"``: at :func:`prob_path` of ``dst``):
  ``prob_dtype="uint8"``: ``round(255 * p)`` with source nodata marked by an internal mask band
  (0 = nodata; read it with ``dataset_mask()`` or ``read(masked=True)``); ``"float32"``: ``p`` in
  0-1 with NaN (the declared nodata) where the source is nodata.

Source nodata is GDAL's dataset mask (nodata value, mask band or alpha band). Every window goes through the
model; predictions are blended with :func:`rsseg.inference.blend.window_weights`.

:func:`predict_images` predicts a folder of 512x512 Tianchi JPG images and writes a validated competition
submission; :func:`predict_path` chooses between the two (the ``rsseg predict`` command). All three take
:class:`~rsseg.inference.options.PredictOptions`, as a model or as keywords (``tile=`` and ``output=`` are
accepted for ``window=`` and ``output_kind=``). They leave the process as they found it: torch's threads,
the allocator and the GDAL cache are the entry point's (:mod:`rsseg.pipeline.process`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from PIL import Image
from rasterio.enums import ColorInterp
from torch import nn
from tqdm import tqdm

from rsseg.errors import CheckpointError, ConfigError, DatasetError, RasterError, SubmissionError
from rsseg.fileio import atomic_path, display_name, file_sha256, is_remote, raster_env
from rsseg.inference.batching import batch_plan, reader_threads
from rsseg.inference.blend import StripAccumulator
from rsseg.inference.loading import LoadedModel, ModelLike, load_model
from rsseg.inference.options import PredictOptions
from rsseg.inference.outputs import output_profiles, staging_path, write_cog
from rsseg.inference.resample import model_grid, stream_resampled
from rsseg.inference.sources import recorded_bands, select_bands
from rsseg.inference.streams import TAG_NS, Prefetch, RowWriter, read_batches, source_has_mask
from rsseg.inference.tta import Predictor, on_device, on_device_iter, resolve_device, tta_views
from rsseg.inference.tuned import inference_precision, setting
from rsseg.options import resolve
from rsseg.tianchi.rle import TIANCHI_SHAPE, encode
from rsseg.tiling.grid import TileGrid

__all__ = ["predict_images", "predict_path", "predict_raster", "prob_path", "read_tags"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def read_tags(path: PathLike) -> dict[str, str]:
    """The ``rsseg:*`` tags of a predicted raster, e.g. ``{"rsseg:threshold": "0.5", ...}``.

    They live in the GDAL metadata domain ``rsseg`` (``gdalinfo`` lists them under "Metadata (rsseg)";
    rasterio: ``src.tags(ns="rsseg")``), since GDAL reads a ``:`` in a default-domain key as a separator.
    """
    with rasterio.open(path) as src:
        return {f"{TAG_NS}:{key}": value for key, value in src.tags(ns=TAG_NS).items()}


def prob_path(dst: PathLike) -> Path:
    """Where ``output="both"`` writes probabilities: ``mask.tif`` -> ``mask.prob.tif``."""
    dst = Path(dst)
    return dst.with_name(f"{dst.stem}.prob{dst.suffix or '.tif'}")


def _source_info(src_path: str | Path, in_channels: int | None, opts: PredictOptions, meta: dict[str, Any]
                 ) -> dict[str, Any]:
    """The scene's grid, CRS, nodata and the bands the model reads (:func:`~rsseg.inference.sources.select_bands`)."""
    if not is_remote(src_path) and not Path(src_path).is_file():
        raise FileNotFoundError(f"input raster {src_path} not found (expected a GeoTIFF or a folder of JPG images)")
    try:
        src_cm = rasterio.open(src_path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"{src_path}: not a raster GDAL can read ({' '.join(str(exc).split())})") from exc
    with src_cm as src:
        alpha = [i for i, c in enumerate(src.colorinterp, start=1) if c == ColorInterp.alpha]
        bands = select_bands(src_path, src.descriptions, opts.bands, recorded_bands(meta), in_channels, alpha)
        return dict(width=src.width, height=src.height, crs=src.crs, transform=src.transform,
                    masked=source_has_mask(src), bands=bands)


def _output_paths(src: str | Path, dst: Path, opts: PredictOptions) -> dict[str, Path]:
    """``{"mask" | "prob": path}`` of the outputs of ``opts.output_kind``, checked against the input and overwrite."""
    kind = opts.output_kind
    paths = {"mask": dst} if kind == "mask" else {"prob": dst} if kind == "prob" else \
        {"mask": dst, "prob": prob_path(dst)}
    for path in paths.values():
        if not is_remote(src) and path.resolve() == Path(src).resolve():
            raise ConfigError(f"output {path} is the input raster; choose another output path")
        if path.exists() and not opts.overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return paths


def _grid(src: str | Path, info: dict[str, Any], opts: PredictOptions) -> TileGrid:
    try:
        return TileGrid(info["width"], info["height"], opts.window, opts.overlap)
    except ValueError as exc:
        raise ConfigError(f"{src}: {exc} (choose an overlap below the window size)") from exc


def predict_raster(checkpoint_or_model: ModelLike, src: PathLike, dst: PathLike,
                   options: PredictOptions | None = None, **values: Any) -> Path:
    """Predict buildings over a GeoTIFF scene of any size, streaming windows in and rows out.

    The outputs are described in the module docstring (:mod:`rsseg.inference.predict`).

    Args:
        checkpoint_or_model: a checkpoint path, a list of them or an ensemble file (an ensemble:
            :mod:`rsseg.inference.loading`), a loaded checkpoint dict or a model (raw pixels in, logits out,
            e.g. :class:`~rsseg.models.Segmenter`).
        src: the scene, a local file or a remote name kept as given (``/vsicurl/https://...``, ``s3://...``,
            ``gs://...``, ``/vsis3/...``): any GDAL raster with the model's bands: ``bands`` selects them, else the
            checkpoint's recorded bands, see :mod:`rsseg.inference.sources`).
        dst: the output GeoTIFF.
        options: :class:`~rsseg.inference.options.PredictOptions` (``min_pixels`` does not apply). A
            threshold of None takes the checkpoint's ``meta["threshold"]`` if it has one, else 0.5.
        **values: override fields of ``options`` by name, e.g. ``window=256, tta="flip"``.

    Returns:
        ``dst``.

    Raises:
        CheckpointError: a missing or foreign checkpoint. RasterError: an unreadable source, or one that lacks
        the model's bands. ConfigError: a bad option. FileExistsError: an existing output.
    """
    opts = resolve(PredictOptions, options, values)
    src, dst = src if is_remote(src) else Path(src), Path(dst)
    paths = _output_paths(src, dst, opts)
    dev = resolve_device(opts.device)
    loaded = load_model(checkpoint_or_model, dev)
    model, in_channels, meta = loaded.model, loaded.in_channels, loaded.meta
    opts = opts.model_copy(update={"precision": inference_precision(opts.precision, meta, dev)})
    threshold = setting(opts.threshold, meta, "threshold", 0.5, opts.tta, opts.precision)
    with raster_env():
        info = _source_info(src, in_channels, opts, meta)
        resampled = model_grid(src, info, meta, opts.gsd)
    grid = _grid(src, resampled or info, opts)
    windows_per_batch, predictor = _predictor(model, dev, opts)
    tags = _tags(loaded, src, threshold, opts, resampled)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = {kind: stack.enter_context(atomic_path(path, overwrite=opts.overwrite)) for kind, path in paths.items()}
        staged = {kind: staging_path(path) if opts.cog else path for kind, path in tmp.items()}
        profiles = output_profiles(info, staged, opts.prob_dtype, staging=opts.cog)
        for path in staged.values() if opts.cog else ():  # (else atomic_path removes them on failure)
            stack.callback(path.unlink, missing_ok=True)
        writer = RowWriter(src if info["masked"] else None, profiles, tags, threshold)
        stream = functools.partial(_stream, predictor, grid, src, info["bands"], batch_size=windows_per_batch,
                                   warp=resampled)
        scratch = next(iter(profiles.values()))[0]
        _predict_rows(stream, writer, dev, info, resampled, scratch.with_name(f"{scratch.stem}.model.tif"))
        for kind, (path, profile) in profiles.items() if opts.cog else ():
            write_cog(path, tmp[kind], kind, profile)
    log.info("%s: %d windows (%s TTA, %s on %s) in %.1f s -> %s", src, len(grid), opts.tta, opts.precision, dev,
             time.perf_counter() - start, ", ".join(map(str, paths.values())))
    return dst


def _predict_rows(stream: Callable[[RowWriter], None], writer: RowWriter, dev: torch.device, info: dict[str, Any],
                  resampled: dict[str, Any] | None, scratch: Path) -> None:
    """Blended rows into ``writer`` (through the model's grid and ``scratch`` when ``resampled``); closes it."""
    try:
        with on_device(dev):
            if resampled is None:
                stream(writer)
            else:
                stream_resampled(stream, info, resampled, scratch, writer)
    except BaseException:
        writer.close(ok=False)
        raise
    writer.close()


def _tags(loaded: LoadedModel, src: str | Path, threshold: float, opts: PredictOptions,
          resampled: dict[str, Any] | None) -> dict[str, str]:
    """The provenance written on the outputs: file names and hashes, the settings that made them."""
    tags = {**loaded.provenance(), "threshold": f"{threshold:g}", "tta": opts.tta,
            "precision": opts.precision, "source": display_name(src),
            "tile": str(opts.window), "overlap": str(opts.overlap), "output": opts.output_kind}
    if not is_remote(src):  # (a remote scene is not downloaded whole to hash it)
        tags["source_sha256"] = file_sha256(src)
    if resampled is not None:
        tags["read_gsd_m"] = f"{resampled['model_gsd']:g}"
    return tags


def _predictor(model: nn.Module, dev: torch.device, opts: PredictOptions) -> tuple[int, Predictor]:
    """``(windows per batch, predictor)``: an explicit batch size, else views sized by the device's memory."""
    n_views = len(tta_views(opts.tta))
    windows, views = batch_plan(opts.batch_size, n_views, dev, opts.window, opts.precision)
    log.debug("%d window(s) per batch, %d view(s) per forward pass on %s", windows, views, dev)
    return windows, Predictor(model, dev, opts.tta, opts.precision, max_views=views)


def _stream(predictor: Predictor, grid: TileGrid, src: str | Path, bands: list[int], writer: RowWriter, *,
            batch_size: int, warp: dict[str, Any] | None = None) -> None:
    """The main loop: batches in, blended rows out (of ``src`` resampled to ``warp``, if given)."""
    strip = StripAccumulator(grid, predictor.device)
    pin = predictor.device.type == "cuda"
    threads = reader_threads(predictor.device)
    reads = lambda: on_device_iter(  # noqa: E731
        predictor.device, read_batches(src, grid, batch_size, pin, threads, bands, warp))
    with (Prefetch(reads, depth=3) as batches,
          tqdm(total=len(grid), desc=f"predict {display_name(src)}", unit="window", disable=None) as bar,
          torch.inference_mode()):
        for windows, pixels in batches:
            probs = predictor(pixels)
            for window, prob in zip(windows, probs, strict=True):
                done = strip.add(window, prob)
                if done is not None:
                    writer.submit(*done)
            bar.update(len(windows))


def _image_names(image_dir: Path, sample: Path | None) -> list[str]:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found")
    found = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not found:
        raise DatasetError(f"{image_dir}: no JPG files (*.jpg) to predict")
    if sample is None:
        return found
    from rsseg.tianchi.files import read_masks_csv

    names = list(read_masks_csv(sample))
    missing = sorted(set(names) - set(found))
    if missing:
        raise DatasetError(f"{image_dir}: {len(missing)} image(s) of {Path(sample).name} missing, e.g. {missing[:3]}")
    extra = sorted(set(found) - set(names))
    if extra:
        log.warning("%s: %d JPG(s) not in %s are left out, e.g. %s", image_dir, len(extra), sample, extra[:3])
    return names


def _read_jpg_batches(image_dir: Path, names: list[str], batch_size: int, pin: bool) -> Iterator[
        tuple[list[str], torch.Tensor]]:
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        pixels = np.empty((len(chunk), 3, *TIANCHI_SHAPE), dtype=np.uint8)
        for i, name in enumerate(chunk):
            with Image.open(image_dir / name) as img:
                if img.size != TIANCHI_SHAPE[::-1]:
                    raise DatasetError(f"{image_dir / name}: {img.size[0]}x{img.size[1]} pixels; expected "
                                       f"{TIANCHI_SHAPE[1]}x{TIANCHI_SHAPE[0]} Tianchi images")
                pixels[i] = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        batch = torch.from_numpy(pixels)
        yield chunk, batch.pin_memory() if pin else batch


def _tianchi_rles(predictor: Predictor, image_dir: Path, names: list[str], batch_size: int, threshold: float,
                  min_pixels: int) -> dict[str, str]:
    """RLE of each image's mask: ``probability > threshold``, emptied below ``min_pixels`` building pixels."""
    rles: dict[str, str] = {}
    pin = predictor.device.type == "cuda"
    reads = lambda: on_device_iter(predictor.device, _read_jpg_batches(image_dir, names, batch_size, pin))  # noqa: E731
    with (Prefetch(reads, depth=3) as batches,
          tqdm(total=len(names), desc=f"predict {image_dir.name}", unit="image", disable=None) as bar):
        for chunk, pixels in batches:
            masks = (predictor(pixels) > threshold).cpu().numpy()
            masks[masks.reshape(len(masks), -1).sum(axis=1) < min_pixels] = False
            rles.update((name, encode(mask)) for name, mask in zip(chunk, masks, strict=True))
            bar.update(len(chunk))
    return rles


def _write_checked_submission(rles: dict[str, str], names: list[str], output_csv: Path, sample: Path | None,
                              overwrite: bool) -> None:
    """Write the submission, validate it against ``sample`` (else ``names`` in order), then give it its name."""
    from rsseg.tianchi.files import validate_submission, write_submission

    with atomic_path(output_csv, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        reference = sample
        if reference is None:  # every JPG, in name order, is the sample
            reference = Path(scratch) / "sample.csv"
            reference.write_text("".join(f"{name}\t\n" for name in names))
        write_submission(rles, tmp, reference)
        problems = validate_submission(tmp, reference)
        if problems:
            raise SubmissionError(f"{output_csv}: {len(problems)} problem(s), first: {problems[0]}")


def predict_images(checkpoint_or_model: ModelLike, image_dir: PathLike, output_csv: PathLike,
                   sample: PathLike | None = None, options: PredictOptions | None = None, **values: Any) -> Path:
    """Predict every 512x512 JPG image of ``image_dir`` and write a validated Tianchi submission.

    Rows follow the ``sample`` submission's order (its images must all be in the folder; JPGs it does not
    list are left out with a warning); without a sample, every JPG in name order. Masks are ``probability >
    threshold`` after TTA, emptied below ``min_pixels`` building pixels (an image without buildings scores 0
    for a single false pixel), RLE-encoded (:func:`rsseg.tianchi.rle.encode`), written and validated
    (:mod:`rsseg.tianchi.files`) before the file takes its final name.

    Args:
        checkpoint_or_model: as for :func:`predict_raster` (3 input bands).
        image_dir: the folder of JPG images (e.g. ``test_a/``).
        output_csv: the submission to write.
        sample: the sample submission (e.g. ``test_a_samplesubmit.csv``).
        options: :class:`~rsseg.inference.options.PredictOptions` (the raster fields do not apply). None
            thresholds take the checkpoint's ``meta["threshold"]`` and ``meta["min_pixels"]`` (chosen on
            validation), else 0.5 and 0.
        **values: override fields of ``options`` by name.

    Returns:
        ``output_csv``.

    Raises:
        DatasetError: no JPGs, a JPG that is not 512x512, sample images missing from the folder.
        SubmissionError: the written submission fails validation. CheckpointError, ConfigError,
        FileExistsError: as for :func:`predict_raster`.
    """
    opts = resolve(PredictOptions, options, values)
    image_dir, output_csv = Path(image_dir), Path(output_csv)
    sample = Path(sample) if sample is not None else None
    if output_csv.exists() and not opts.overwrite:
        raise FileExistsError(f"{output_csv} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    names = _image_names(image_dir, sample)
    dev = resolve_device(opts.device)
    loaded = load_model(checkpoint_or_model, dev)
    model, in_channels, meta = loaded.model, loaded.in_channels, loaded.meta
    if in_channels not in (None, 3):
        raise CheckpointError(f"the model takes {in_channels} band(s); Tianchi JPG images have 3 (RGB)")
    opts = opts.model_copy(update={"precision": inference_precision(opts.precision, meta, dev)})
    threshold = setting(opts.threshold, meta, "threshold", 0.5, opts.tta, opts.precision)
    min_pixels = int(setting(opts.min_pixels, meta, "min_pixels", 0, opts.tta, opts.precision))
    windows_per_batch, predictor = _predictor(model, dev, opts.model_copy(update={"window": TIANCHI_SHAPE[0]}))
    with on_device(dev):
        rles = _tianchi_rles(predictor, image_dir, names, windows_per_batch, threshold, min_pixels)
    _write_checked_submission(rles, names, output_csv, sample, opts.overwrite)
    log.info("%s: %d images (%s TTA, threshold %g, min_pixels %d) -> %s", image_dir, len(names), opts.tta,
             threshold, min_pixels, output_csv)
    return output_csv


def predict_path(checkpoint: ModelLike, input_path: PathLike, output: PathLike, options: PredictOptions | None = None,
                 *, sample: PathLike | None = None, **values: Any) -> Path:
    """``rsseg predict``: a raster -> :func:`predict_raster`; a folder -> a submission or a mask per image.

    A folder becomes a Tianchi submission (:func:`predict_images`) when ``output`` is a ``.csv`` or ``sample``
    is given; a folder of georeferenced GeoTIFFs only, scenes in the folder ``output``
    (:func:`rsseg.inference.scenes.predict_rasters`); else one mask per image in the folder ``output``
    (:func:`rsseg.inference.images.predict_folder`). A remote name is a raster.

    ``window``, ``overlap``, ``output_kind`` and ``prob_dtype`` apply to rasters, ``sample`` and
    ``min_pixels`` to submissions.
    """
    opts = resolve(PredictOptions, options, values)
    if is_remote(input_path):  # kept as given: Path() would turn s3://b/k into s3:/b/k
        return predict_raster(checkpoint, input_path, output, opts)
    input_path = Path(input_path)
    if input_path.is_dir():
        if sample is not None or Path(output).suffix.lower() == ".csv":
            return predict_images(checkpoint, input_path, output, sample=sample, options=opts)
        from rsseg.inference.images import predict_folder
        from rsseg.inference.scenes import is_scene_folder, predict_rasters

        if is_scene_folder(input_path):
            return predict_rasters(checkpoint, [input_path], output, opts)
        return predict_folder(checkpoint, input_path, output, opts)
    if not input_path.exists():
        raise FileNotFoundError(f"input {input_path} not found (expected a raster or a folder of images)")
    return predict_raster(checkpoint, input_path, output, opts)
