"""Tests of the generated data (rsseg.synth): scenes and the Tianchi-layout dataset."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.features import rasterize

from rsseg.errors import ConfigError
from rsseg.fileio import file_sha256
from rsseg.synth import footprints_path, make_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    footprints = make_scene(path, size=1100, seed=5, progress=False)
    return path, footprints


def test_scene_is_tiled_compressed_georeferenced(scene):
    path, footprints = scene
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.count, src.dtypes) == (1100, 1100, 3, ("uint8",) * 3)
        assert src.profile["tiled"] and src.block_shapes == [(512, 512)] * 3
        assert src.compression.name.lower() == "deflate"
        assert src.crs.to_epsg() == 32650
        assert src.transform.a == pytest.approx(0.3) and src.transform.e == pytest.approx(-0.3)
        assert src.transform.b == src.transform.d == 0
        # near Wuhan: UTM 50N easting ~240 km, northing ~3387 km
        assert 200_000 < src.transform.c < 300_000 and 3_350_000 < src.transform.f < 3_420_000
        assert src.nodata is None
    assert len(footprints) > 20
    assert footprints.crs.to_epsg() == 32650
    assert set(footprints["kind"]) == {"rect", "L"}
    assert footprints.geometry.is_valid.all()
    i, j = shapely.STRtree(footprints.geometry.values).query(footprints.geometry.values, predicate="intersects")
    assert (i == j).all(), "buildings overlap"


def test_footprints_land_on_roofs(scene):
    path, footprints = scene
    with rasterio.open(path) as src:
        rgb = src.read().astype(np.float32)
        labels = rasterize(zip(footprints.geometry, footprints["id"] + 1, strict=True), out_shape=src.shape,
                           transform=src.transform, fill=0, dtype="int32")
        near = rasterize(zip(footprints.buffer(1.2), footprints["id"] + 1, strict=True), out_shape=src.shape,
                         transform=src.transform, fill=0, dtype="int32")
    # every building is drawn and its pixels differ from a ring of ground around it
    distinct = 0
    for fid in footprints["id"]:
        roof = labels == fid + 1
        assert roof.any(), f"building {fid} covers no pixel"
        ring = (near == fid + 1) & (labels == 0)
        inside = np.median(rgb[:, roof], axis=1)
        outside = np.median(rgb[:, ring], axis=1)
        distinct += np.abs(inside - outside).max() > 12
    assert distinct >= 0.85 * len(footprints)
    # no two buildings overlap: their areas add up to the labelled area
    assert np.count_nonzero(labels) == pytest.approx(footprints.area.sum() / 0.09, rel=0.01)


def test_footprints_geojson_in_wgs84(scene):
    path, footprints = scene
    back = pyogrio.read_dataframe(footprints_path(path))
    assert back.crs.to_epsg() == 4326
    assert list(back["id"]) == list(footprints["id"])
    assert list(back["kind"]) == list(footprints["kind"])
    lon, lat = back.geometry.union_all().centroid.coords[0]
    assert 113 < lon < 116 and 29 < lat < 32
    np.testing.assert_allclose(back.to_crs(32650).area, footprints.area, rtol=2e-3)  # 7 decimals, ~1 cm


def test_scene_deterministic_and_seamless(tmp_path):
    a, b, c = (tmp_path / name / "s.tif" for name in "abc")
    make_scene(a, size=1100, seed=7, block=512, progress=False)
    make_scene(b, size=1100, seed=7, block=1024, progress=False)
    make_scene(c, size=1100, seed=8, block=1024, progress=False)
    with rasterio.open(a) as sa, rasterio.open(b) as sb, rasterio.open(c) as sc:
        pa, pb, pc = sa.read(), sb.read(), sc.read()
    np.testing.assert_array_equal(pa, pb)  # two block sizes, identical pixels
    assert (pa != pc).mean() > 0.5
    assert file_sha256(footprints_path(a)) == file_sha256(footprints_path(b))
    assert file_sha256(footprints_path(a)) != file_sha256(footprints_path(c))


def test_nodata_collar(tmp_path):
    path = tmp_path / "collar.tif"
    footprints = make_scene(path, size=600, seed=2, nodata_border=True, progress=False)
    with rasterio.open(path) as src:
        assert src.nodata == 0
        rgb = src.read()
        mask = src.dataset_mask()
        labels = rasterize(footprints.geometry, out_shape=src.shape, transform=src.transform)
    nodata = (rgb == 0).all(axis=0)
    np.testing.assert_array_equal(mask == 0, nodata)
    assert nodata[0].any() and nodata[-1].any() and nodata[:, 0].any() and nodata[:, -1].any()
    assert 0.05 < nodata.mean() < 0.45
    # irregular: the collar width varies along each edge
    widths = np.argmin(nodata, axis=1)
    assert widths.std() > 1
    assert not (labels.astype(bool) & nodata).any()
    assert (rgb[:, ~nodata] > 0).any(axis=0).all()


def test_scene_geographic_crs(tmp_path):
    footprints = make_scene(tmp_path / "geo.tif", size=64, crs="EPSG:4326", seed=1, progress=False)
    with rasterio.open(tmp_path / "geo.tif") as src:
        assert src.crs.to_epsg() == 4326
        assert src.transform.a == pytest.approx(0.3 / 111_320)
        assert 113 < src.transform.c < 116
    assert footprints.crs.to_epsg() == 4326


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 0}, "size=0"), ({"crs": "EPSG:999999"}, "EPSG:999999"), ({"gsd": -1.0}, "gsd=-1.0"),
     ({"block": 300}, "block=300")],
)
def test_scene_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_scene(tmp_path / "x.tif", **kwargs)
    assert not list(tmp_path.iterdir())


def test_cli_scene_bad_input(tmp_path):
    out = tmp_path / "x.tif"
    for args in (["--size", "0"], ["--crs", "EPSG:999999"]):
        proc = subprocess.run([sys.executable, "-m", "rsseg.cli", "synth", "scene", str(out), *args],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rsseg: error:"), proc.stderr
