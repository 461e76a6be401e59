"""Real imagery: SpaceNet-1 Rio tiles (3-band uint8, EPSG:4326) and their GDAL-rasterised building masks.

The data lives outside the repository, in ``../shared/realdata/spacenet1_rio/`` beside the main checkout
(CC BY-SA 4.0, see its README.md); ``RSSEG_REALDATA`` names another ``spacenet1_rio`` folder. Tests here skip,
saying why, where it is absent.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rsseg.tiling import write_chips

REPO = Path(__file__).resolve().parents[1]


def _realdata() -> Path | None:
    """``$RSSEG_REALDATA``, else ``shared/realdata/spacenet1_rio`` beside the checkout (or beside a worktree's
    folder of worktrees)."""
    if os.environ.get("RSSEG_REALDATA"):
        return Path(os.environ["RSSEG_REALDATA"])
    for parent in (REPO.parent, REPO.parent.parent):
        if (parent / "shared" / "realdata" / "spacenet1_rio" / "images").is_dir():
            return parent / "shared" / "realdata" / "spacenet1_rio"
    return None


SPACENET = _realdata()
pytestmark = pytest.mark.skipif(
    SPACENET is None or not (SPACENET / "images").is_dir(),
    reason="SpaceNet-1 Rio tiles not found: expected ../shared/realdata/spacenet1_rio/ beside the repository "
           "(or set RSSEG_REALDATA to that folder)")

#: Two tiles with buildings, one without (img58-img62 contain none).
TILES = ["3band_013022223130_Public_img50", "3band_013022223130_Public_img53", "3band_013022223130_Public_img58"]


@pytest.mark.parametrize("name", TILES)
def test_spacenet_masks_give_background_and_buildings(tmp_path: Path, name: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    image, mask_path = SPACENET / "images" / f"{name}.tif", SPACENET / "masks" / f"{name}.tif"
    with rasterio.open(mask_path) as src:
        assert src.nodata == 0  # the trap: nodata equals background in these masks
        mask = src.read(1) > 0
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="rsseg"):
        write_chips(image, out, size=128, overlap=16, labels=mask_path)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    with open(out / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    values = set()
    for row in rows:
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(out / row["label"]) as chip:
            label = chip.read(1)
            assert chip.crs == "EPSG:4326"
        values |= set(np.unique(label).tolist())
        truth = mask[r : r + 128, c : c + 128]
        np.testing.assert_array_equal(label, truth.astype(np.uint8), err_msg=row["label"])
        assert float(row["building_frac"]) == pytest.approx(truth.mean(), abs=1e-6)
        assert float(row["nodata_frac"]) == 0.0
    assert values <= {0, 1} and 0 in values
    assert (1 in values) == bool(mask.any())


def test_cli_label_ignore_overrides_on_a_spacenet_mask(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rsseg.cli import cli

    name = TILES[1]
    image, mask_path = SPACENET / "images" / f"{name}.tif", SPACENET / "masks" / f"{name}.tif"
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["tile", str(image), str(out), "--labels", str(mask_path), "--size", "256",
                                      "--overlap", "0", "--label-ignore", "0", "--scheduler", "sync"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out / "index.csv")
    with rasterio.open(mask_path) as src:
        mask = src.read(1)
    with open(out / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:  # told that 0 means ignore: background becomes 255, buildings stay 1
        c, r = int(row["col_off"]), int(row["row_off"])
        with rasterio.open(out / row["label"]) as chip:
            np.testing.assert_array_equal(chip.read(1), np.where(mask[r : r + 256, c : c + 256] > 0, 1, 255))
