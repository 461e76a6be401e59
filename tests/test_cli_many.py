"""Many inputs per call: :func:`rsseg.fileio.expand_paths` and ``rsseg tile`` / ``rsseg vectorize`` over several
scenes or masks (a folder, a glob, a list) with one cluster, ``{stem}`` patterns, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.transform import Affine

from rsseg.errors import ConfigError
from rsseg.fileio import expand_paths, fill_stem, stem_of
from rsseg.pipeline import cluster
from rsseg.tiling import write_chips


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_expand_paths_files_folders_globs_lists_and_remote_names(tmp_path: Path) -> None:
    a, b, c = tmp_path / "d" / "b.tif", tmp_path / "d" / "a.TIFF", tmp_path / "d" / "sub" / "c.tif"
    _touch(a, b, c, tmp_path / "d" / ".hidden.tif", tmp_path / "d" / "notes.txt")
    assert expand_paths(a) == [a] and expand_paths(str(a)) == [a]
    assert expand_paths(tmp_path / "d") == [b, a]  # sorted, suffix case-insensitive, hidden and other files out
    assert expand_paths(f"{tmp_path}/d/*.tif") == [a]
    assert expand_paths(f"{tmp_path}/d/**/*.tif") == [a, c]
    assert expand_paths([a, tmp_path / "d", f"{tmp_path}/d/sub/*"]) == [a, b, c]  # each once, in order
    assert expand_paths(tmp_path / "d", suffixes=(".txt",)) == [tmp_path / "d" / "notes.txt"]
    remote = ["/vsicurl/https://host/a//b.tif?sig=1", "s3://bucket/k.tif", "gs://b/k.tif", "/vsis3/b/k.tif",
              "https://host/x.tif"]
    assert expand_paths(remote) == remote and all(isinstance(n, str) for n in expand_paths(remote))
    assert expand_paths([remote[1], a]) == [remote[1], a]


def test_expand_paths_errors_name_the_entry(tmp_path: Path) -> None:
    _touch(tmp_path / "empty" / "x.txt")
    cases = {str(tmp_path / "missing.tif"): "no such file or folder",
             f"{tmp_path}/*.jp2": "the pattern matches no file",
             str(tmp_path / "empty"): "the folder holds no .tif/.tiff file"}
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=message) as exc:
            expand_paths(spec)
        assert spec in str(exc.value) and isinstance(exc.value, ValueError)
    with pytest.raises(ConfigError, match="no inputs given"):
        expand_paths([])


def test_remote_names_and_stems_live_in_fileio(tmp_path: Path) -> None:
    assert stem_of("/vsicurl/https://host/a/scene_1.tif?sig=x/y") == "scene_1" == stem_of(tmp_path / "scene_1.tif")
    _touch(tmp_path / "labels" / "a.geojson")
    assert fill_stem(f"{tmp_path}/labels/{{stem}}.geojson", "a") == tmp_path / "labels" / "a.geojson"
    assert fill_stem("s3://b/{stem}.geojson", "a") == "s3://b/a.geojson"
    with pytest.raises(ConfigError, match=r"b\.geojson does not exist \(for the input 'b'\)"):
        fill_stem(f"{tmp_path}/labels/{{stem}}.geojson", "b")
    with pytest.raises(ConfigError, match="at most the field"):
        fill_stem(f"{tmp_path}/{{name}}.geojson", "a")


# ------------------------------------------------------------------------------------------ rsseg tile
def _index(folder: Path) -> tuple[str, dict]:
    meta = json.loads((folder / "index.json").read_text())
    return (folder / "index.csv").read_text(), {k: meta[k] for k in ("scene", "size", "overlap", "band_stats")}


@pytest.fixture
def clusters(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The scheduler of each ``dask_executor`` the commands start (one per call, whatever the inputs)."""
    started, real = [], cluster.dask_executor

    def counting(scheduler: str | None = None, *args: object, **kwargs: object) -> object:
        started.append(scheduler)
        return real(scheduler, *args, **kwargs)

    monkeypatch.setattr(cluster, "dask_executor", counting)
    return started


def test_tile_several_scenes_one_cluster_stem_folders(scenes_dir: Path, tmp_path: Path, rsseg_cli, clusters,
                                                      dask_cluster: str) -> None:
    opts = ["--size", "128", "--overlap", "16", "--scheduler", dask_cluster]
    labels = f"{scenes_dir}/{{stem}}.buildings.geojson"
    for name, inputs in {"folder": [scenes_dir], "glob": [f"{scenes_dir}/scene_*.tif"],
                         "list": sorted(scenes_dir.glob("*.tif"))}.items():
        out = tmp_path / name
        result = rsseg_cli("tile", *inputs, out, "--labels", labels, *opts)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.split() == [str(out / f"scene_00{i}" / "index.csv") for i in range(2)], name
        assert sorted(p.name for p in out.iterdir()) == ["scene_000", "scene_001"]
    assert clusters == [dask_cluster] * 3  # one cluster per call, for all its scenes
    for i in range(2):  # each scene's chips as a single-scene call writes them
        scene = scenes_dir / f"scene_00{i}.tif"
        single = write_chips(scene, tmp_path / f"single{i}", size=128, overlap=16,
                             labels=scenes_dir / f"scene_00{i}.buildings.geojson").parent
        for name in ("folder", "glob", "list"):
            assert _index(tmp_path / name / scene.stem) == _index(single), (name, i)
    one = rsseg_cli("tile", scenes_dir / "scene_001.tif", tmp_path / "one", "--labels", labels, *opts)
    assert one.exit_code == 0 and one.stdout.strip() == str(tmp_path / "one" / "index.csv")  # one scene: OUT_DIR
    assert _index(tmp_path / "one") == _index(tmp_path / "single1")


def test_tile_bad_inputs_one_line_exit_2_nothing_written(scenes_dir: Path, tmp_path: Path, rsseg_cli,
                                                         clusters) -> None:
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    (labels_dir / "scene_000.geojson").write_bytes((scenes_dir / "scene_000.buildings.geojson").read_bytes())
    twin = tmp_path / "other" / "scene_000.tif"
    twin.parent.mkdir()
    twin.write_bytes((scenes_dir / "scene_000.tif").read_bytes())
    cases = {
        "missing labels": ([scenes_dir, "--labels", f"{labels_dir}/{{stem}}.geojson"],
                           "scene_001.geojson does not exist (for the input 'scene_001')"),
        "empty glob": ([f"{tmp_path}/*.jp2"], "the pattern matches no file"),
        "missing scene": ([scenes_dir / "scene_000.tif", tmp_path / "nope.tif"], "nope.tif: no such file"),
        "same stem": ([scenes_dir, twin], "have the same name 'scene_000'"),
        "bad pattern": ([scenes_dir, "--labels", "{scene}.geojson"], "at most the field {stem}"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = rsseg_cli("tile", *args[:args.index("--labels")] if "--labels" in args else args, out,
                           *args[args.index("--labels"):] if "--labels" in args else [])
        assert result.exit_code == 2, (name, result.stderr)
        assert result.stderr.startswith("rsseg: error: ") and result.stderr.count("\n") == 1, name
        assert message in result.stderr, (name, result.stderr)
        assert not out.exists(), name
    assert clusters == [], "errors come before any cluster starts"


def test_tile_failing_scene_leaves_nothing(scenes_dir: Path, tmp_path: Path, rsseg_cli) -> None:
    bad = tmp_path / "in" / "zz_broken.tif"
    bad.parent.mkdir()
    bad.write_text("not a raster")
    out = tmp_path / "out"
    result = rsseg_cli("tile", scenes_dir, bad, out, "--size", "128", "--scheduler", "sync")
    assert result.exit_code == 2 and "zz_broken.tif" in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*")), "the scenes done before are not kept"
    (out / "keep").mkdir(parents=True)
    refused = rsseg_cli("tile", scenes_dir, out, "--size", "128", "--scheduler", "sync")
    assert refused.exit_code == 2 and "pass --overwrite" in refused.stderr and (out / "keep").exists()
    again = rsseg_cli("tile", scenes_dir, out, "--size", "128", "--scheduler", "sync", "--overwrite")
    assert again.exit_code == 0 and sorted(p.name for p in out.iterdir()) == ["scene_000", "scene_001"]


# ------------------------------------------------------------------------------------- rsseg vectorize
def _write_masks(folder: Path, n: int = 3) -> dict[str, int]:
    """``m{i}.tif`` masks with ``i + 1`` square buildings each and their ``m{i}.prob.tif``."""
    folder.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=64, height=64, count=1, crs="EPSG:32650",
                   transform=Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000))
    for i in range(n):
        mask = np.zeros((64, 64), np.uint8)
        for j in range(i + 1):
            mask[4 + 14 * j:12 + 14 * j, 8:20] = 1
        with rasterio.open(folder / f"m{i}.tif", "w", dtype="uint8", **profile) as dst:
            dst.write(mask, 1)
        with rasterio.open(folder / f"m{i}.prob.tif", "w", dtype="float32", **profile) as dst:
            dst.write(mask.astype(np.float32) * 0.75, 1)
    return {f"m{i}": i + 1 for i in range(n)}


def test_vectorize_several_masks_to_a_folder(tmp_path: Path, rsseg_cli, clusters) -> None:
    expected = _write_masks(tmp_path / "pred")
    prob = f"{tmp_path}/pred/{{stem}}.prob.tif"
    for name, inputs, fmt in (("folder", [tmp_path / "pred"], "gpkg"),
                              ("glob", [f"{tmp_path}/pred/m?.tif"], "geojson")):
        out = tmp_path / name
        result = rsseg_cli("vectorize", *inputs, out, "--prob", prob, "--format", fmt)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout) == {"output": str(out), "buildings": 6, "per_mask": expected}
        assert sorted(p.name for p in out.iterdir()) == [f"{stem}.{fmt}" for stem in expected]
        for stem, count in expected.items():
            gdf = pyogrio.read_dataframe(out / f"{stem}.{fmt}")
            assert len(gdf) == count and np.allclose(gdf["mean_prob"], 0.75), (name, stem)
    assert clusters == ["sync", "sync"]  # single-block masks run in this process, one executor per call
    single = rsseg_cli("vectorize", tmp_path / "pred" / "m2.tif", tmp_path / "m2.gpkg", "--prob", prob)
    assert single.exit_code == 0 and json.loads(single.stdout) == {"output": str(tmp_path / "m2.gpkg"),
                                                                   "buildings": 3}
    assert pyogrio.read_dataframe(tmp_path / "m2.gpkg").equals(pyogrio.read_dataframe(tmp_path / "folder" / "m2.gpkg"))


def test_vectorize_bad_inputs_one_line_exit_2(tmp_path: Path, rsseg_cli) -> None:
    _write_masks(tmp_path / "pred")
    (tmp_path / "pred" / "m1.prob.tif").unlink()
    cases = {"prob for one": (["--prob", str(tmp_path / "pred" / "m0.prob.tif")], "use a pattern with {stem}"),
             "missing prob": (["--prob", f"{tmp_path}/pred/{{stem}}.prob.tif"], "m1.prob.tif does not exist"),
             "bad format": (["--format", "shp"], "'shp' is not one of")}
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = rsseg_cli("vectorize", tmp_path / "pred", out, *args)
        assert result.exit_code == 2 and message in result.stderr, (name, result.stderr)
        assert not out.exists(), name
    empty = rsseg_cli("vectorize", f"{tmp_path}/pred/*.jp2", tmp_path / "o.gpkg")
    assert empty.exit_code == 2 and empty.stderr.count("\n") == 1 and "matches no file" in empty.stderr
    (tmp_path / "taken").mkdir()
    taken = rsseg_cli("vectorize", tmp_path / "pred", tmp_path / "taken", "--prob", f"{tmp_path}/pred/{{stem}}.tif")
    assert taken.exit_code == 2 and "pass --overwrite" in taken.stderr


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_predict_several_scenes_one_model_load(scenes_dir: Path, checkpoint: Path, tmp_path: Path, rsseg_cli,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from rsseg.inference import scenes

    loads, load_model = [], scenes.load_model
    monkeypatch.setattr(scenes, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    args = ["--tile", "128", "--overlap", "32", "--device", "cpu", "--tta", "none"]
    singles = {}
    for stem in ("scene_000", "scene_001"):
        result = rsseg_cli("predict", checkpoint, scenes_dir / f"{stem}.tif", tmp_path / f"{stem}.tif", *args)
        assert result.exit_code == 0, result.stderr
        singles[stem] = _read(tmp_path / f"{stem}.tif")
    for name, inputs in (("list", [scenes_dir / "scene_000.tif", scenes_dir / "scene_001.tif"]),
                         ("glob", [f"{scenes_dir}/scene_*.tif"])):
        out = tmp_path / f"out-{name}"
        loads.clear()
        result = rsseg_cli("predict", checkpoint, *inputs, out, *args, "--output-kind", "both")
        assert result.exit_code == 0, (name, result.stderr)
        assert len(loads) == 1, name  # one model for all scenes
        assert sorted(p.name for p in out.iterdir()) == ["scene_000.prob.tif", "scene_000.tif", "scene_001.prob.tif",
                                                        "scene_001.tif"], name
        for stem, mask in singles.items():
            np.testing.assert_array_equal(_read(out / f"{stem}.tif"), mask, err_msg=f"{name} {stem}")


def test_predict_bad_inputs_one_line_exit_2_nothing_written(scenes_dir: Path, checkpoint: Path,
                                                            tmp_path: Path, rsseg_cli) -> None:
    twin = tmp_path / "other" / "scene_000.tif"
    twin.parent.mkdir()
    twin.write_bytes((scenes_dir / "scene_000.tif").read_bytes())
    cases = {
        "empty glob": ([f"{tmp_path}/*.jp2"], "the pattern matches no file"),
        "missing scene": ([scenes_dir / "scene_000.tif", tmp_path / "nope.tif"], "nope.tif: no such file"),
        "same stem": ([scenes_dir / "scene_000.tif", twin], "have the same name 'scene_000'"),
        "sample": ([scenes_dir / "scene_000.tif", scenes_dir / "scene_001.tif", "--sample", twin],
                   "a Tianchi submission reads one folder"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        inputs, extra = (args[:args.index("--sample")], args[args.index("--sample"):]) if "--sample" in args \
            else (args, [])
        result = rsseg_cli("predict", checkpoint, *inputs, out, "--device", "cpu", *extra)
        assert result.exit_code == 2, (name, result.stderr)
        assert result.stderr.startswith("rsseg: error: ") and result.stderr.count("\n") == 1, name
        assert message in result.stderr, (name, result.stderr)
        assert not out.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"], "nothing half-written"


def test_predict_a_folder_of_geotiff_scenes(scenes_dir: Path, checkpoint: Path, tmp_path: Path, rsseg_cli) -> None:
    folder = tmp_path / "scenes"
    folder.mkdir()
    for stem in ("scene_000", "scene_001"):
        (folder / f"{stem}.tif").write_bytes((scenes_dir / f"{stem}.tif").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    args = ["--tile", "128", "--overlap", "32", "--device", "cpu", "--tta", "none"]
    result = rsseg_cli("predict", checkpoint, folder, tmp_path / "out", *args, "--output-kind", "both")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "scene_000.prob.tif", "scene_000.tif", "scene_001.prob.tif", "scene_001.tif"]
    single = rsseg_cli("predict", checkpoint, folder / "scene_001.tif", tmp_path / "one.tif", *args)
    assert single.exit_code == 0, single.stderr
    np.testing.assert_array_equal(_read(tmp_path / "out" / "scene_001.tif"), _read(tmp_path / "one.tif"))
