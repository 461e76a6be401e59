"""Generated data for the demo, the tests and the benchmarks, deterministic by seed.

* :func:`make_scene` writes a large georeferenced RGB GeoTIFF of an aerial-looking area (textured ground,
  roads, trees, shadows, rectangle and L-shaped buildings) and its true building footprints. Features are
  placed once as vectors; pixels are rendered block by block, so memory does not grow with the scene.
* :func:`make_tianchi` writes a dataset in the layout of the Tianchi building-segmentation competition
  (512x512 JPG tiles and run-length masks), each tile a patch of a small scene with its own look.

Layout and rendering live in :mod:`rsseg.synth.layout` and :mod:`rsseg.synth.render`.
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
from pyproj.exceptions import CRSError
from rasterio.windows import Window
from tqdm.auto import tqdm

from rsseg.errors import ConfigError
from rsseg.fileio import atomic_dir, atomic_path, raster_env
from rsseg.synth.layout import Style, place, random_style, value_noise_at
from rsseg.synth.render import Renderer
from rsseg.tianchi import files as tianchi
from rsseg.tianchi import rle

__all__ = ["footprints_path", "make_scene", "make_tianchi", "render_tile", "scene_transform"]

log = logging.getLogger(__name__)

#: Where scenes are placed when the CRS covers it: Wuhan, Hubei (lon, lat).
ANCHOR_LONLAT = (114.30, 30.59)
#: Metres per degree of latitude, used to express the pixel size in degrees for geographic CRSs.
METRES_PER_DEGREE = 111_320.0
#: Raster block (tile) size of the written GeoTIFFs.
TILE = 512
#: Tianchi tiles: size in pixels, fraction without any building, JPEG quality, name alphabet and length.
TIANCHI_SIZE, TIANCHI_EMPTY, TIANCHI_QUALITY = 512, 0.10, 90
_CHUNK = 20  # tiles per rendering task when an executor is given
NAME_ALPHABET, NAME_LENGTH = np.array(list(string.digits + string.ascii_uppercase)), 10
#: GeoTIFF compression presets (benchmarks/bench_synth.py compares them; data_cards/synthetic.md).
COMPRESSION = {
    "deflate": {"compress": "deflate", "predictor": 2, "zlevel": 6},
    "zstd": {"compress": "zstd", "predictor": 2, "zstd_level": 9},
    "lzw": {"compress": "lzw", "predictor": 2},
}


def footprints_path(scene: str | os.PathLike[str]) -> Path:
    """The footprints file written beside a scene: ``OUT.tif`` -> ``OUT.buildings.geojson``."""
    scene = Path(scene)
    return scene.with_name(f"{scene.stem}.buildings.geojson")


def _crs(crs: str | int) -> CRS:
    try:
        return CRS.from_user_input(crs)
    except CRSError as exc:
        raise ConfigError(
            f"crs={crs!r}: unknown coordinate reference system ({exc}); use e.g. 'EPSG:32650' or 'EPSG:4326'"
        ) from None


def scene_transform(crs: str | int, size: int, gsd: float) -> tuple[CRS, Affine]:
    """The CRS and north-up transform of a ``size`` x ``size`` scene with ``gsd`` metre pixels.

    The scene is centred on :data:`ANCHOR_LONLAT` when the CRS's area of use covers it, otherwise on the
    centre of that area. In a geographic CRS the pixel size is ``gsd / 111320`` degrees; in a projected
    CRS it is ``gsd`` metres converted to the CRS's axis unit.
    """
    crs_obj = _crs(crs)
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
    snap = 10.0 ** np.floor(np.log10(step * TILE))  # a round number: 100 m, 0.001 degree, ...
    x0 = round(float(np.floor((x - size * step / 2) / snap) * snap), 9)
    y0 = round(float(np.ceil((y + size * step / 2) / snap) * snap), 9)
    return crs_obj, Affine(step, 0.0, x0, 0.0, -step, y0)


def _check(size: int, gsd: float, block: int, compress: str) -> None:
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"size={size!r}: expected a positive number of pixels, e.g. 4096")
    if not gsd > 0:
        raise ConfigError(f"gsd={gsd!r}: expected a positive pixel size in metres, e.g. 0.3")
    if block < 1 or block % TILE:
        raise ConfigError(f"block={block!r}: expected a positive multiple of the {TILE}-pixel tile size")
    if compress not in COMPRESSION:
        raise ConfigError(f"compress={compress!r}: expected one of {sorted(COMPRESSION)}")


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
    path: str | os.PathLike[str],
    size: int = 4096,
    crs: str | int = "EPSG:32650",
    seed: int = 0,
    gsd: float = 0.3,
    nodata_border: bool = False,
    *,
    block: int = 1024,
    compress: str = "deflate",
    progress: bool | None = None,
) -> gpd.GeoDataFrame:
    """Write a generated RGB scene GeoTIFF and its footprints; return the footprints in the scene CRS.

    The GeoTIFF is uint8 RGB, tiled in 512x512 blocks, compressed (DEFLATE by default) with predictor 2,
    north-up with ``gsd`` metre pixels. Beside it, ``OUT.buildings.geojson`` (RFC 7946, EPSG:4326) holds
    the true footprints with attributes ``id``, ``kind`` (``rect`` or ``L``), ``area_m2`` and ``height_m``.
    Both are written atomically. Memory stays bounded: features are vectors; pixels are rendered and
    written one ``block`` x ``block`` window at a time.

    Args:
        path: the GeoTIFF to write (replaced if it exists).
        size: width and height in pixels.
        crs: any CRS pyproj understands (EPSG code, WKT, ...).
        seed: the random seed; the same seed gives the same pixels and footprints.
        gsd: ground sampling distance in metres per pixel.
        nodata_border: surround the scene with an irregular nodata collar (0 in all bands, declared as
            the dataset's nodata), like the edge of an orthophoto; buildings lie inside the valid area.
        block: render window size in pixels, a multiple of 512; the output does not depend on it.
        compress: GeoTIFF compression, a key of :data:`COMPRESSION` (all with the horizontal predictor).
        progress: show a progress bar (None: only on a terminal).

    Raises:
        ConfigError: for a non-positive size or gsd, an unknown CRS, a bad block size or compression.
    """
    _check(size, gsd, block, compress)
    crs_obj, transform = scene_transform(crs, size, gsd)
    rng = np.random.default_rng(seed)
    style: Style = random_style(rng, urban_scale_px=600 / gsd, roads=True)
    extent = shapely.box(0, 0, size, size)
    valid = _collar(size, seed) if nodata_border else None
    layout = place(style, (0, 0, size, size), gsd, rng, keep_within=extent if valid is None else valid, valid=valid)
    renderer = Renderer(layout, style)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
        "crs": rasterio.crs.CRS.from_wkt(crs_obj.to_wkt()), "transform": transform, "tiled": True,
        "blockxsize": TILE, "blockysize": TILE, "photometric": "RGB", "interleave": "pixel",
        "bigtiff": "IF_SAFER", "nodata": 0 if nodata_border else None, **COMPRESSION[compress],
    }
    windows = [(r, c) for r in range(0, size, block) for c in range(0, size, block)]
    path = Path(path)
    with raster_env(), atomic_path(path) as tmp, atomic_path(footprints_path(path)) as tmp_vec:
        with rasterio.open(tmp, "w", **profile) as dst:
            for row0, col0 in tqdm(windows, desc=f"synth {path.name}", unit="block", disable=_quiet(progress)):
                h, w = min(block, size - row0), min(block, size - col0)
                dst.write(renderer.render(row0, col0, h, w).rgb, window=Window(col0, row0, w, h))
        footprints = _footprints_frame(layout, transform, crs_obj, gsd)
        pyogrio.write_dataframe(footprints.to_crs("EPSG:4326"), tmp_vec, layer=path.stem, driver="GeoJSON",
                                layer_options={"RFC7946": "YES"})
    log.info("wrote %s (%d x %d px, %d buildings)", path, size, size, len(footprints))
    return footprints


def _quiet(progress: bool | None) -> bool | None:
    """The ``disable`` argument of tqdm for a ``progress`` flag (None: tqdm shows it on a terminal only)."""
    return None if progress is None else not progress


def render_tile(seed: int | np.random.SeedSequence, *, empty: bool = False, size: int = TIANCHI_SIZE):
    """One Tianchi-style tile: a ``size`` x ``size`` patch of a small scene with a look of its own.

    Ground, colours, densities, sun and pixel size (0.27-0.36 m) vary per tile. Buildings may be cut by
    the tile edge but show at least half their area (and 40 m2). ``empty`` draws no building.

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


def _render_chunk(folder: Path, names: list[str], seqs: list[np.random.SeedSequence],
                  empty: list[bool]) -> list[str]:
    """Render tiles into ``folder`` as JPG files; returns their masks as RLE strings."""
    codes = []
    for name, seq, is_empty in zip(names, seqs, empty, strict=True):
        rgb, mask = render_tile(seq, empty=is_empty)
        Image.fromarray(rgb).save(folder / name, quality=TIANCHI_QUALITY)
        codes.append(rle.encode(mask))
    return codes


def make_tianchi(
    out_dir: str | os.PathLike[str], n_train: int = 400, n_test: int = 100, seed: int = 0, *,
    progress: bool | None = None, executor: Executor | None = None,
) -> dict[str, object]:
    """Write a generated dataset in the Tianchi building-segmentation layout, atomically.

    ``OUT_DIR/train/*.jpg`` and ``OUT_DIR/test_a/*.jpg`` (512x512 RGB, JPEG quality 90, names of 10
    characters of [0-9A-Z]), ``train_mask.csv`` and ``test_a_mask.csv`` (the truth) with ``name<TAB>rle``
    rows (column-major, 1-based runs; empty for no building), and ``test_a_samplesubmit.csv`` listing
    the test images with empty masks. Rows follow the sorted file names. About 10% of the tiles of each
    split have no building.

    Args:
        out_dir: the folder to create; it must not exist, or be empty.
        n_train: number of training tiles (at least 1).
        n_test: number of test tiles (at least 0).
        seed: the random seed; the same seed gives the same files, byte for byte.
        progress: show a progress bar (None: only on a terminal).
        executor: render chunks of tiles on it (e.g. a Dask client's ``get_executor()`` or a process
            pool; its workers must see ``out_dir``); default: one after the other in this process. Every
            tile has its own seed, so the files are the same either way.

    Returns:
        The paths written (``root``, ``train_dir``, ``test_dir``, ``train_mask``, ``test_mask``,
        ``sample_submission``) and counts (``n_train``, ``n_test``, ``n_train_empty``, ``n_test_empty``).

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty folder.
        ConfigError: negative counts.
    """
    out_dir = Path(out_dir)
    if not isinstance(n_train, (int, np.integer)) or n_train < 1:
        raise ConfigError(f"n_train={n_train!r}: expected at least 1 training tile")
    if not isinstance(n_test, (int, np.integer)) or n_test < 0:
        raise ConfigError(f"n_test={n_test!r}: expected 0 or more test tiles")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; remove it or choose another output folder")
    root = np.random.SeedSequence(seed)
    name_seq, *tile_seqs = root.spawn(1 + n_train + n_test)
    rng = np.random.default_rng(name_seq)
    names = _names(rng, n_train + n_test)
    splits = {"train": (names[:n_train], tile_seqs[:n_train]), "test_a": (names[n_train:], tile_seqs[n_train:])}
    info: dict[str, object] = {"root": out_dir}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        jobs: dict[str, list[Any]] = {}
        for split, (split_names, seqs) in splits.items():
            (tmp / split).mkdir()
            n_empty = int(round(TIANCHI_EMPTY * len(split_names)))
            empty = set(rng.choice(len(split_names), n_empty, replace=False).tolist())
            flags = [i in empty for i in range(len(split_names))]
            chunks = [(tmp / split, split_names[i : i + _CHUNK], seqs[i : i + _CHUNK], flags[i : i + _CHUNK])
                      for i in range(0, len(split_names), _CHUNK)]
            jobs[split] = [executor.submit(_render_chunk, *c) for c in chunks] if executor else chunks
        bar = tqdm(total=n_train + n_test, desc=f"synth {out_dir.name}", unit="tile", disable=_quiet(progress))
        for split, (split_names, _) in splits.items():
            codes: list[str] = []
            for job in jobs[split]:
                try:
                    chunk = job.result() if executor else _render_chunk(*job)
                except BaseException:
                    if executor:  # nothing more is written into the folder about to be removed
                        for pending in (j for js in jobs.values() for j in js):
                            pending.cancel()
                    raise
                codes += chunk
                bar.update(len(chunk))
            rows = list(zip(split_names, codes, strict=True))
            truth = "train_mask.csv" if split == "train" else "test_a_mask.csv"
            tianchi.write_mask_csv(rows, tmp / truth)
            key = "train" if split == "train" else "test"
            info |= {f"{key}_dir": out_dir / split, f"{key}_mask": out_dir / truth, f"n_{key}": len(rows),
                     f"n_{key}_empty": sum(not code for _, code in rows)}
        tianchi.write_mask_csv(((name, "") for name in splits["test_a"][0]), tmp / "test_a_samplesubmit.csv")
        info["sample_submission"] = out_dir / "test_a_samplesubmit.csv"
        bar.close()
    log.info("wrote %s (%d train, %d test tiles)", out_dir, n_train, n_test)
    return info
