"""The README's workflow command lines, run as a user types them (paths mapped onto small generated data).

Workflow 2 (`rsseg run pipelines/...`) is run by test_pipeline.py with the README's own lines.
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
from conftest import run_rsseg

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _block(heading: str) -> list[list[str]]:
    """The ``rsseg`` lines of the first bash block after ``heading`` in the README, split like a shell would."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    block = re.search(r"```bash\n(.*?)```", text[start:], flags=re.S).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.startswith("rsseg ")]


def _run(args: list[str], mapping: dict[str, str]) -> str:
    mapped = list(args)
    for old, new in mapping.items():
        mapped = [a.replace(old, new) for a in mapped]
    result = run_rsseg(*mapped[1:])
    assert result.exit_code == 0, (mapped, result.stderr)
    return result.stdout


def test_workflow_1_stage_by_stage(tianchi_dir, tmp_path, monkeypatch):
    lines = _block("### 1. A Tianchi competition submission")
    assert [line[:2] for line in lines] == [["rsseg", "run"], ["rsseg", "train"], ["rsseg", "predict"],
                                            ["rsseg", "validate"]]
    data = tmp_path / "tianchi"
    shutil.copytree(tianchi_dir, data)
    monkeypatch.chdir(tmp_path)
    mapping = {"/data/tianchi": str(data), "configs/train_tianchi.yaml": str(REPO / "configs/train_tianchi.yaml")}
    # shrunk as the pipeline tests shrink theirs: one epoch on the 12 generated images
    _run(lines[1] + ["--set", "run.epochs=1", "--set", "data.val_fraction=0.25"], mapping)
    assert (tmp_path / "runs/tianchi/best.pt").is_file()
    _run(lines[2], mapping)
    rows = (tmp_path / "submission.csv").read_text().splitlines()
    sample = (data / "test_a_samplesubmit.csv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == [s.split("\t")[0] for s in sample]
    assert "valid" in _run(lines[3], mapping)


def test_workflow_3_gis_export(checkpoint, scenes_dir, tmp_path, monkeypatch):
    lines = _block("### 3. GIS export")
    assert [line[1] for line in lines] == ["predict", "vectorize", "vectorize", "vectorize", "evaluate"]
    shutil.copy(checkpoint, tmp_path / "model.pt")
    shutil.copy(scenes_dir / "scene_000.tif", tmp_path / "scene.tif")
    shutil.copy(scenes_dir / "scene_000.buildings.geojson", tmp_path / "truth.geojson")
    monkeypatch.chdir(tmp_path)
    _run(lines[0], {})
    with rasterio.open("scene.tif") as src, rasterio.open("scene_mask.tif") as mask, \
            rasterio.open("scene_mask.prob.tif") as prob:
        assert mask.crs == src.crs == prob.crs and mask.transform == src.transform
    for line in lines[1:4]:
        _run(line, {})
    geojson = gpd.read_file("buildings.geojson")
    assert geojson.crs.to_epsg() == 4326
    for name in ("buildings.gpkg", "buildings.parquet"):
        layer = gpd.read_parquet(name) if name.endswith("parquet") else gpd.read_file(name)
        with rasterio.open("scene.tif") as src:
            assert layer.crs == src.crs
    scores = json.loads(_run(lines[4], {}))
    assert 0.0 <= scores["f1"] <= 1.0 and scores["min_area_m2"] == 20
