"""Tests of rsseg.vector.blockwise, rsseg.vector.polygonize, rsseg.vector.regularize and rsseg.vector.files
on tiny real GeoTIFFs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import shapely.affinity
import shapely.geometry
from click.testing import CliRunner
from distributed import Client, LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import CRS, Geod, Transformer
from rasterio.features import rasterize, shapes
from rasterio.transform import Affine

from rsseg.cli import cli, main
from rsseg.errors import ConfigError, RasterError
from rsseg.pipeline.cluster import dask_executor
from rsseg.vector import VectorizeOptions, read_vectors, vectorize, vectorize_to_file, write_vectors
from rsseg.vector.polygonize import block_windows, building_pixels, merge_pieces, on_inner_border, polygonize_pixels
from rsseg.vector.regularize import regularize_polygons

UTM = "EPSG:32650"


def from_origin(west, north, xsize, ysize):
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


UTM_ORIGIN = from_origin(500000, 4000000, 0.5, 0.5)  # lon ~117, lat ~36: lon > 90 tells the axis order


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as dask:
        yield dask


@pytest.fixture(scope="module")
def executor(client):
    """The blocks run on the Dask workers, as from the CLI and the pipeline."""
    return client.get_executor()


def write_raster(path, array, crs=UTM, transform=UTM_ORIGIN, nodata=None, tags=None):
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                       dtype=array.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(array, 1)
        if tags:
            dst.update_tags(ns="rsseg", **tags)  # the metadata domain inference writes
    return path


def whole_raster_polygons(array, transform):
    """The reference: rasterio.features.shapes on the whole array at once."""
    building = array == array.max()
    return [shapely.geometry.shape(g) for g, _ in shapes(array, mask=building, transform=transform)]


def assert_same_polygons(found, expected):
    assert len(found) == len(expected)
    tree = shapely.STRtree(np.asarray(expected, dtype=object))
    for geom in found:
        assert any(shapely.equals(geom, expected[j]) for j in tree.query(geom, predicate="intersects"))


def tricky_mask():
    """Buildings across the corners and edges of 16 px blocks, with holes, and a diagonal-only contact."""
    mask = np.zeros((48, 48), np.uint8)
    mask[10:22, 10:22] = 1  # across the corner (16, 16)
    mask[13:19, 13:19] = 0  # courtyard around the same corner
    mask[2:8, 12:40] = 1  # across two vertical borders (16 and 32)
    mask[26:32, 30:32], mask[32:38, 32:34] = 1, 1  # meet only at the corner (32, 32): two buildings
    mask[28:46, 3:14] = 1  # L-shape across the border at row 32
    mask[28:36, 3:8] = 0
    mask[40:48, 20:46] = 1  # on the raster's outer edge and across border 32
    mask[42:46, 30:34] = 0  # courtyard cut by the border at column 32
    return mask


# rasterio silences this warning of its in-memory datasets with warnings.catch_warnings(), which is not
# thread-safe: with blocks on a thread pool, one thread's exit from it can let another's warning through.
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_blockwise_equals_whole_raster_on_dask(tmp_path, client, executor):
    mask = tricky_mask()
    path = write_raster(tmp_path / "mask.tif", mask)
    found = vectorize(path, block=16, executor=executor)
    expected = whole_raster_polygons(mask, UTM_ORIGIN)
    assert len(found) == 6
    assert_same_polygons(found.geometry.values, expected)
    assert shapely.is_valid(found.geometry.values).all()
    assert sorted(len(p.interiors) for p in found.geometry) == [0] * 4 + [1, 1]
    # a scheduler address, any other executor and a single in-process block give the same polygons
    with dask_executor(client.scheduler.address) as by_address:
        assert_same_polygons(vectorize(path, block=7, executor=by_address).geometry.values, expected)
    with ThreadPoolExecutor(2) as threads:
        assert_same_polygons(vectorize(path, VectorizeOptions(block=5), executor=threads).geometry.values, expected)
    assert_same_polygons(vectorize(path, block=4096).geometry.values, expected)
    assert list(found["id"]) == list(range(1, 7))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), height=st.integers(1, 30), width=st.integers(1, 30),
       density=st.floats(0.1, 0.9), block=st.integers(1, 12))
def test_merged_blocks_equal_whole_polygonisation(seed, height, width, density, block):
    mask = np.random.default_rng(seed).random((height, width)) < density
    whole = polygonize_pixels(mask)
    inside, pieces = [], []
    for window in block_windows(width, height, block):
        rows, cols = window.toslices()
        part, _ = building_pixels(mask[rows, cols].astype(np.uint8), None, window)
        polys = polygonize_pixels(part, window.col_off, window.row_off)
        edge = on_inner_border(polys, window, width, height)
        inside.append(polys[~edge])
        pieces.append(polys[edge])
    merged, group = merge_pieces(np.concatenate(pieces))
    assert len(group) == sum(len(p) for p in pieces)
    found = np.concatenate([*inside, merged])
    assert_same_polygons(found, whole)
    assert np.isclose(shapely.area(found).sum(), mask.sum())


@pytest.mark.parametrize(("building", "nodata"), [(255, 7), (1, 255)])  # 0/1 with nodata 255: inference's
def test_holes_kept_both_conventions_nodata_ignored(tmp_path, building, nodata):
    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:35] = building
    mask[15:25, 15:25] = 0  # courtyard across the 20 px block corner
    mask[0, :] = nodata  # ignored
    path = write_raster(tmp_path / "mask.tif", mask, nodata=nodata)
    found = vectorize(path, block=20)
    assert len(found) == 1
    (building,) = found.geometry
    assert len(building.interiors) == 1
    assert building.area == pytest.approx((900 - 100) * 0.25)


def test_synth_scene_footprints_round_trip(tmp_path, executor):
    from rsseg.synth.generate import make_scene

    footprints = make_scene(tmp_path / "scene.tif", size=1024, crs=UTM, seed=3)
    with rasterio.open(tmp_path / "scene.tif") as src:
        fine = src.transform @ Affine.scale(1 / 4)  # 4x finer grid: 7.5 cm pixels
    mask = rasterize(footprints.geometry, out_shape=(4096, 4096), transform=fine, dtype="uint8")
    path = write_raster(tmp_path / "mask.tif", mask, transform=fine)
    found = vectorize(path, block=1024, executor=executor).geometry.values
    truth = footprints.geometry.values
    i, j = shapely.STRtree(found).query(truth, predicate="intersects")
    overlap = shapely.area(shapely.intersection(truth[i], found[j]))
    iou = overlap / (shapely.area(truth[i]) + shapely.area(found[j]) - overlap)
    best = np.zeros(len(truth))
    np.maximum.at(best, i, iou)
    assert len(found) == len(truth) > 20
    assert best.min() >= 0.98


def geodesic_area(geom, crs):
    lonlat = shapely.transform(geom, lambda xy: np.column_stack(
        Transformer.from_crs(crs, 4326, always_xy=True).transform(xy[:, 0], xy[:, 1])))
    return abs(Geod(ellps="WGS84").geometry_area_perimeter(lonlat)[0])


@pytest.mark.parametrize(("crs", "transform"), [
    (UTM, UTM_ORIGIN),
    ("EPSG:4326", from_origin(13.4, 52.5, 1e-5, 1e-5)),  # Berlin, ~0.68 m x 1.11 m pixels
    ("EPSG:3857", from_origin(1_113_195, 6_446_276, 1.0, 1.0)),  # lat 50: planar areas 2.4x too large
])
def test_area_m2_is_ground_area(tmp_path, crs, transform):
    mask = np.zeros((64, 64), np.uint8)
    mask[4:60, 10:50] = 1
    mask[20:30, 20:30] = 0
    path = write_raster(tmp_path / "mask.tif", mask, crs=crs, transform=transform)
    found = vectorize(path)
    area, true_area = found["area_m2"].iloc[0], geodesic_area(found.geometry.iloc[0], crs)
    assert area == pytest.approx(true_area, rel=0.01)
    if crs == UTM:
        assert area == pytest.approx((56 * 40 - 100) * 0.25, rel=0.01)


@pytest.mark.parametrize(("crs", "transform", "metres"), [
    (UTM, UTM_ORIGIN, 0.5),
    ("EPSG:4326", from_origin(114.3, 30.6, 5e-6, 5e-6), 0.5),
])
def test_min_area_and_simplify_in_metres(tmp_path, crs, transform, metres):
    mask = np.zeros((200, 200), np.uint8)
    mask[10:14, 10:20] = 1  # 40 px: about 10 m2
    centre = transform @ (100, 100)
    step = transform.a
    disk = shapely.Point(centre).buffer(60 * step)  # a round building, stair-stepped outline
    mask |= rasterize([disk], out_shape=mask.shape, transform=transform, dtype="uint8")
    path = write_raster(tmp_path / "mask.tif", mask, crs=crs, transform=transform)
    kept = vectorize(path, min_area=20)
    assert len(vectorize(path)) == 2
    assert len(kept) == 1 and kept["area_m2"].iloc[0] > 1000
    simple = vectorize(path, min_area=20, simplify=1.0)
    raw_geom, simple_geom = kept.geometry.iloc[0], simple.geometry.iloc[0]
    assert simple_geom.is_valid
    assert len(simple_geom.exterior.coords) < len(raw_geom.exterior.coords) / 4
    utm = CRS(kept.estimate_utm_crs())
    moved = kept.to_crs(utm).geometry.iloc[0].hausdorff_distance(simple.to_crs(utm).geometry.iloc[0])
    assert 0.3 * metres < moved <= 1.01  # simplified by about, and never more than, 1 m
    assert simple["area_m2"].iloc[0] == pytest.approx(kept["area_m2"].iloc[0], rel=0.02)


def interior_angles(polygon):
    ring = np.asarray(polygon.exterior.coords)[:-1]
    before, after = np.roll(ring, 1, axis=0) - ring, np.roll(ring, -1, axis=0) - ring
    cos = (before * after).sum(1) / np.hypot(*before.T) / np.hypot(*after.T)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_regularize_squares_rotated_buildings(tmp_path):
    outline = shapely.Polygon([(0, 0), (30, 0), (30, 12), (12, 12), (12, 24), (0, 24)])  # an L, metres
    buildings = []
    for angle, col, row in ((25, 50, 50), (-60, 140, 140)):  # 100 m x 100 m raster, 45 m apart
        turned = shapely.affinity.rotate(outline, angle, origin="centroid")
        x, y = UTM_ORIGIN @ (col, row)
        buildings.append(shapely.affinity.translate(turned, x - turned.centroid.x, y - turned.centroid.y))
    mask = rasterize(buildings, out_shape=(200, 200), transform=UTM_ORIGIN, dtype="uint8")
    path = write_raster(tmp_path / "mask.tif", mask)
    raw = vectorize(path)
    square = vectorize(path, regularize=True)
    assert len(raw) == len(square) == 2
    for before, after in zip(raw.geometry, square.geometry, strict=True):
        assert after.is_valid
        assert len(after.exterior.coords) == 7  # six right-angled corners
        assert np.allclose(interior_angles(after), 90, atol=1e-6)
        assert abs(after.area - before.area) <= 0.1 * before.area
    truth = shapely.STRtree(buildings)
    for geom in square.geometry:
        best = max(shapely.area(geom & buildings[j]) / shapely.area(geom | buildings[j])
                   for j in truth.query(geom, predicate="intersects"))
        assert best > 0.93
    # an area change beyond the limit keeps the original outline
    assert regularize_polygons(raw.geometry.values, 0.5, max_change=0.0)[0].equals(raw.geometry.iloc[0])


@settings(max_examples=40, deadline=None)
@given(angle=st.floats(-90, 90), width=st.floats(3, 40), height=st.floats(3, 40), notch=st.floats(0, 0.8),
       hole=st.booleans())
def test_regularize_keeps_valid_buildings_with_their_area(angle, width, height, notch, hole):
    shape = shapely.box(0, 0, width, height) - shapely.box(0, 0, width * notch, height * notch)
    if hole:
        shape = shape - shapely.box(width * 0.85, height * 0.4, width * 0.95, height * 0.6)
    shape = shapely.affinity.translate(shapely.affinity.rotate(shape, angle, origin="centroid"), 32, 32)
    staircase = polygonize_pixels(rasterize([shape], out_shape=(64, 64), dtype="uint8").astype(bool))
    squared = regularize_polygons(staircase, pixel=1.0)
    assert len(squared) == len(staircase)
    for before, after in zip(staircase, squared, strict=True):
        assert after.is_valid and len(after.interiors) == len(before.interiors)
        assert abs(after.area - before.area) <= 0.1 * before.area
        if not after.equals(before):  # regularised: every corner a right angle
            assert np.allclose(interior_angles(after), 90, atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_mean_probability_across_blocks(tmp_path, dtype):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:28, 6:26] = 1  # across the 16 px borders
    mask[1:3, 1:3] = 1
    gradient = np.tile(np.linspace(0, 1, 32), (32, 1))
    prob = (gradient * 255).round().astype(np.uint8) if dtype == "uint8" else gradient.astype(np.float32)
    prob[5, 7] = 1 if dtype == "uint8" else np.nan  # nodata (1 is not in the uint8 gradient)
    mask_path = write_raster(tmp_path / "mask.tif", mask)
    prob_path = write_raster(tmp_path / "prob.tif", prob, nodata=1 if dtype == "uint8" else np.nan)
    found = vectorize(mask_path, prob=prob_path, block=16)
    values = prob.astype(float) / (255 if dtype == "uint8" else 1)
    valid = np.ones(prob.shape, bool)
    valid[5, 7] = False
    big = mask.astype(bool) & valid
    big[1:3, 1:3] = False
    # rounded to 0.001 (as written): within half a unit of the exact means
    assert found["mean_prob"].tolist() == pytest.approx([values[1:3, 1:3].mean(), values[big].mean()], abs=5e-4)
    assert found["mean_prob"].tolist() == [round(v, 3) for v in found["mean_prob"]]


def ring_area(ring):
    x, y = np.asarray(ring, dtype=float).T
    return 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])


def test_geojson_is_rfc7946_with_provenance(tmp_path):
    mask = tricky_mask()
    tags = {"checkpoint_sha256": "ab12", "threshold": "0.5"}
    path = write_raster(tmp_path / "mask.tif", mask, tags=tags)
    out = tmp_path / "buildings.geojson"
    assert vectorize_to_file(path, out, block=16) == 6
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    assert doc.get("crs", {}).get("properties", {}).get("name", "CRS84").endswith("CRS84")
    assert doc["rsseg"]["threshold"] == "0.5" and doc["rsseg"]["checkpoint_sha256"] == "ab12"
    assert doc["rsseg"]["mask_crs"] == UTM and doc["rsseg"]["mask"].endswith("mask.tif")
    holes = 0
    for feature in doc["features"]:
        rings = feature["geometry"]["coordinates"]
        assert ring_area(rings[0]) > 0  # exterior counter-clockwise
        for ring in rings:
            assert ring[0] == ring[-1]
            lon, lat = np.asarray(ring).T
            assert np.all((116.9 < lon) & (lon < 117.1) & (36.0 < lat) & (lat < 36.2))
        for hole in rings[1:]:
            holes += 1
            assert ring_area(hole) < 0  # holes clockwise
        assert set(feature["properties"]) >= {"id", "area_m2"}
    assert holes == 2


def test_geojson_from_worker_blocks_is_byte_identical(tmp_path, executor):
    path = write_raster(tmp_path / "mask.tif", tricky_mask(), tags={"threshold": "0.5"})
    here, there = tmp_path / "here" / "b.geojson", tmp_path / "there" / "b.geojson"  # same layer name
    here.parent.mkdir(), there.parent.mkdir()
    assert vectorize_to_file(path, here, block=16) == 6
    assert vectorize_to_file(path, there, block=16, executor=executor) == 6
    assert there.read_bytes() == here.read_bytes()
    # rings in the wrong orientation are written RFC 7946 oriented
    clockwise = shapely.Polygon([(117, 36), (117, 36.01), (117.01, 36.01), (117.01, 36)],
                                [[(117.002, 36.002), (117.008, 36.002), (117.008, 36.008), (117.002, 36.008)]])
    wrong = gpd.GeoDataFrame({"id": [1, 2, 3]}, geometry=[clockwise] * 3, crs="EPSG:4326")
    for overwrite in (False, True):
        write_vectors(wrong, tmp_path / "wrong.geojson", overwrite=overwrite)
        for feature in json.loads((tmp_path / "wrong.geojson").read_text())["features"]:
            outer, hole = feature["geometry"]["coordinates"]
            assert ring_area(outer) > 0 > ring_area(hole)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_vectors(wrong, tmp_path / "wrong.geojson")
    empty = write_raster(tmp_path / "empty.tif", np.zeros((20, 20), np.uint8))
    assert vectorize_to_file(empty, tmp_path / "empty.geojson", block=8, executor=executor) == 0
    assert json.loads((tmp_path / "empty.geojson").read_text())["features"] == []


def test_merge_vectors_appends_scenes_in_one_crs(tmp_path):
    from rsseg.vector import merge_vectors

    path = write_raster(tmp_path / "mask.tif", tricky_mask())
    gdf = vectorize(path, block=16)
    files = [write_vectors(gdf, tmp_path / "a.gpkg"), write_vectors(gdf, tmp_path / "b.geojson")]
    merged = pyogrio.read_dataframe(merge_vectors(files, tmp_path / "all.gpkg"))
    assert len(merged) == 12 and merged.crs == CRS(4326)  # the files' CRSs differ: EPSG:4326
    assert sorted(set(merged["scene"])) == ["a", "b"]
    assert merged.to_crs(UTM).area.sum() == pytest.approx(2 * gdf.area.sum(), rel=1e-3)  # GeoJSON: 7 decimals


def test_options_are_validated_once(tmp_path):
    path = write_raster(tmp_path / "mask.tif", tricky_mask())
    with pytest.raises(ConfigError, match="min_aera"):
        vectorize(path, min_aera=3)
    with pytest.raises(ConfigError, match="block"):
        vectorize(path, VectorizeOptions(), block=0)
    assert len(vectorize(path, VectorizeOptions(min_area=10), block=16)) == 4
    with pytest.raises(RasterError, match="no such file"):  # an OSError too
        vectorize(tmp_path / "missing.tif")


def test_gpkg_and_fgb_keep_source_crs_and_metadata(tmp_path):
    path = write_raster(tmp_path / "mask.tif", tricky_mask(), tags={"threshold": "0.4"})
    gdf = vectorize(path, block=16)
    for name in ("b.gpkg", "b.fgb"):
        write_vectors(gdf, tmp_path / name)
        back = pyogrio.read_dataframe(tmp_path / name)
        assert back.crs == CRS(UTM) and len(back) == 6
        assert sorted(back["id"]) == list(range(1, 7))
        meta = pyogrio.read_info(tmp_path / name)["layer_metadata"]
        assert meta["rsseg_threshold"] == "0.4" and meta["rsseg_mask"].endswith("mask.tif")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_empty_mask_gives_empty_layers(tmp_path):
    path = write_raster(tmp_path / "mask.tif", np.zeros((20, 20), np.uint8))
    for name in ("b.geojson", "b.gpkg"):
        assert vectorize_to_file(path, tmp_path / name, block=8) == 0
        assert len(pyogrio.read_dataframe(tmp_path / name)) == 0
    assert vectorize_to_file(path, tmp_path / "b.parquet", block=8) == 0
    empty = read_vectors(tmp_path / "b.parquet")
    assert len(empty) == 0 and empty.crs == CRS(UTM) and list(empty.columns) == ["id", "area_m2", "geometry"]
    assert json.loads((tmp_path / "b.geojson").read_text())["features"] == []


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr()


def test_cli_vectorize_writes_and_reports(tmp_path):
    path = write_raster(tmp_path / "mask.tif", tricky_mask())
    result = CliRunner().invoke(cli, ["vectorize", str(path), str(tmp_path / "b.geojson"), "--min-area", "10",
                                      "--block", "16", "--scheduler", "sync"], catch_exceptions=False)
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["buildings"] == len(pyogrio.read_dataframe(tmp_path / "b.geojson")) == 4  # two 3 m2 dropped


def test_cli_vectorize_refuses_existing_output_unless_overwrite(tmp_path, capsys, monkeypatch):
    import rsseg.pipeline.cluster

    schedulers = []
    real = rsseg.pipeline.cluster.dask_executor
    monkeypatch.setattr(rsseg.pipeline.cluster, "dask_executor", lambda s: schedulers.append(s) or real(s))
    path = write_raster(tmp_path / "mask.tif", tricky_mask())
    out = tmp_path / "b.gpkg"
    out.write_text("earlier result\n")
    code, captured = run_cli(capsys, "vectorize", str(path), str(out), "--scheduler", "sync")
    assert code == 2 and "exists" in captured.err and "--overwrite" in captured.err
    assert out.read_text() == "earlier result\n"  # untouched
    result = CliRunner().invoke(cli, ["vectorize", str(path), str(out), "--overwrite"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.stdout)["buildings"] == 6
    assert schedulers == ["sync"]  # one block: in this process, no LocalCluster
    assert len(pyogrio.read_dataframe(out)) == 6


@pytest.mark.parametrize(("case", "message"), [
    ("text", "not a raster"),
    ("no_crs", "no CRS"),
    ("probabilities", "pixel values 17, 200"),
    ("mixed", "0/1 or 0/255"),
    ("shp", "supported: .geojson, .json, .gpkg, .fgb"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, case, message):
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 2:5] = 1
    out = tmp_path / ("b.shp" if case == "shp" else "b.geojson")
    path = tmp_path / "mask.tif"
    if case == "text":
        path.write_text("not a raster\n")
    elif case == "no_crs":
        write_raster(path, mask, crs=None)
    elif case == "probabilities":
        mask[10, 10], mask[11, 11] = 17, 200
        write_raster(path, mask)
    elif case == "mixed":  # 1 in one window, 255 in another
        mask[10:12, 10:12] = 255
        write_raster(path, mask)
    else:
        write_raster(path, mask)
    code, captured = run_cli(capsys, "vectorize", str(path), str(out), "--block", "8", "--scheduler", "sync")
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rsseg: error:") and message in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------- GIS-grade outputs
def scene_with_prob(tmp_path, name="scene_a", tags=None):
    """A mask (in a geographic CRS, so that areas are not round numbers) and a float probability raster."""
    transform = from_origin(13.4, 52.5, 7e-6, 7e-6)
    mask_path = write_raster(tmp_path / f"{name}.tif", tricky_mask(), crs="EPSG:4326", transform=transform,
                             tags=tags)
    gradient = np.tile(np.linspace(0.3, 0.9, 48, dtype=np.float32) ** 0.5, (48, 1))
    prob_path = write_raster(tmp_path / f"{name}.prob.tif", gradient, crs="EPSG:4326", transform=transform)
    return mask_path, prob_path


def test_geoparquet_equals_gpkg_with_bbox_covering(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    mask, prob = scene_with_prob(tmp_path, tags={"threshold": "0.5"})
    gdf = vectorize(mask, prob=prob, block=16)
    gpkg = write_vectors(gdf, tmp_path / "b.gpkg")
    assert vectorize_to_file(mask, tmp_path / "b.parquet", prob=prob, block=16) == 6
    back, ref = gpd.read_parquet(tmp_path / "b.parquet"), pyogrio.read_dataframe(gpkg)
    assert back.crs == CRS("EPSG:4326") == ref.crs  # the source CRS, kept
    assert list(back.columns) == ["id", "area_m2", "mean_prob", "geometry"]
    for column in ("id", "area_m2", "mean_prob"):
        assert back[column].tolist() == ref[column].tolist()
    assert back.geometry.geom_equals_exact(ref.geometry, tolerance=0).all()
    geo = json.loads(pq.read_schema(tmp_path / "b.parquet").metadata[b"geo"])
    assert geo["version"] == "1.1.0"
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    bbox = pq.read_table(tmp_path / "b.parquet", columns=["bbox"]).column("bbox").to_pylist()
    assert [[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in bbox] == back.bounds.to_numpy().tolist()
    provenance = back.attrs["provenance"]
    assert provenance["mask"] == "scene_a.tif" and provenance["prob"] == "scene_a.prob.tif"
    assert provenance["mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert provenance["threshold"] == "0.5"
    with pytest.raises(FileExistsError, match="overwrite"):
        vectorize_to_file(mask, tmp_path / "b.parquet")
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


def test_attributes_rounded_and_no_local_paths(tmp_path):
    import re

    mask, prob = scene_with_prob(tmp_path, tags={"source": str(tmp_path / "scenes" / "scene_a.tif")})
    out = tmp_path / "b.geojson"
    assert vectorize_to_file(mask, out, prob=prob, block=16) == 6
    text = out.read_text()
    properties = [f["properties"] for f in json.loads(text)["features"]]
    assert all(0 < p["mean_prob"] < 1 and p["area_m2"] > 0 for p in properties)
    for key, decimals in (("area_m2", 2), ("mean_prob", 3)):
        written = re.findall(rf'"{key}": ([0-9.]+)', text)
        assert len(written) == 6 and all(len(v.partition(".")[2]) <= decimals for v in written), written
    assert len({p["mean_prob"] for p in properties}) > 1
    assert str(tmp_path) not in text  # neither the mask's, the probabilities' nor the tagged source's path
    assert json.loads(text)["rsseg"]["source"] == "scene_a.tif"
    write_vectors(vectorize(mask, prob=prob, block=16), tmp_path / "b.gpkg")
    meta = pyogrio.read_info(tmp_path / "b.gpkg")["layer_metadata"]
    assert meta["rsseg_mask"] == "scene_a.tif" and len(meta["rsseg_mask_sha256"]) == 64
    assert not any(str(tmp_path) in value for value in meta.values())


@pytest.mark.parametrize("merged_name", ["all.gpkg", "all.parquet", "all.fgb"])
def test_merged_ids_unique_across_scenes(tmp_path, merged_name):
    import hashlib

    from rsseg.errors import VectorError
    from rsseg.vector import merge_vectors

    files = []
    for name in ("scene_a", "scene_b"):
        mask, prob = scene_with_prob(tmp_path, name)
        files.append(tmp_path / f"{name}.gpkg")
        vectorize_to_file(mask, files[-1], prob=prob, block=16)
    out = merge_vectors(files, tmp_path / merged_name)
    merged = gpd.read_parquet(out) if out.suffix == ".parquet" else pyogrio.read_dataframe(out)
    merged = merged.sort_values(["scene", "number"], ignore_index=True)  # FlatGeobuf orders by its index
    assert merged.crs == CRS("EPSG:4326") and len(merged) == 12  # the files' shared CRS
    assert merged["id"].is_unique and merged["id"].tolist()[:2] == ["scene_a-1", "scene_a-2"]
    assert merged["id"].tolist()[6] == "scene_b-1"
    assert merged["number"].tolist() == [*range(1, 7)] * 2 and merged["number"].dtype.kind == "i"
    assert merged["scene"].tolist() == ["scene_a"] * 6 + ["scene_b"] * 6
    one = pyogrio.read_dataframe(files[0])
    assert merged["area_m2"].tolist()[:6] == one["area_m2"].tolist()
    assert merged["mean_prob"].tolist()[:6] == one["mean_prob"].tolist()
    if out.suffix == ".parquet":
        sources = json.loads(merged.attrs["provenance"]["sources"])
    else:
        sources = json.loads(pyogrio.read_info(out)["layer_metadata"]["rsseg_sources"])
    assert sources == [{"scene": f.stem, "file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                       for f in files]
    (tmp_path / "other").mkdir()
    twin = write_vectors(one, tmp_path / "other" / "scene_a.gpkg")
    with pytest.raises(VectorError, match="scene_a come from more than one file"):
        merge_vectors([files[0], twin], tmp_path / "twice.gpkg")


def test_cli_vectorize_geoparquet(tmp_path):
    path = write_raster(tmp_path / "mask.tif", tricky_mask())
    result = CliRunner().invoke(cli, ["vectorize", str(path), str(tmp_path / "b.parquet"), "--min-area", "10",
                                      "--block", "16", "--scheduler", "sync"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.stdout)["buildings"] == 4
    back = gpd.read_parquet(tmp_path / "b.parquet")
    assert len(back) == 4 and back.crs == CRS(UTM) and (back["area_m2"] >= 10).all()


def test_merged_geoparquet_equals_merged_gpkg(tmp_path):
    from rsseg.vector import merge_vectors

    files = []
    for name, crs in (("north", UTM), ("south", UTM)):
        gdf = vectorize(write_raster(tmp_path / f"{name}.tif", tricky_mask(), crs=crs), block=16)
        files.append(write_vectors(gdf, tmp_path / f"{name}.fgb"))
    parquet = read_vectors(merge_vectors(files, tmp_path / "all.parquet"))
    gpkg = read_vectors(merge_vectors(files, tmp_path / "all.gpkg"))
    assert parquet.crs == gpkg.crs == CRS(UTM)  # the files' shared CRS
    assert list(parquet.columns) == list(gpkg.columns) == ["id", "scene", "number", "area_m2", "geometry"]
    parquet, gpkg = (df.sort_values("id", ignore_index=True) for df in (parquet, gpkg))
    assert parquet.drop(columns="geometry").equals(gpkg.drop(columns="geometry"))
    assert parquet.geometry.geom_equals_exact(gpkg.geometry, tolerance=0).all()
    assert parquet["id"].is_unique and len(parquet) == 12


def test_a_served_mask_vectorizes_like_the_local_one(tmp_path, http_root, monkeypatch):
    root, url, requests = http_root
    local = write_raster(tmp_path / "mask.tif", tricky_mask(), tags={"source": "scene.tif"})
    gradient = np.tile(np.linspace(0, 1, tricky_mask().shape[1], dtype=np.float32), (tricky_mask().shape[0], 1))
    prob = write_raster(tmp_path / "mask.prob.tif", gradient)
    (root / "bucket").mkdir()
    for path in (local, prob):
        (root / "bucket" / path.name).write_bytes(path.read_bytes())
    expected = vectorize(local, prob=prob, block=16, min_area=1)
    got = vectorize(f"/vsicurl/{url}/bucket/mask.tif", prob=f"/vsicurl/{url}/bucket/mask.prob.tif", block=16,
                    min_area=1)
    assert any(r[2] for r in requests if r[1] == "/bucket/mask.tif"), "read with Range requests"
    assert len(got) == len(expected) > 0
    assert_same_polygons(got.geometry, list(expected.geometry))
    assert got["mean_prob"].tolist() == expected["mean_prob"].tolist()
    provenance = got.attrs["provenance"]
    assert provenance["mask"] == "mask.tif" and provenance["prob"] == "mask.prob.tif"
    assert "mask_sha256" not in provenance and provenance["source"] == "scene.tif"
    assert provenance == {k: v for k, v in expected.attrs["provenance"].items() if not k.endswith("_sha256")}
    # s3:// through the CLI, kept as given (Path() would turn it into s3:/bucket/mask.tif)
    for key, value in dict(AWS_S3_ENDPOINT=url.removeprefix("http://"), AWS_HTTPS="NO", AWS_VIRTUAL_HOSTING="FALSE",
                           AWS_NO_SIGN_REQUEST="YES", AWS_REGION="us-east-1").items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, ["vectorize", "s3://bucket/mask.tif", str(tmp_path / "s3.gpkg"), "--block",
                                      "16", "--min-area", "1", "--prob", "s3://bucket/mask.prob.tif",
                                      "--scheduler", "sync"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["buildings"] == len(expected)
    assert_same_polygons(read_vectors(tmp_path / "s3.gpkg").geometry, list(expected.geometry))
