"""Many inputs per call: :func:`rsseg.fileio.expand_paths`."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsseg.errors import ConfigError
from rsseg.fileio import display_name, expand_paths, fill_stem, is_remote, stem_of
from rsseg.tiling import sources


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
    assert sources.is_remote is is_remote and sources.display_name is display_name  # tiling keeps importing
    assert stem_of("/vsicurl/https://host/a/scene_1.tif?sig=x/y") == "scene_1" == stem_of(tmp_path / "scene_1.tif")
    _touch(tmp_path / "labels" / "a.geojson")
    assert fill_stem(f"{tmp_path}/labels/{{stem}}.geojson", "a") == tmp_path / "labels" / "a.geojson"
    assert fill_stem("s3://b/{stem}.geojson", "a") == "s3://b/a.geojson"
    with pytest.raises(ConfigError, match=r"b\.geojson does not exist \(for the input 'b'\)"):
        fill_stem(f"{tmp_path}/labels/{{stem}}.geojson", "b")
    with pytest.raises(ConfigError, match="at most the field"):
        fill_stem(f"{tmp_path}/{{name}}.geojson", "a")

