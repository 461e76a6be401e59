"""Generated data for the demo, the tests and the benchmarks, deterministic by seed.

:func:`make_scene` writes a large georeferenced RGB GeoTIFF and its true footprints, rendered window by
window; :func:`make_tianchi` writes a dataset in the Tianchi layout (512x512 JPGs and RLE masks). Options:
:mod:`rsseg.synth.options`; placement: :mod:`rsseg.synth.layout`; pixels: :mod:`rsseg.synth.render`.
"""

from __future__ import annotations

import logging
import os
import string
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
from affine import Affine
from PIL import Image
from pyproj import CRS, Transformer
from rasterio.windows import Window, subdivide
from tqdm.auto import tqdm

from rsseg.errors import ConfigError, OutputExistsError
from rsseg.fileio import atomic_dir, atomic_path, raster_env
from rsseg.options import resolve
from rsseg.parallel import map_blocks
from rsseg.synth.layout import Layout, Style, place, random_style, value_noise_at
from rsseg.synth.options import COMPRESSION, GTIFF_TILE, SceneOptions, TianchiOptions, parse_crs
from rsseg.synth.render import Renderer
from rsseg.tianchi import files as tianchi
from rsseg.tianchi import rle

__all__ = ["footprints_path", "make_scene", "make_tianchi"]

log = logging.getLogger(__name__)

#: Where scenes are placed when the CRS covers it: Wuhan, Hubei (lon, lat).
ANCHOR_LONLAT = (114.30, 30.59)
#: Metres per degree of latitude, used to express the pixel size in degrees for geographic CRSs.
METRES_PER_DEGREE = 111_320.0
#: Tianchi images: size in pixels, fraction without any building, JPEG quality, name alphabet and length.
TIANCHI_SIZE, TIANCHI_EMPTY, TIANCHI_QUALITY = 512, 0.10, 90
_BLOCK = 20  # images per block (one rendering task)
NAME_ALPHABET, NAME_LENGTH = np.array(list(string.digits + string.ascii_uppercase)), 10


def footprints_path(scene: str | os.PathLike[str]) -> Path:
    """The footprints file written beside a scene: ``OUT.tif`` -> ``OUT.buildings.geojson``."""
    scene = Path(scene)
    return scene.with_name(f"{scene.stem}.buildings.geojson")


def scene_transform(crs: str | int, size: int, gsd: float) -> tuple[CRS, Affine]:
    """The CRS and north-up transform of a ``size`` x ``size`` scene with ``gsd`` metre pixels.

    The scene is centred on :data:`ANCHOR_LONLAT` when the CRS's area of use covers it, otherwise on the
    centre of that area. In a geographic CRS the pixel size is ``gsd / 111320`` degrees; in a projected
    CRS it is ``gsd`` metres converted to the CRS's axis unit.
    """
    crs_obj = parse_crs(crs)
    lon, lat = ANCHOR_LONLAT
    area = crs_obj.area_of_use
    if area is not None and not (area.west <= lon <= area.east and area.south <= lat <= area.north):
        lon, lat = (area.west + area.east) / 2, float(np.clip((area.south + area.north) / 2, -60, 60))
    if crs_obj.is_geographic:
        step, (x, y) = gsd / METRES_PER_DEGREE, (lon, lat)
    elif crs_obj.is_projected:
        step = gsd / crs_obj.axis_info[0].unit_conversion_factor
        x, y = Transformer.from_crs("EPSG:4326", crs_obj, always_xy=True).transform(lon, lat)
    else:
        raise ConfigError(f"crs={crs!r}: neither geographic nor projected; use e.g. 'EPSG:32650'")
    snap = 10.0 ** np.floor(np.log10(step * GTIFF_TILE))  # a round number: 100 m, 0.001 degree, ...
    x0 = round(float(np.floor((x - size * step / 2) / snap) * snap), 9)
    y0 = round(float(np.ceil((y + size * step / 2) / snap) * snap), 9)
    return crs_obj, Affine(step, 0.0, x0, 0.0, -step, y0)


def _collar(size: int, seed: int) -> shapely.Polygon:
    """An irregular valid-data area: the scene inset by a slanted, wavy nodata collar on every side."""
    rng = np.random.default_rng([seed, 17])
    t = np.linspace(0, size, max(8, size // 16) + 1)
    width = max(size * 0.06, 2.0)
    slant = rng.uniform(-0.5, 0.5, 4)
    inset = [
        width * (0.6 + slant[k] * t / size + 0.5 * value_noise_at(t, np.full_like(t, k), size / 6, seed + k))
        for k in range(4)
    ]
    s = float(size)
    sides = [  # each side's wavy edge closed into a simple polygon on the scene's side of it
        np.concatenate([np.column_stack([t, inset[0]]), [(s, s), (0, s)]]),
        np.concatenate([np.column_stack([s - inset[1], t]), [(0, s), (0, 0)]]),
        np.concatenate([np.column_stack([t, s - inset[2]]), [(s, 0), (0, 0)]]),
        np.concatenate([np.column_stack([inset[3], t]), [(s, s), (s, 0)]]),
    ]
    return shapely.intersection_all(shapely.polygons(np.stack(sides)))


def _footprints_frame(layout, transform: Affine, crs: CRS, gsd: float) -> gpd.GeoDataFrame:
    """Footprints in the scene CRS with ``id``, ``kind``, ``area_m2`` and ``height_m``."""
    a, _, c, _, e, f = transform[:6]
    geoms = shapely.transform(layout.buildings, lambda xy: xy * np.array([a, e]) + np.array([c, f]))
    return gpd.GeoDataFrame(
        {
            "id": np.arange(len(geoms), dtype=np.int64),
            "kind": layout.kind.astype(str),
            "area_m2": np.round(shapely.area(layout.buildings) * gsd * gsd, 2),
            "height_m": np.round(layout.height_m, 1),
        },
        geometry=gpd.GeoSeries(geoms, crs=crs),
    )


def make_scene(
    path: str | os.PathLike[str], options: SceneOptions | None = None, *, progress: bool | None = None, **values: Any
) -> gpd.GeoDataFrame:
    """Write a generated RGB scene GeoTIFF and its footprints; return the footprints in the scene CRS.

    The GeoTIFF is uint8 RGB, tiled in 512x512 internal tiles, compressed (DEFLATE by default) with predictor
    2, north-up with ``gsd`` metre pixels. Beside it, ``OUT.buildings.geojson`` (RFC 7946, EPSG:4326) holds
    the true footprints with attributes ``id``, ``kind`` (``rect`` or ``L``), ``area_m2`` and ``height_m``.
    Both are written atomically. Memory stays bounded: features are vectors; pixels are rendered and
    written one ``window`` x ``window`` window at a time.

    Args:
        path: the GeoTIFF to write (replaced if it exists).
        options: a :class:`~rsseg.synth.options.SceneOptions` (``size``, ``crs``, ``seed``, ``gsd``,
            ``nodata_border``, ``window``, ``compress``); None for the defaults.
        progress: show a progress bar (None: only on a terminal).
        **values: fields of the options to override, e.g. ``make_scene(path, size=1024, seed=3)``.

    Raises:
        ConfigError: for a non-positive size or gsd, an unknown CRS, a bad window size or compression.
    """
    opts = resolve(SceneOptions, options, values)
    crs_obj, transform = scene_transform(opts.crs, opts.size, opts.gsd)
    layout, style = _scene_layout(opts)
    renderer = Renderer(layout, style)
    size = opts.size
    windows = subdivide(Window(0, 0, size, size), opts.window, opts.window)
    path = Path(path)
    with raster_env(), atomic_path(path) as tmp, atomic_path(footprints_path(path)) as tmp_vec:
        with rasterio.open(tmp, "w", **_scene_profile(opts, crs_obj, transform)) as dst:
            quiet = None if progress is None else not progress  # None: tqdm shows it on a terminal only
            for window in tqdm(windows, desc=f"synth {path.name}", unit="window", disable=quiet):
                rendered = renderer.render(window.row_off, window.col_off, window.height, window.width)
                dst.write(rendered.rgb, window=window)
        footprints = _footprints_frame(layout, transform, crs_obj, opts.gsd)
        pyogrio.write_dataframe(footprints.to_crs("EPSG:4326"), tmp_vec, layer=path.stem, driver="GeoJSON",
                                layer_options={"RFC7946": "YES"})
    log.info("wrote %s (%d x %d px, %d buildings)", path, size, size, len(footprints))
    return footprints


def _scene_layout(opts: SceneOptions) -> tuple[Layout, Style]:
    """The scene's style and its roads and buildings (inside the nodata collar when there is one)."""
    rng = np.random.default_rng(opts.seed)
    style: Style = random_style(rng, urban_scale_px=600 / opts.gsd, roads=True)
    valid = _collar(opts.size, opts.seed) if opts.nodata_border else None
    keep_within = shapely.box(0, 0, opts.size, opts.size) if valid is None else valid
    layout = place(style, (0, 0, opts.size, opts.size), opts.gsd, rng, keep_within=keep_within, valid=valid)
    return layout, style


def _scene_profile(opts: SceneOptions, crs: CRS, transform: Affine) -> dict[str, Any]:
    """The GeoTIFF creation profile of a scene: tiled RGB, compressed, nodata 0 with a collar."""
    return {
        "driver": "GTiff", "width": opts.size, "height": opts.size, "count": 3, "dtype": "uint8",
        "crs": rasterio.crs.CRS.from_wkt(crs.to_wkt()), "transform": transform, "tiled": True,
        "blockxsize": GTIFF_TILE, "blockysize": GTIFF_TILE, "photometric": "RGB", "interleave": "pixel",
        "bigtiff": "IF_SAFER", "nodata": 0 if opts.nodata_border else None, **COMPRESSION[opts.compress],
    }


def render_image(seed: int | np.random.SeedSequence, *, empty: bool = False, size: int = TIANCHI_SIZE):
    """One Tianchi-style image: a ``size`` x ``size`` patch of a small scene with a look of its own.

    Ground, colours, densities, sun and pixel size (0.27-0.36 m) vary per image. Buildings may be cut by
    the image edge but show at least half their area (and 40 m2). ``empty`` draws no building.

    Returns:
        (rgb, mask): ``(size, size, 3)`` uint8 and ``(size, size)`` uint8 (1 = building).
    """
    rng = np.random.default_rng(seed)
    style = random_style(rng, empty=empty)
    gsd = float(rng.uniform(0.27, 0.36))
    pad = 30 / gsd
    layout = place(style, (-pad, -pad, size + pad, size + pad), gsd, rng, min_visible=shapely.box(0, 0, size, size))
    out = Renderer(layout, style).render(0, 0, size, size)
    return out.rgb.transpose(1, 2, 0), out.buildings.astype(np.uint8)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` unique random image names: 10 characters of [0-9A-Z] and ``.jpg``."""
    names: set[str] = set()
    while len(names) < n:
        names.update("".join(c) + ".jpg" for c in rng.choice(NAME_ALPHABET, (n - len(names), NAME_LENGTH)))
    return sorted(names)


def _render_block(block: tuple[Path, list[str], list[np.random.SeedSequence], list[bool]]) -> list[str]:
    """Render a block ``(folder, names, seeds, empty)`` of images as JPG files; returns their masks as RLE strings."""
    folder, names, seqs, empty = block
    codes = []
    for name, seq, is_empty in zip(names, seqs, empty, strict=True):
        rgb, mask = render_image(seq, empty=is_empty)
        Image.fromarray(rgb).save(folder / name, quality=TIANCHI_QUALITY)
        codes.append(rle.encode(mask))
    return codes


def make_tianchi(
    out_dir: str | os.PathLike[str], options: TianchiOptions | None = None, *,
    progress: bool | None = None, executor: Executor | None = None, **values: Any,
) -> dict[str, object]:
    """Write a generated dataset in the Tianchi building-segmentation layout, atomically.

    ``OUT_DIR/train/*.jpg`` and ``OUT_DIR/test_a/*.jpg`` (512x512 RGB, JPEG quality 90, names of 10
    characters of [0-9A-Z]), ``train_mask.csv`` and ``test_a_mask.csv`` (the truth) with ``name<TAB>rle``
    rows (column-major, 1-based runs; empty for no building), and ``test_a_samplesubmit.csv`` listing
    the test images with empty masks. Rows follow the sorted file names. About 10% of the images of each
    split have no building.

    Args:
        out_dir: the folder to create; it must not exist, or be empty.
        options: a :class:`~rsseg.synth.options.TianchiOptions` (``n_train``, ``n_test``, ``seed``); None
            for the defaults.
        progress: False: no progress bar; otherwise one of the blocks, shown on a terminal.
        executor: render blocks of images on it (e.g. a Dask client's ``get_executor()`` or a process
            pool; its workers must see ``out_dir``); default: one after the other in this process. Every
            image has its own seed, so the files are the same either way.
        **values: fields of the options to override, e.g. ``make_tianchi(out, n_train=20, seed=3)``.

    Returns:
        The paths written (``root``, ``train_dir``, ``test_dir``, ``train_mask``, ``test_mask``,
        ``sample_submission``) and counts (``n_train``, ``n_test``, ``n_train_empty``, ``n_test_empty``).

    Raises:
        OutputExistsError: ``out_dir`` exists and is not an empty folder.
        ConfigError: negative counts.
    """
    opts = resolve(TianchiOptions, options, values)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"{out_dir} exists and is not empty; remove it or choose another output folder")
    name_seq, *image_seqs = np.random.SeedSequence(opts.seed).spawn(1 + opts.n_train + opts.n_test)
    rng = np.random.default_rng(name_seq)
    names = _names(rng, opts.n_train + opts.n_test)
    splits = {"train": (names[: opts.n_train], image_seqs[: opts.n_train]),
              "test_a": (names[opts.n_train :], image_seqs[opts.n_train :])}
    info: dict[str, object] = {"root": out_dir}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        blocks = [b for split in splits for b in _image_blocks(tmp / split, *splits[split], rng)]
        desc = None if progress is False else f"synth {out_dir.name}"
        codes = [code for _, block in sorted(map_blocks(_render_block, blocks, executor, desc=desc)) for code in block]
        for split, (split_names, _) in splits.items():
            split_codes, codes = codes[: len(split_names)], codes[len(split_names) :]
            key, truth = ("train", "train_mask.csv") if split == "train" else ("test", "test_a_mask.csv")
            tianchi.write_mask_csv(zip(split_names, split_codes, strict=True), tmp / truth)
            info |= {f"{key}_dir": out_dir / split, f"{key}_mask": out_dir / truth, f"n_{key}": len(split_codes),
                     f"n_{key}_empty": sum(not code for code in split_codes)}
        tianchi.write_mask_csv(((name, "") for name in splits["test_a"][0]), tmp / "test_a_samplesubmit.csv")
        info["sample_submission"] = out_dir / "test_a_samplesubmit.csv"
    log.info("wrote %s (%d train, %d test images)", out_dir, opts.n_train, opts.n_test)
    return info


def _image_blocks(folder: Path, names: list[str], seqs: list[np.random.SeedSequence],
                  rng: np.random.Generator) -> list[tuple[Any, ...]]:
    """Create ``folder`` and split its images into blocks of :func:`_render_block` arguments.

    About :data:`TIANCHI_EMPTY` of the images, drawn with ``rng``, get no building.
    """
    folder.mkdir()
    empty = set(rng.choice(len(names), int(round(TIANCHI_EMPTY * len(names))), replace=False).tolist())
    flags = [i in empty for i in range(len(names))]
    return [(folder, names[i : i + _BLOCK], seqs[i : i + _BLOCK], flags[i : i + _BLOCK])
            for i in range(0, len(names), _BLOCK)]
