"""Tests of the generated data (rsseg.synth.generate): scenes and the Tianchi-layout dataset."""

from __future__ import annotations

import json
import re
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from conftest import run_rsseg as _rsseg  # (exit code, stdout, stderr)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from rasterio.features import rasterize

from rsseg.cli import cli
from rsseg.errors import ConfigError
from rsseg.fileio import file_sha256
from rsseg.synth.generate import footprints_path, make_scene, make_tianchi
from rsseg.synth.layout import place, random_style
from rsseg.synth.render import Renderer
from rsseg.tianchi import rle


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
    make_scene(a, size=1100, seed=7, window=512, progress=False)
    make_scene(b, size=1100, seed=7, window=1024, progress=False)
    make_scene(c, size=1100, seed=8, window=1024, progress=False)
    with rasterio.open(a) as sa, rasterio.open(b) as sb, rasterio.open(c) as sc:
        pa, pb, pc = sa.read(), sb.read(), sc.read()
    np.testing.assert_array_equal(pa, pb)  # two window sizes, identical pixels
    assert (pa != pc).mean() > 0.5
    assert file_sha256(footprints_path(a)) == file_sha256(footprints_path(b))
    assert file_sha256(footprints_path(a)) != file_sha256(footprints_path(c))


@pytest.fixture(scope="module")
def small_scene():
    rng = np.random.default_rng(9)
    style = random_style(rng, urban_scale_px=600)
    layout = place(style, (0, 0, 400, 400), 0.3, rng, keep_within=shapely.box(0, 0, 400, 400),
                   valid=shapely.Point(200, 200).buffer(190))
    renderer = Renderer(layout, style)
    return renderer, renderer.render(0, 0, 400, 400)


@settings(max_examples=25, deadline=None)
@given(row0=st.integers(0, 399), col0=st.integers(0, 399), height=st.integers(1, 120), width=st.integers(1, 120))
def test_any_window_equals_the_crop_of_the_whole(small_scene, row0, col0, height, width):
    renderer, whole = small_scene
    height, width = min(height, 400 - row0), min(width, 400 - col0)
    part = renderer.render(row0, col0, height, width)
    np.testing.assert_array_equal(part.rgb, whole.rgb[:, row0:row0 + height, col0:col0 + width])
    np.testing.assert_array_equal(part.buildings, whole.buildings[row0:row0 + height, col0:col0 + width])


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
     ({"window": 300}, "window=300"), ({"compress": "jpeg"}, "compress='jpeg'")],
)
def test_scene_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_scene(tmp_path / "x.tif", **kwargs)
    assert not list(tmp_path.iterdir())


def test_cli_scene_bad_input(tmp_path):
    out = tmp_path / "x.tif"
    for args, match in ((["--size", "0"], "size=0"), (["--crs", "EPSG:999999"], "EPSG:999999"),
                        (["--window", "300"], "window=300")):
        code, _, stderr = _rsseg("synth", "scene", out, *args)
        assert code == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rsseg: error:"), stderr
        assert match in lines[0]
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- tianchi
NAME = re.compile(r"^[0-9A-Z]{10}\.jpg$")


@pytest.fixture(scope="module")
def tianchi_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tc") / "data"
    info = make_tianchi(out, n_train=17, n_test=9, seed=3, progress=False)
    return out, info


def _rows(path):
    text = path.read_text(encoding="ascii")
    assert text.endswith("\n") and "\r" not in text
    rows = [line.split("\t") for line in text.splitlines()]
    assert all(len(row) == 2 for row in rows), "expected exactly one tab per row"
    return rows


def test_tianchi_layout(tianchi_dir):
    out, info = tianchi_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "test_a", "test_a_mask.csv", "test_a_samplesubmit.csv", "train", "train_mask.csv"]
    assert info["n_train"] == 17 and info["n_test"] == 9
    assert info["sample_submission"] == out / "test_a_samplesubmit.csv"
    for split, truth, n in (("train", "train_mask.csv", 17), ("test_a", "test_a_mask.csv", 9)):
        files = sorted(p.name for p in (out / split).iterdir())
        rows = _rows(out / truth)
        assert [name for name, _ in rows] == files and len(files) == n
        assert all(NAME.match(name) for name in files)
        assert sum(code == "" for _, code in rows) >= 1  # some images have no building
        assert sum(code != "" for _, code in rows) >= n - 3
        for name, code in rows:
            mask = rle.decode(code)
            assert mask.shape == (512, 512) and mask.any() == (code != "")
            with Image.open(out / split / name) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (512, 512))
    names = [p.name for p in (out / "train").iterdir()] + [p.name for p in (out / "test_a").iterdir()]
    assert len(set(names)) == len(names)
    sample = _rows(out / "test_a_samplesubmit.csv")
    assert [name for name, _ in sample] == sorted(p.name for p in (out / "test_a").iterdir())
    assert all(code == "" for _, code in sample)
    assert info["n_train_empty"] == sum(code == "" for _, code in _rows(out / "train_mask.csv"))


def test_tianchi_masks_match_pixels(tianchi_dir):
    out, _ = tianchi_dir
    name, code = next((n, c) for n, c in _rows(out / "train_mask.csv") if c)
    mask = rle.decode(code).astype(bool)
    with Image.open(out / "train" / name) as im:
        rgb = np.asarray(im, dtype=np.float32)
    # the column-major convention: the mask is not transposed relative to the image
    edges = np.abs(np.diff(rgb.mean(axis=2), axis=1)) > 20
    mask_edges = np.diff(mask.astype(np.int8), axis=1) != 0
    assert edges[mask_edges].mean() > 2 * edges[np.diff(mask.T.astype(np.int8), axis=1) != 0].mean()


def test_tianchi_deterministic(tianchi_dir, tmp_path):
    out, _ = tianchi_dir
    again = tmp_path / "again"
    with ProcessPoolExecutor(2) as pool:  # rendered in chunks on other processes: the same bytes
        make_tianchi(again, n_train=17, n_test=9, seed=3, progress=False, executor=pool)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all(file_sha256(out / f) == file_sha256(again / f) for f in files)
    other = tmp_path / "other"
    make_tianchi(other, n_train=3, n_test=1, seed=4, progress=False)
    assert (other / "train_mask.csv").read_bytes() != (again / "train_mask.csv").read_bytes()


def test_tianchi_refuses_non_empty_dir(tianchi_dir, tmp_path):
    out, _ = tianchi_dir
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        make_tianchi(out, n_train=2, n_test=1)
    with pytest.raises(ConfigError, match="n_train=0"):
        make_tianchi(tmp_path / "none", n_train=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    info = make_tianchi(empty, n_train=2, n_test=0, seed=1, progress=False)
    assert info["n_test"] == 0 and (empty / "test_a_samplesubmit.csv").read_text() == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    code, _, stderr = _rsseg("synth", "tianchi", out)
    assert code == 2
    assert stderr.strip().splitlines() == [f"rsseg: error: {out} exists and is not empty; "
                                           "remove it or choose another output folder"]
    code, _, stderr = _rsseg("synth", "tianchi", tmp_path / "none", "--n-test", "-1")
    assert code == 2 and "n_test=-1: expected 0 or more test images" in stderr


def test_cli_synth_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["synth", "tianchi", str(tmp_path / "tc"), "--n-train", "2", "--n-test", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_train"] == 2
    result = runner.invoke(cli, ["synth", "scene", str(tmp_path / "s.tif"), "--size", "300", "--seed", "1",
                                 "--nodata-border"])
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "s.tif") as src:
        assert src.nodata == 0
    assert json.loads(result.output)["buildings"] == len(pyogrio.read_dataframe(tmp_path / "s.buildings.geojson"))


def test_options_are_defined_once(tmp_path):
    from rsseg.pipeline.stages import SynthSceneParams, SynthTianchiParams
    from rsseg.synth.options import SceneOptions, TianchiOptions

    assert SynthTianchiParams().model_dump() == TianchiOptions().model_dump()
    assert SynthSceneParams().model_dump(exclude={"count"}) == SceneOptions().model_dump()
    for command, model in (("scene", SceneOptions), ("tianchi", TianchiOptions)):
        text = CliRunner().invoke(cli, ["synth", command, "--help"]).output
        assert all(f"--{name.replace('_', '-')}" in text for name in model.model_fields), text
    with pytest.raises(ValueError, match="n_train=0: expected at least 1"):
        SynthTianchiParams(n_train=0)
    options = SceneOptions(size=64, seed=1, crs="EPSG:4326")
    a = make_scene(tmp_path / "a.tif", options, progress=False)
    b = make_scene(tmp_path / "b.tif", options, seed=2, progress=False)  # keywords override the options
    with rasterio.open(tmp_path / "a.tif") as sa, rasterio.open(tmp_path / "b.tif") as sb:
        assert sa.crs.to_epsg() == sb.crs.to_epsg() == 4326 and (sa.read() != sb.read()).any()
    assert list(a.columns) == list(b.columns)
