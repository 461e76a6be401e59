"""Chips from scenes: exact pixels and transforms, labels from footprints in any CRS, nodata, bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.shutil
import shapely
from distributed import Client, LocalCluster
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.windows import Window

from rsseg.cli import main
from rsseg.errors import ConfigError, RasterError
from rsseg.fileio import display_name, is_remote, source_name
from rsseg.pipeline.cluster import local_cluster, task_threads, threads_by_host
from rsseg.pipeline.process import available_cores
from rsseg.tiling import INDEX_COLUMNS, TileOptions, write_chips
from rsseg.tiling import chips as tiling
from rsseg.tiling.grid import TileGrid
from rsseg.tiling.stats import LOG_BINS, LOG_RANGE, BandStats
from rsseg.tiling.writer import ChipWriter

CRS = "EPSG:32650"
TRANSFORM = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0)


@pytest.fixture(scope="module")
def client() -> Client:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as dask_client,
    ):
        yield dask_client


@pytest.fixture
def cli_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let each in-process main() configure logging afresh (its handler would outlive capsys's stream)."""
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "level", logging.WARNING)


def make_scene(path: Path, width: int, height: int, count: int = 3, dtype: str = "uint8",
               nodata: float | None = None, crs: str | None = CRS, seed: int = 0,
               data: np.ndarray | None = None) -> np.ndarray:
    if data is None:
        high = 256 if dtype == "uint8" else 60_000
        data = np.random.default_rng(seed).integers(1, high, (count, height, width)).astype(dtype)
    profile = dict(driver="GTiff", width=width, height=height, count=data.shape[0], dtype=data.dtype,
                   crs=crs, transform=TRANSFORM, nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return data


def read_index(out: Path) -> tuple[list[dict[str, str]], dict]:
    with open(out / "index.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == INDEX_COLUMNS
        rows = list(reader)
    return rows, json.loads((out / "index.json").read_text())


def test_chips_equal_source_windows_with_exact_transform(tmp_path: Path, client: Client) -> None:
    scene = tmp_path / "scene.tif"
    data = make_scene(scene, width=100, height=70)
    index = write_chips(scene, tmp_path / "out", TileOptions(size=32, overlap=8), executor=client.get_executor())
    assert index == tmp_path / "out" / "index.csv"
    rows, meta = read_index(tmp_path / "out")
    grid = TileGrid(100, 70, 32, 8)
    assert len(rows) == len(grid) == meta["counts"]["chips"] == meta["counts"]["windows"]
    assert {(int(r["col_off"]), int(r["row_off"])) for r in rows} == {(t.col_off, t.row_off) for t in grid}
    assert meta["crs"] == CRS and meta["dtype"] == "uint8" and meta["bands"] == [1, 2, 3]
    assert (meta["size"], meta["overlap"], meta["labels"]) == (32, 8, None)
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        assert row["label"] == "" and row["building_frac"] == ""
        with rasterio.open(tmp_path / "out" / row["image"]) as chip:
            np.testing.assert_array_equal(chip.read(), data[:, r : r + 32, c : c + 32])
            assert chip.crs == CRS
            assert chip.transform @ (0, 0) == TRANSFORM @ (c, r)
            assert chip.transform.almost_equals(TRANSFORM @ Affine.translation(c, r))
            bounds = [float(row[k]) for k in ("minx", "miny", "maxx", "maxy")]
            np.testing.assert_allclose(bounds, tuple(chip.bounds))
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize(("dtype", "nodata"), [("uint8", None), ("uint16", 0.0), ("float32", float("nan"))])
def test_chip_writer_template_matches_gdal(tmp_path: Path, dtype: str, nodata: float | None) -> None:
    profile = dict(width=24, height=16, count=3, dtype=dtype, crs=CRS, transform=TRANSFORM, nodata=nodata)
    fast, gdal = ChipWriter(profile), ChipWriter(dict(profile, compress="deflate"))
    assert fast.uses_template and not gdal.uses_template
    array = np.random.default_rng(1).integers(0, 1000, (3, 40, 60)).astype(dtype)[:, 3:19, 10:34]
    where = TRANSFORM @ Affine.translation(448, 896)
    fast.write(tmp_path / "fast.tif", array, where)
    gdal.write(tmp_path / "gdal.tif", array, where)
    with rasterio.open(tmp_path / "fast.tif") as a, rasterio.open(tmp_path / "gdal.tif") as b:
        np.testing.assert_array_equal(a.read(), array)
        np.testing.assert_array_equal(b.read(), array)
        assert a.transform == b.transform == where and a.crs == b.crs == CRS
        assert a.dtypes == b.dtypes == (dtype,) * 3
        assert str(a.nodata) == str(b.nodata) == str(nodata)
    rotated = ChipWriter(dict(profile, transform=Affine(0.5, 0.1, 500_000.0, 0.1, -0.5, 4_000_000.0)))
    assert not rotated.uses_template  # GDAL writes a ModelTransformation tag there: every chip via GDAL


def test_footprints_in_another_crs_land_on_their_pixels(tmp_path: Path) -> None:
    scene = tmp_path / "scene.tif"
    make_scene(scene, width=80, height=60)
    # Rectangles drawn in pixel space (edges a quarter pixel inside pixel boundaries), stored in EPSG:4326.
    rects = [(5, 3, 20, 11), (30, 25, 70, 58), (60, 2, 79, 9)]  # col0, row0, col1, row1 (exclusive)
    expected = np.zeros((60, 80), np.uint8)
    polys = []
    for c0, r0, c1, r1 in rects:
        expected[r0:r1, c0:c1] = 1
        (x0, y0), (x1, y1) = TRANSFORM @ (c0 + 0.25, r0 + 0.25), TRANSFORM @ (c1 - 0.25, r1 - 0.25)
        polys.append(shapely.box(x0, y1, x1, y0))
    # A self-intersecting bow-tie, its crossing away from pixel centres.
    bowtie = shapely.Polygon([TRANSFORM @ xy for xy in [(2.1, 2.2), (6.3, 6.1), (6.3, 2.2), (2.1, 6.1)]])
    far = shapely.box(600_000, 3_000_000, 600_010, 3_000_010)  # outside the scene: never burned
    frame = gpd.GeoDataFrame({"id": range(6)}, geometry=[*polys, bowtie, None, far], crs=CRS)
    labels = tmp_path / "buildings.geojson"
    frame.to_crs("EPSG:4326").to_file(labels)
    write_chips(scene, tmp_path / "out", size=32, overlap=4, labels=labels)
    rows, meta = read_index(tmp_path / "out")
    assert meta["labels"]["kind"] == "vector"
    counts = meta["counts"]
    assert counts["geometries_repaired"] == 1 and counts["geometries_empty"] == 1
    assert counts["geometries_outside"] == 1 and counts["geometries_read"] == 6
    # The bow-tie is repaired into two triangles; pixel centres inside them are buildings.
    expected |= rasterize([shapely.make_valid(bowtie)], out_shape=expected.shape, transform=TRANSFORM,
                          dtype=np.uint8)
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(tmp_path / "out" / row["label"]) as chip:
            assert (chip.count, chip.dtypes[0], chip.nodata) == (1, "uint8", 255)
            assert chip.transform == TRANSFORM @ Affine.translation(c, r)
            truth = expected[r : r + 32, c : c + 32]
            np.testing.assert_array_equal(chip.read(1), truth)
            assert float(row["building_frac"]) == pytest.approx(truth.mean(), abs=1e-6)


def test_empty_footprints_file_gives_background_labels(tmp_path: Path) -> None:
    scene = tmp_path / "scene.tif"
    make_scene(scene, width=40, height=40)
    labels = tmp_path / "none.geojson"
    gpd.GeoDataFrame(geometry=gpd.GeoSeries([], crs="EPSG:4326")).to_file(labels)
    write_chips(scene, tmp_path / "out", size=32, overlap=8, labels=labels)
    rows, meta = read_index(tmp_path / "out")
    assert len(rows) == 4 and meta["counts"]["geometries_read"] == 0
    for row in rows:
        assert float(row["building_frac"]) == 0.0
        with rasterio.open(tmp_path / "out" / row["label"]) as chip:
            assert not chip.read(1).any()


@pytest.mark.parametrize("block_rows", [None, 16])  # a striped file (no read-ahead), a tiled one (16-row blocks)
def test_many_footprints_across_many_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            block_rows: int | None) -> None:
    monkeypatch.setattr(tiling, "STRIP_MAX_PX", 70)  # several strips per grid row
    monkeypatch.setattr(tiling, "STRIPS_PER_BLOCK", 2)  # several blocks per column range
    scene = tmp_path / "scene.tif"
    data = make_scene(scene, width=150, height=110, count=1)
    if block_rows:
        with rasterio.open(scene, "w", driver="GTiff", width=150, height=110, count=1, dtype="uint8", crs=CRS,
                           transform=TRANSFORM, tiled=True, blockxsize=16, blockysize=block_rows) as dst:
            dst.write(data)
    expected = np.zeros((110, 150), np.uint8)
    squares = []
    for r in range(1, 105, 9):
        for c in range(2, 145, 11):
            expected[r : r + 3, c : c + 4] = 1
            (x0, y0), (x1, y1) = TRANSFORM @ (c + 0.2, r + 0.2), TRANSFORM @ (c + 3.8, r + 2.8)
            squares.append(shapely.box(x0, y1, x1, y0))
    labels = tmp_path / "squares.gpkg"
    gpd.GeoDataFrame(geometry=squares, crs=CRS).to_crs("EPSG:3857").to_file(labels)
    assert len(tiling._blocks(TileGrid(150, 110, 32, 6))) == 6  # 3 column ranges x 2 row groups
    write_chips(scene, tmp_path / "out", size=32, overlap=6, labels=labels)
    rows, meta = read_index(tmp_path / "out")
    assert len(rows) == len(TileGrid(150, 110, 32, 6)) and meta["counts"]["geometries_read"] == len(squares)
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(tmp_path / "out" / row["image"]) as chip:
            np.testing.assert_array_equal(chip.read(1), data[0, r : r + 32, c : c + 32], err_msg=row["image"])
        with rasterio.open(tmp_path / "out" / row["label"]) as chip:
            np.testing.assert_array_equal(chip.read(1), expected[r : r + 32, c : c + 32], err_msg=row["label"])


def test_a_worker_of_two_threads_writes_the_chips_of_one_process(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two blocks at a time in one worker process (the benchmark's "1 worker"): the same files as in-process."""
    monkeypatch.setattr(tiling, "STRIP_MAX_PX", 70)
    monkeypatch.setattr(tiling, "STRIPS_PER_BLOCK", 2)
    scene, labels = tmp_path / "scene.tif", tmp_path / "squares.gpkg"
    make_scene(scene, width=150, height=110)
    squares = [shapely.box(*(TRANSFORM @ (c, r + 7)), *(TRANSFORM @ (c + 9, r))) for r in range(0, 100, 13)
               for c in range(0, 140, 17)]
    gpd.GeoDataFrame(geometry=squares, crs=CRS).to_file(labels)
    write_chips(scene, tmp_path / "here", size=32, overlap=6, labels=labels)
    with local_cluster(1, gpus=0, threads=2) as cluster, Client(cluster) as client:
        assert list(client.nthreads().values()) == [2]
        gdal_threads = max(1, available_cores(1) // 2)  # the worker's cores shared by its threads
        assert list(client.run(os.getenv, "GDAL_NUM_THREADS").values()) == [str(gdal_threads)]
        write_chips(scene, tmp_path / "dask", size=32, overlap=6, labels=labels, executor=client.get_executor())
    here = {p.relative_to(tmp_path / "here"): p.read_bytes() for p in (tmp_path / "here").rglob("*.*")}
    dask = {p.relative_to(tmp_path / "dask"): p.read_bytes() for p in (tmp_path / "dask").rglob("*.*")}
    assert len(here) == 2 * len(TileGrid(150, 110, 32, 6)) + 2 and here == dask


def test_label_chips_equal_rasterize_holes_empty_overlaps_union(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiling, "STRIP_MAX_PX", 60)
    monkeypatch.setattr(tiling, "STRIPS_PER_BLOCK", 1)
    scene = tmp_path / "scene.tif"
    make_scene(scene, width=96, height=80, count=1)

    def ring(c0: float, r0: float, c1: float, r1: float) -> list[tuple[float, float]]:
        return [TRANSFORM @ xy for xy in [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]]

    courtyard = shapely.Polygon(ring(4.3, 5.2, 40.6, 33.7), [ring(12.4, 11.1, 30.8, 25.6)])
    overlapping = [shapely.Polygon(ring(35.2, 20.1, 70.9, 50.3)), shapely.Polygon(ring(50.4, 30.6, 90.2, 75.8))]
    rotated = shapely.affinity.rotate(shapely.Polygon(ring(10.3, 50.2, 30.7, 70.6)), 33.0)
    geoms = [courtyard, *overlapping, rotated, shapely.MultiPolygon([shapely.Polygon(ring(80.1, 2.2, 94.6, 9.9)),
                                                                     shapely.Polygon(ring(3.3, 72.4, 8.8, 78.1))])]
    labels = tmp_path / "b.geojson"
    gpd.GeoDataFrame(geometry=geoms, crs=CRS).to_file(labels)
    write_chips(scene, tmp_path / "out", size=24, overlap=5, labels=labels)
    truth = rasterize(geoms, out_shape=(80, 96), transform=TRANSFORM, dtype=np.uint8, all_touched=False)
    hole = rasterize([shapely.Polygon(ring(12.4, 11.1, 30.8, 25.6))], out_shape=(80, 96), transform=TRANSFORM,
                     dtype=np.uint8)
    both = [rasterize([g], out_shape=(80, 96), transform=TRANSFORM, dtype=np.uint8) for g in overlapping]
    assert hole.any() and not truth[hole == 1].any(), "the courtyard is not a building"
    assert (both[0] & both[1]).any() and (truth[(both[0] | both[1]) == 1] == 1).all(), "overlaps are a union"
    mosaic = np.full((80, 96), 9, np.uint8)
    rows, _ = read_index(tmp_path / "out")
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(tmp_path / "out" / row["label"]) as chip:
            label = chip.read(1)
        np.testing.assert_array_equal(label, truth[r : r + 24, c : c + 24], err_msg=row["label"])
        mosaic[r : r + 24, c : c + 24] = label
    np.testing.assert_array_equal(mosaic, truth)


def test_nodata_chips_skipped_and_marked_255(tmp_path: Path) -> None:
    data = np.full((3, 32, 96), 9, np.uint8)
    data[:, :, :48] = 0  # chip 0 all nodata, chip 1 half nodata
    data[0, 5, 70] = 0  # one band zero is still data (nodata means every band equals nodata)
    scene = tmp_path / "scene.tif"
    make_scene(scene, 96, 32, data=data, nodata=0)
    labels = tmp_path / "b.gpkg"
    x0, y0 = TRANSFORM @ (0, 0)
    gpd.GeoDataFrame(geometry=[shapely.box(x0, y0 - 8, x0 + 32, y0)], crs=CRS).to_file(labels)  # 64x16 px
    write_chips(scene, tmp_path / "strict", size=32, overlap=0, labels=labels, max_nodata=0.4)
    rows, meta = read_index(tmp_path / "strict")
    assert [r["image"] for r in rows] == ["images/r0000_c0002.tif"]
    assert meta["counts"]["skipped_all_nodata"] == 1 and meta["counts"]["skipped_max_nodata"] == 1
    write_chips(scene, tmp_path / "loose", size=32, overlap=0, labels=labels, max_nodata=0.5)
    rows, meta = read_index(tmp_path / "loose")
    assert [r["image"] for r in rows] == ["images/r0000_c0001.tif", "images/r0000_c0002.tif"]
    assert meta["nodata"] == 0 and meta["counts"]["skipped_all_nodata"] == 1
    assert float(rows[0]["nodata_frac"]) == 0.5 and float(rows[1]["nodata_frac"]) == 0.0
    with rasterio.open(tmp_path / "loose" / rows[0]["label"]) as lab:
        label = lab.read(1)
    assert (label[:, :16] == 255).all() and (label[:16, 16:] == 1).all() and (label[16:, 16:] == 0).all()
    assert float(rows[0]["building_frac"]) == 0.5  # of the valid pixels
    with rasterio.open(tmp_path / "loose" / rows[1]["image"]) as img:
        assert img.nodata == 0 and img.read(1)[5, 6] == 0 and img.read(2)[5, 6] == 9


def test_dataset_mask_counts_as_nodata(tmp_path: Path) -> None:
    scene = tmp_path / "masked.tif"
    data = np.full((3, 32, 64), 50, np.uint8)
    with rasterio.open(scene, "w", driver="GTiff", width=64, height=32, count=3, dtype="uint8", crs=CRS,
                       transform=TRANSFORM) as dst:
        dst.write(data)
        mask = np.full((32, 64), 255, np.uint8)
        mask[:, :40] = 0  # an orthophoto's collar, kept as a per-dataset mask rather than a nodata value
        dst.write_mask(mask)
    labels = tmp_path / "b.geojson"
    gpd.GeoDataFrame(geometry=[shapely.box(*rasterio.transform.array_bounds(32, 64, TRANSFORM))],
                     crs=CRS).to_file(labels)
    write_chips(scene, tmp_path / "out", size=32, overlap=0, labels=labels, max_nodata=0.9)
    rows, meta = read_index(tmp_path / "out")
    assert [r["image"] for r in rows] == ["images/r0000_c0001.tif"] and meta["counts"]["skipped_all_nodata"] == 1
    assert float(rows[0]["nodata_frac"]) == 0.25 and float(rows[0]["building_frac"]) == 1.0
    with rasterio.open(tmp_path / "out" / rows[0]["label"]) as lab:
        label = lab.read(1)
    assert (label[:, :8] == 255).all() and (label[:, 8:] == 1).all()


def test_uint16_band_selection_label_raster_and_small_scene(tmp_path: Path) -> None:
    scene = tmp_path / "scene.tif"
    data = make_scene(scene, width=40, height=20, count=5, dtype="uint16", nodata=0)
    mask = np.zeros((1, 20, 40), np.uint8)
    mask[0, 2:8, 3:30] = 200  # any non-zero value is a building
    mask[0, 15:, :] = 7  # the label raster's nodata: ignore
    label_raster = tmp_path / "mask.tif"
    make_scene(label_raster, 40, 20, data=mask, nodata=7)
    out = tmp_path / "out"
    write_chips(scene, out, size=48, overlap=8, labels=label_raster, bands=[4, 2], max_nodata=1.0)
    rows, meta = read_index(out)
    assert meta["bands"] == [4, 2] and meta["dtype"] == "uint16" and meta["labels"]["kind"] == "raster"
    assert len(rows) == 1 and float(rows[0]["nodata_frac"]) == pytest.approx(1 - 800 / 48**2, abs=1e-6)
    with rasterio.open(out / rows[0]["image"]) as chip:
        assert (chip.count, chip.dtypes, chip.width, chip.height) == (2, ("uint16", "uint16"), 48, 48)
        pixels = chip.read()
    np.testing.assert_array_equal(pixels[:, :20, :40], data[[3, 1]])
    assert (pixels[:, 20:, :] == 0).all() and (pixels[:, :, 40:] == 0).all()  # padded with nodata
    with rasterio.open(out / rows[0]["label"]) as lab:
        label = lab.read(1)
    assert (label[2:8, 3:30] == 1).all() and label[:15, :40].sum() == 6 * 27
    assert (label[15:] == 255).all() and (label[:, 40:] == 255).all()


@pytest.mark.usefixtures("cli_logging")
def test_cli_tiles_and_refuses_to_mix_with_existing_output(tmp_path: Path, client: Client,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    scene = tmp_path / "scene.tif"
    make_scene(scene, 64, 64)
    out = tmp_path / "out"
    args = ["tile", str(scene), str(out), "--size", "32", "--overlap", "0",
            "--scheduler", client.scheduler.address]
    main(args)
    assert capsys.readouterr().out.strip() == str(out / "index.csv")
    (out / "stale.txt").write_text("from an earlier run")
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"rsseg: error: {out} exists; remove it, choose another folder or " \
                                              "pass --overwrite"
    main([*args, "--overwrite"])
    assert not (out / "stale.txt").exists() and len(read_index(out)[0]) == 4


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    scene = tmp_path / "scene.tif"
    make_scene(scene, 64, 64)
    not_raster = tmp_path / "notes.tif"
    not_raster.write_text("not a raster")
    no_crs = tmp_path / "nocrs.tif"
    make_scene(no_crs, 64, 64, crs=None)
    far = tmp_path / "far.geojson"
    gpd.GeoDataFrame(geometry=[shapely.box(10, 10, 11, 11)], crs="EPSG:4326").to_file(far)
    other_grid = tmp_path / "mask.tif"
    make_scene(other_grid, 32, 64, count=1)
    return {
        "not a raster": ([str(not_raster)], "not a raster that GDAL can read"),
        "no crs": ([str(no_crs)], "has no CRS"),
        "labels elsewhere": ([str(scene), "--labels", str(far)], "do not overlap the scene: footprints extent"),
        "label raster elsewhere": ([str(scene), "--labels", str(other_grid)], "label raster is 32x64 px; expected"),
        "unknown band": ([str(scene), "--bands", "1,4"], "unknown band(s) [4]; the scene has 3 band(s)"),
        "bad overlap": ([str(scene), "--overlap", "512"], "overlap=512: expected less than size=512"),
        "bad max nodata": ([str(scene), "--max-nodata", "1.5"], "max_nodata=1.5"),
    }


@pytest.mark.usefixtures("cli_logging")
def test_bad_input_one_line_exit_2_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, (inputs, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises(SystemExit) as exc:
            main(["tile", inputs[0], str(out), *inputs[1:]])  # fails before a cluster starts
        err = capsys.readouterr().err
        assert exc.value.code == 2, name
        assert err.startswith("rsseg: error: ") and err.count("\n") == 1 and message in err, (name, err)
        assert not out.exists(), name
    assert not list(tmp_path.glob(".out*")), "no temporary folder left behind"


@pytest.mark.usefixtures("cli_logging")
def test_damaged_scene_fails_in_a_worker_without_output(tmp_path: Path, client: Client,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    scene = tmp_path / "damaged.tif"
    data = np.random.default_rng(0).integers(0, 255, (1, 128, 128), dtype=np.uint8)
    with rasterio.open(scene, "w", driver="GTiff", width=128, height=128, count=1, dtype="uint8", crs=CRS,
                       transform=TRANSFORM, tiled=True, blockxsize=32, blockysize=32) as dst:
        dst.write(data)
    with open(scene, "r+b") as fh:  # cut the pixel data short; the header (written first) stays readable
        fh.truncate(scene.stat().st_size // 2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["tile", str(scene), str(out), "--size", "32", "--overlap", "0", "--scheduler",
              client.scheduler.address])
    last = capsys.readouterr().err.splitlines()[-1]  # earlier lines: the CLI's INFO log of the Dask connection
    assert exc.value.code == 2 and last.startswith("rsseg: error: ") and "cannot read Window(" in last
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_failing_block_stops_the_others_without_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any concurrent.futures executor runs the blocks; one fails while the others are writing chips.
    monkeypatch.setattr(tiling, "STRIP_MAX_PX", 256)
    monkeypatch.setattr(tiling, "STRIPS_PER_BLOCK", 4)
    scene = tmp_path / "scene.tif"
    make_scene(scene, 1024, 1024)  # 4,096 chips of 16x16 in 64 blocks
    written, write_block = [], tiling.write_block

    def failing_block(block: tiling.ChipBlock) -> object:
        if block.strips[0][0].row_off == 64 and block.strips[0][0].col_off == 0:
            deadline = time.monotonic() + 30  # fail once other blocks have written chips
            while not (chips := list(tmp_path.glob(".out.tmp-*/images/*.tif"))) and time.monotonic() < deadline:
                time.sleep(0.02)
            written.append(len(chips))
            raise RasterError(f"{block.job.scene}: cannot read a block (a damaged file?)")
        return write_block(block)

    monkeypatch.setattr(tiling, "write_block", failing_block)
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as executor, pytest.raises(RasterError, match="cannot read a block"):
        write_chips(scene, out, size=16, overlap=0, executor=executor)
    assert written[0] > 0  # chips were being written when the error came
    time.sleep(0.5)  # what a block still running would write lands here
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_options_model_and_keywords_agree(tmp_path: Path) -> None:
    scene = tmp_path / "scene.tif"
    make_scene(scene, 40, 40)
    write_chips(scene, tmp_path / "a", TileOptions(size=16, overlap=4, bands=[2]))
    write_chips(scene, tmp_path / "b", TileOptions(size=16), overlap=4, bands=[2])
    assert read_index(tmp_path / "a")[0] == read_index(tmp_path / "b")[0]
    assert TileOptions().overwrite is False and TileOptions().size == 512 and TileOptions().overlap == 64
    with pytest.raises(ConfigError, match="sise"):
        write_chips(scene, tmp_path / "c", sise=16)
    with pytest.raises(ConfigError, match="max_nodata=1.5: expected a fraction"):
        write_chips(scene, tmp_path / "c", max_nodata=1.5)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_console_entry_point_reports_missing_crs(tmp_path: Path) -> None:
    scene = tmp_path / "nocrs.tif"
    make_scene(scene, 16, 16, crs=None)
    result = subprocess.run([sys.executable, "-m", "rsseg.cli", "tile", str(scene), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("rsseg: error: ") and result.stderr.count("\n") == 1
    assert "--allow-no-crs" in result.stderr and not (tmp_path / "out").exists()
    write_chips(scene, tmp_path / "allowed", size=16, overlap=0, allow_no_crs=True)
    assert read_index(tmp_path / "allowed")[1]["crs"] is None


@pytest.mark.usefixtures("cli_logging")
def test_small_scene_without_nodata_is_padded_and_ignored_in_labels(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    scene = tmp_path / "small.tif"
    data = make_scene(scene, width=20, height=12, count=2)
    labels = tmp_path / "b.geojson"
    x0, y0 = TRANSFORM @ (0, 0)
    gpd.GeoDataFrame(geometry=[shapely.box(x0, y0 - 3, x0 + 5, y0)], crs=CRS).to_file(labels)  # 10x6 px
    out = tmp_path / "out"
    main(["tile", str(scene), str(out), "--size", "32", "--overlap", "4", "--labels", str(labels),
          "--max-nodata", "1", "--scheduler", "sync"])
    assert capsys.readouterr().out.strip() == str(out / "index.csv")
    rows, meta = read_index(out)
    assert len(rows) == 1 and meta["nodata"] is None
    assert float(rows[0]["nodata_frac"]) == pytest.approx(1 - 240 / 32**2, abs=1e-6)
    assert float(rows[0]["building_frac"]) == pytest.approx(60 / 240, abs=1e-6)
    with rasterio.open(out / rows[0]["image"]) as chip:
        pixels = chip.read()
    np.testing.assert_array_equal(pixels[:, :12, :20], data)
    assert not pixels[:, 12:].any() and not pixels[:, :, 20:].any()  # padded with 0
    with rasterio.open(out / rows[0]["label"]) as lab:
        label = lab.read(1)
    assert (label[:6, :10] == 1).all() and label[:12, :20].sum() == 60
    assert (label[12:] == 255).all() and (label[:, 20:] == 255).all()


def test_window_read_matches_index_bounds_for_edge_tiles(tmp_path: Path) -> None:
    scene = tmp_path / "scene.tif"
    data = make_scene(scene, 37, 53, count=1)
    write_chips(scene, tmp_path / "out", size=16, overlap=5)
    rows, _ = read_index(tmp_path / "out")
    mosaic = np.zeros((53, 37), np.uint8)
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(tmp_path / "out" / row["image"]) as chip:
            assert chip.read(1, window=Window(0, 0, 16, 16)).shape == (16, 16)
            mosaic[r : r + 16, c : c + 16] = chip.read(1)
    np.testing.assert_array_equal(mosaic, data[0])  # the chips reassemble the whole scene


@pytest.mark.parametrize("width", [150, 600, 20000])
def test_blocks_cover_each_window_once(width: int) -> None:
    grid = TileGrid(width, 700 if width < 1000 else 20000, 32 if width < 1000 else 512, 6 if width < 1000 else 64)
    blocks = tiling._blocks(grid)
    tiles = [tile for block in blocks for strip in block for tile in strip]
    assert sorted(tiles, key=lambda t: (t.row_off, t.col_off)) == list(grid)
    for block in blocks:
        assert len(block) <= tiling.STRIPS_PER_BLOCK
        assert len({(strip[0].col, strip[-1].col) for strip in block}) == 1  # same columns, strip after strip
        assert [strip[0].row for strip in block] == list(range(block[0][0].row, block[0][0].row + len(block)))
        assert all(strip[-1].col_off + grid.size - strip[0].col_off <= max(tiling.STRIP_MAX_PX, grid.size)
                   for strip in block)
    if width == 20000:
        assert len(blocks) >= 6  # a large scene is shared among workers


def test_task_threads_share_the_host_among_worker_threads(client: Client) -> None:
    cores = len(os.sched_getaffinity(0))
    threads = threads_by_host(client)
    assert threads == {"127.0.0.1": 2}
    in_tasks = client.gather([client.submit(task_threads, threads, workers=[address], pure=False)
                              for address in client.nthreads()])
    assert in_tasks == [max(1, cores // 2)] * 2
    # One task on the cluster (one scene to predict) has the host to itself; two share it.
    assert client.submit(task_threads, threads, 1, pure=False).result() == cores
    assert client.submit(task_threads, threads, 2, pure=False).result() == max(1, cores // 2)
    assert task_threads(threads) == cores  # outside a worker: every core


@pytest.mark.parametrize("encoding", ["0/1", "0/255", "3-band 0/255", "rgba 0/255"])
def test_label_raster_is_a_class_map(tmp_path: Path, encoding: str) -> None:
    scene = tmp_path / "scene.tif"
    make_scene(scene, 40, 24, count=1)
    truth = np.zeros((24, 40), np.uint8)
    truth[3:9, 5:30] = 1
    truth[15:20, 2:12] = 1
    high = 1 if encoding == "0/1" else 255
    bands = {"0/1": 1, "0/255": 1, "3-band 0/255": 3, "rgba 0/255": 4}[encoding]
    mask = np.repeat(truth[None] * high, bands, axis=0)
    if bands >= 3:
        mask[1:3, 3:9, 5:30] = 0  # any band > 127 is a building
        mask[:3, 0, :] = 100  # no band > 127: background
    if bands == 4:
        mask[3] = 255  # alpha: left out
    label_raster = tmp_path / "mask.tif"
    with rasterio.open(label_raster, "w", driver="GTiff", width=40, height=24, count=bands, dtype="uint8", crs=CRS,
                       transform=TRANSFORM, nodata=0, photometric="RGB" if bands >= 3 else None,
                       alpha="YES" if bands == 4 else None) as dst:
        dst.write(mask)
    write_chips(scene, tmp_path / "out", size=16, overlap=4, labels=label_raster)
    rows, meta = read_index(tmp_path / "out")
    assert meta["labels"]["kind"] == "raster" and meta["labels"]["ignore"] is None
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(tmp_path / "out" / row["label"]) as chip:
            np.testing.assert_array_equal(chip.read(1), truth[r : r + 16, c : c + 16], err_msg=row["label"])
        assert float(row["building_frac"]) == pytest.approx(truth[r : r + 16, c : c + 16].mean(), abs=1e-6)


def test_label_nodata_equal_to_background_warns_once_and_label_ignore_overrides(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scene = tmp_path / "scene.tif"
    make_scene(scene, 64, 48, count=1)
    mask = np.zeros((1, 48, 64), np.uint8)
    mask[0, 10:30, 10:50] = 255
    mask[0, 40:, :] = 9
    label_raster = tmp_path / "mask.tif"
    make_scene(label_raster, 64, 48, data=mask, nodata=0)  # SpaceNet's convention: nodata = background = 0
    with caplog.at_level(logging.WARNING, logger="rsseg"):
        write_chips(scene, tmp_path / "a", size=16, overlap=0, labels=label_raster)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nodata value 0 is also its background" in warnings[0].getMessage()
    assert "--label-ignore" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    rows, meta = read_index(tmp_path / "a")
    assert len(rows) == 12 and meta["labels"]["ignore"] is None
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(tmp_path / "a" / row["label"]) as chip:
            np.testing.assert_array_equal(chip.read(1), (mask[0, r : r + 16, c : c + 16] > 0).astype(np.uint8))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rsseg"):
        write_chips(scene, tmp_path / "b", size=16, overlap=0, labels=label_raster, label_ignore=9)
    assert not caplog.records
    rows, meta = read_index(tmp_path / "b")
    assert meta["labels"]["ignore"] == 9
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(tmp_path / "b" / row["label"]) as chip:
            label = chip.read(1)
        raw = mask[0, r : r + 16, c : c + 16]
        assert (label[raw == 9] == 255).all() and (label[raw == 255] == 1).all() and (label[raw == 0] == 0).all()
    vector = tmp_path / "b.geojson"
    gpd.GeoDataFrame(geometry=[shapely.box(*rasterio.transform.array_bounds(48, 64, TRANSFORM))],
                     crs=CRS).to_file(vector)
    with pytest.raises(ConfigError, match="label_ignore=9.0: applies to a label raster"):
        write_chips(scene, tmp_path / "c", size=16, overlap=0, labels=vector, label_ignore=9)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("dtype", "nodata"), [("uint8", 0), ("int8", -128), ("uint16", 0), ("int16", -32768),
                                               ("float32", float("nan"))])
def test_band_stats_equal_numpy_over_valid_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: Client,
                                                  dtype: str, nodata: float) -> None:
    monkeypatch.setattr(tiling, "STRIP_MAX_PX", 50)  # several blocks, overlapping windows: each pixel counts once
    monkeypatch.setattr(tiling, "STRIPS_PER_BLOCK", 2)
    rng = np.random.default_rng(3)
    base = rng.integers(1, 256, (3, 90, 130)).astype(np.uint8)  # a generated uint8 scene
    base[1] = np.clip(rng.gamma(2.0, 20.0, (90, 130)), 1, 255).astype(np.uint8)  # skewed, like real imagery
    base[2, 40:60, 70:110] = 250
    data = {"uint8": base, "int8": (base.astype(np.int16) - 128).astype(np.int8),
            "uint16": base.astype(np.uint16) * 8, "int16": base.astype(np.int16) * 8 - 1000,
            "float32": base.astype(np.float32) / 255}[dtype]
    data[:, :20, :30] = nodata  # nodata corner: left out
    data[0, 50, 50] = nodata  # one band equal to nodata is still data (GDAL's rule), except NaN in a float band
    scene = tmp_path / "scene.tif"
    make_scene(scene, 130, 90, data=data, nodata=nodata)
    with rasterio.open(scene, "r+") as dst:
        dst.set_band_description(2, "green")
    write_chips(scene, tmp_path / "out", size=32, overlap=7, bands=[1, 2, 3], executor=client.get_executor())
    stats = read_index(tmp_path / "out")[1]["band_stats"]
    valid = ~(np.isnan(data) if dtype == "float32" else data == nodata).all(axis=0)
    assert [s["band"] for s in stats] == [1, 2, 3] and [s["description"] for s in stats] == [None, "green", None]
    for s, band in zip(stats, data, strict=True):
        values = band[valid].astype(np.float64)
        values = values[np.isfinite(values)]
        assert s["dtype"] == dtype and s["count"] == values.size
        assert s["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert s["std"] == pytest.approx(values.std(), rel=1e-9)
        for key, q in (("p01", 1), ("p99", 99)):
            expected = np.percentile(values, q)
            if dtype == "float32":  # log-spaced bins: within a bin's width
                bin_width = abs(expected) * (10 ** (np.diff(LOG_RANGE)[0] / (LOG_BINS // 2 - 1)) - 1)
                assert abs(s[key] - expected) <= bin_width, (key, s[key], expected)
            else:  # one bin per value: exact
                assert s[key] == pytest.approx(expected, abs=1e-9), (key, s[key], expected)


def test_band_stats_of_an_all_nodata_band_and_a_masked_scene(tmp_path: Path) -> None:
    scene = tmp_path / "masked.tif"
    data = np.random.default_rng(0).integers(0, 256, (2, 40, 50)).astype(np.uint8)
    with rasterio.open(scene, "w", driver="GTiff", width=50, height=40, count=2, dtype="uint8", crs=CRS,
                       transform=TRANSFORM) as dst:
        dst.write(data)
        mask = np.full((40, 50), 255, np.uint8)
        mask[:, :20] = 0
        dst.write_mask(mask)
    write_chips(scene, tmp_path / "out", size=64, overlap=0, max_nodata=1.0)  # one padded chip
    stats = read_index(tmp_path / "out")[1]["band_stats"]
    for s, band in zip(stats, data, strict=True):
        assert s["count"] == 40 * 30 and s["mean"] == pytest.approx(band[:, 20:].mean(), rel=1e-12)
        assert s["p99"] == np.percentile(band[:, 20:], 99)
    empty = BandStats.empty(1, "float32").summary((1,), (None,))
    assert empty == [dict(band=1, description=None, mean=None, std=None, p01=None, p99=None, dtype="float32",
                          count=0)]


def _chips(out: Path) -> dict[str, tuple[np.ndarray, Affine, object]]:
    chips = {}
    for path in sorted(out.glob("*/*.tif")):
        with rasterio.open(path) as chip:
            chips[f"{path.parent.name}/{path.name}"] = (chip.read(), chip.transform, chip.crs)
    return chips


@pytest.mark.usefixtures("cli_logging")
def test_remote_cog_over_http_and_s3_gives_the_local_chips(tmp_path: Path, http_root: tuple[Path, str, list],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, url, requests = http_root
    local, mask = tmp_path / "scene.tif", tmp_path / "mask.tif"
    make_scene(local, 300, 200, count=3, seed=5)
    labels = np.zeros((1, 200, 300), np.uint8)
    labels[0, 30:90, 40:200] = 255
    make_scene(mask, 300, 200, data=labels, nodata=0)
    (root / "bucket").mkdir()
    for src, name in ((local, "bucket/scene.tif"), (mask, "bucket/mask.tif")):
        rasterio.shutil.copy(src, root / name, driver="COG", blocksize=64)  # internal tiles, overviews
    options = TileOptions(size=64, overlap=8)
    write_chips(local, tmp_path / "local", options, labels=mask)
    expected = _chips(tmp_path / "local")
    rows, meta = read_index(tmp_path / "local")
    remote = f"/vsicurl/{url}/bucket/scene.tif"
    with ThreadPoolExecutor(2) as executor:
        write_chips(remote, tmp_path / "http", options, labels=f"/vsicurl/{url}/bucket/mask.tif", executor=executor)
    assert any(r[2] for r in requests if r[1] == "/bucket/scene.tif"), "read with Range requests"
    got = _chips(tmp_path / "http")
    assert got.keys() == expected.keys() and len(got) == 2 * len(rows)
    for name, (pixels, transform, crs) in expected.items():
        np.testing.assert_array_equal(got[name][0], pixels, err_msg=name)
        assert got[name][1:] == (transform, crs), name
    remote_rows, remote_meta = read_index(tmp_path / "http")
    assert remote_rows == rows and remote_meta["scene"] == remote  # the name as given, not a local path
    assert remote_meta["band_stats"] == meta["band_stats"] and remote_meta["labels"]["path"].startswith("/vsicurl/")
    # s3:// through rasterio (GDAL's /vsis3/), the bucket on the local server; the CLI takes remote names as given.
    for key, value in dict(AWS_S3_ENDPOINT=url.removeprefix("http://"), AWS_HTTPS="NO", AWS_VIRTUAL_HOSTING="FALSE",
                           AWS_NO_SIGN_REQUEST="YES", AWS_REGION="us-east-1").items():
        monkeypatch.setenv(key, value)
    before = len(requests)
    for name, scene in (("s3", "s3://bucket/scene.tif"), ("vsis3", "/vsis3/bucket/scene.tif")):
        main(["tile", scene, str(tmp_path / name), "--size", "64", "--overlap", "8", "--labels", "s3://bucket/mask.tif",
              "--scheduler", "sync"])
        assert capsys.readouterr().out.strip() == str(tmp_path / name / "index.csv")
        assert read_index(tmp_path / name)[0] == rows
        got = _chips(tmp_path / name)
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k][0], v[0]) and got[k][1] == v[1] for k, v in expected.items()), name
    assert any(r[1] == "/bucket/scene.tif" and r[2] for r in requests[before:]), "s3:// read from the endpoint"


def test_remote_names_are_kept_as_given() -> None:
    for name in ("/vsicurl/https://host/a/b.tif", "s3://bucket/k.tif", "gs://b/k.tif", "/vsis3/b/k.tif",
                 "https://host/x.tif?sig=1//2", "/vsigs/b/k.tif"):
        assert is_remote(name) and source_name(name) == name, name
    assert display_name("/vsicurl/https://host/a/b.tif?sig=x/y") == "b.tif"
    assert not is_remote("scene.tif") and not is_remote(Path("/vsis3/b/k.tif")) and not is_remote("C:/data/x.tif")
    assert source_name("scene.tif") == str(Path("scene.tif").resolve())
