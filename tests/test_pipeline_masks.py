"""The tianchi_masks stage through `rsseg run`: a clean folder described, bad rows one line + the full list."""

import json
import shutil
from pathlib import Path

import yaml


def _pipeline(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "masks.yaml"
    path.write_text(yaml.safe_dump({
        "name": "masks", "workdir": str(tmp_path / "work"),
        "stages": {"masks": {"uses": "tianchi_masks",
                             "with": {"masks": str(data / "train_mask.csv"), "images": str(data / "train"),
                                      "chunk_rows": 5}}}}))
    return path


def test_masks_stage_describes_a_clean_folder(tianchi_dir, tmp_path, rsseg_cli, dask_cluster):
    done = rsseg_cli("run", _pipeline(tmp_path, tianchi_dir), "--scheduler", dask_cluster)
    assert done.exit_code == 0, done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{"):])["stages"]["masks"]  # after the dashboard line
    assert summary["images"] == 12 and summary["bad_rows"] == 0
    table = (tmp_path / "work" / "masks" / "masks.csv").read_text().splitlines()
    assert len(table) == 13 and table[0].startswith("name,")
    assert json.loads((tmp_path / "work" / "masks" / "summary.json").read_text())["images"] == 12


def test_bad_rows_fail_in_one_line_with_the_full_list(tianchi_dir, tmp_path, rsseg_cli, dask_cluster):
    data = tmp_path / "data"
    shutil.copytree(tianchi_dir, data)
    rows = (data / "train_mask.csv").read_text().splitlines()
    rows[2] = rows[2].split("\t")[0] + "\t1 2 3"                  # odd number of RLE tokens
    rows.append("NOT_THERE.jpg\t1 5")                             # an image that is not in train/
    rows.append(rows[0])                                          # a duplicated name
    (data / "train_mask.csv").write_text("\n".join(rows) + "\n")
    done = rsseg_cli("run", _pipeline(tmp_path, data), "--scheduler", dask_cluster)
    assert done.exit_code == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("rsseg: error:")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1]  # progress bars above it only
    assert "3 bad rows" in errors[0] and "line 3" in errors[0] and "masks.bad_rows.csv" in errors[0]
    listing = (tmp_path / "work" / "masks.bad_rows.csv").read_text()
    assert "NOT_THERE.jpg" in listing and "duplicate" in listing
    assert not (tmp_path / "work" / "masks").exists()  # nothing half-written under the stage's name
