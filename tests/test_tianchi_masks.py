"""describe_masks / write_mask_report (every bad row of train_mask.csv, the per-image table, the figures)
and stratified_folds, on generated Tianchi data and hand-made bad files."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from rsseg.errors import ConfigError, DatasetError
from rsseg.metrics import count_buildings
from rsseg.synth import make_tianchi
from rsseg.tianchi import (
    FoldOptions,
    decode,
    describe_masks,
    fold_strata,
    read_masks_csv,
    stratified_folds,
    write_mask_report,
)
from rsseg.tianchi.masks import mosaic_picks


@pytest.fixture(scope="module")
def tianchi(tmp_path_factory) -> dict:
    return make_tianchi(tmp_path_factory.mktemp("tianchi") / "data", n_train=12, n_test=1, seed=4)


@pytest.fixture(scope="module")
def bad_data(tianchi, tmp_path_factory) -> tuple[Path, Path, dict[int, tuple[str, str]]]:
    """A copy of the generated training set with every kind of bad row at once.

    Returns the mask file, the images folder and ``line -> (name, kind)`` of every expected bad row.
    """
    root = tmp_path_factory.mktemp("bad")
    images = root / "train"
    shutil.copytree(tianchi["train_dir"], images)
    lines = Path(tianchi["train_mask"]).read_text().splitlines()
    names = [line.split("\t")[0] for line in lines]
    Image.new("RGB", (256, 512)).save(images / "SMALL.jpg")  # 512 high, 256 wide
    (images / "BROKEN.jpg").write_bytes(b"not a jpeg")
    bad = [
        ("NOPE.jpg\t1 5", "NOPE.jpg", "missing_image"),
        (f"{names[0]}\t1 5", names[0], "duplicate"),
        (f"{names[1]}x\t1 x 5 6", f"{names[1]}x", "rle"),  # bad token (and its image is missing, see below)
        (f"{names[2]}\t1 5\textra", names[2], "format"),
        ("", "", "format"),
        ("SMALL.jpg\t1 5", "SMALL.jpg", "wrong_size"),
        ("BROKEN.jpg\t", "BROKEN.jpg", "unreadable_image"),
        ("ODD.jpg\t1 5 9", "ODD.jpg", "rle"),
        ("PAST.jpg\t262140 10", "PAST.jpg", "run_past_end"),
    ]
    for name in ("ODD.jpg", "PAST.jpg"):
        shutil.copy(images / names[3], images / name)
    text = lines[:4] + [row for row, _, _ in bad] + lines[4:]
    mask_csv = root / "train_mask.csv"
    mask_csv.write_text("\n".join(text) + "\n")
    expected = {5 + i: (name, kind) for i, (_, name, kind) in enumerate(bad)}
    return mask_csv, images, expected


def _bad_set(report) -> set[tuple[int, str, str]]:
    return {(r.line, r.name, r.kind) for r in report.bad_rows}


def test_generated_masks_describe_cleanly(tianchi) -> None:
    report = describe_masks(tianchi["train_mask"], tianchi["train_dir"], chunk_rows=5)
    assert report.ok and report.bad_rows == () and report.unlisted_images == ()
    table = report.table
    assert list(table.columns) == ["name", "line", "building_fraction", "empty", "buildings"]
    truth = read_masks_csv(tianchi["train_mask"])
    assert table["name"].tolist() == list(truth) and table["line"].tolist() == list(range(1, 13))
    for row in table.itertuples():
        mask = truth.mask(row.name)
        assert row.building_fraction == pytest.approx(mask.mean())
        assert row.empty == (not mask.any())
        assert (row.buildings == 0) == row.empty
    summary = report.summary()
    assert summary["images"] == 12 and summary["empty_images"] == tianchi["n_train_empty"]
    assert summary["empty_share"] == pytest.approx(tianchi["n_train_empty"] / 12)
    assert sum(summary["histogram"]["counts"]) == 12 - tianchi["n_train_empty"]
    assert len(summary["histogram"]["edges"]) == 21 and summary["bad_rows"] == 0
    report.raise_if_bad()  # nothing bad: no error


def test_count_buildings_is_4_connected_and_counts_courtyards_once() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[2:10, 2:10] = 1
    mask[10:14, 10:14] = 1  # touches the first only at a corner: a separate building
    mask[30:50, 30:50] = 1
    mask[35:45, 35:45] = 0  # a courtyard
    assert count_buildings(mask) == 3
    assert count_buildings(np.zeros((8, 8), np.uint8)) == 0
    assert count_buildings(decode("1 262144")) == 1


@given(st.integers(1, 24), st.integers(1, 24), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_count_buildings_agrees_with_rasterio_shapes(height, width, density, seed) -> None:
    from rasterio.features import shapes

    mask = np.random.default_rng(seed).random((height, width)) < density
    building = mask.astype(np.uint8)
    assert count_buildings(mask) == sum(1 for _ in shapes(building, mask=mask, connectivity=4))


def test_every_bad_row_is_reported_with_its_line(bad_data) -> None:
    mask_csv, images, expected = bad_data
    report = describe_masks(mask_csv, images, chunk_rows=4)
    found = _bad_set(report)
    # The misspelt name's row has a bad token and no image: both are reported.
    assert found == {(line, name, kind) for line, (name, kind) in expected.items()} | {
        (7, expected[7][0], "missing_image")}
    assert [r.line for r in report.bad_rows] == sorted(r.line for r in report.bad_rows)
    by_kind = {r.kind: r.problem for r in report.bad_rows}
    assert "duplicates line 1" in by_kind["duplicate"]
    assert "256" in by_kind["wrong_size"] and "expected 512x512" in by_kind["wrong_size"]
    assert "past the end" in by_kind["run_past_end"]
    rle_problems = [r.problem for r in report.bad_rows if r.kind == "rle"]
    assert any("'x'" in p for p in rle_problems) and any("odd number" in p for p in rle_problems)
    assert report.table["name"].is_unique and len(report.table) == 12  # the good rows, duplicate's first kept
    assert report.unlisted_images == ()
    assert report.summary()["bad_rows_by_kind"]["format"] == 2 and not report.ok


def test_executor_gives_the_same_report(bad_data, tianchi) -> None:
    for mask_csv, images in ((bad_data[0], bad_data[1]), (tianchi["train_mask"], tianchi["train_dir"])):
        here = describe_masks(mask_csv, images, chunk_rows=3)
        with ThreadPoolExecutor(max_workers=3) as pool:
            there = describe_masks(mask_csv, images, chunk_rows=3, executor=pool)
        pd.testing.assert_frame_equal(here.table, there.table)
        assert here.bad_rows == there.bad_rows and here.summary() == there.summary()
        one_block = describe_masks(mask_csv, images, chunk_rows=1000)
        pd.testing.assert_frame_equal(here.table, one_block.table)
        assert here.bad_rows == one_block.bad_rows


def test_raise_if_bad_is_one_line_naming_count_first_row_and_listing(bad_data, tmp_path) -> None:
    mask_csv, images, expected = bad_data
    report = describe_masks(mask_csv, images)
    paths = write_mask_report(report, tmp_path / "stage")
    with pytest.raises(DatasetError) as info:
        report.raise_if_bad(paths["bad_rows"])
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert f"{len(report.bad_rows)} bad rows" in message and "line 5 (NOPE.jpg)" in message
    assert str(paths["bad_rows"]) in message
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("")
    with pytest.raises(DatasetError, match="has no rows"):
        describe_masks(empty_csv, images).raise_if_bad()


def test_unlisted_images_are_counted(tianchi, tmp_path) -> None:
    mask_csv = tmp_path / "part.csv"
    mask_csv.write_text("".join(Path(tianchi["train_mask"]).read_text().splitlines(keepends=True)[:10]))
    report = describe_masks(mask_csv, tianchi["train_dir"])
    assert report.ok and len(report.unlisted_images) == 2 and report.summary()["unlisted_images"] == 2


def test_written_files_exist_parse_and_refuse_overwrite(bad_data, tianchi, tmp_path) -> None:
    report = describe_masks(bad_data[0], bad_data[1], mosaic_images=5)
    out = tmp_path / "report"
    paths = write_mask_report(report, out)
    assert set(paths) == {"table", "bad_rows", "summary", "mosaic"}
    table = pd.read_csv(paths["table"])
    pd.testing.assert_frame_equal(table, report.table)
    bad = pd.read_csv(paths["bad_rows"], keep_default_na=False)
    assert list(bad.columns) == ["line", "name", "kind", "problem"] and len(bad) == len(report.bad_rows)
    assert set(zip(bad["line"], bad["name"], bad["kind"], strict=True)) == _bad_set(report)
    assert json.loads(paths["summary"].read_text()) == report.summary()
    with Image.open(paths["mosaic"]) as mosaic:
        assert mosaic.format == "PNG" and mosaic.size == (4 * 192, 2 * 192)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())  # no temp files
    with pytest.raises(FileExistsError, match="overwrite"):
        write_mask_report(report, out)
    assert write_mask_report(report, out, overwrite=True) == paths
    no_images = describe_masks(tianchi["train_mask"], None)
    assert no_images.ok and "mosaic" not in write_mask_report(no_images, tmp_path / "masks_only")


def test_mosaic_picks_spread_over_building_fraction(tianchi) -> None:
    table = describe_masks(tianchi["train_mask"], tianchi["train_dir"]).table
    picks = mosaic_picks(table, 4)
    fractions = table.set_index("name").loc[picks, "building_fraction"].tolist()
    assert len(picks) == 4 and fractions == sorted(fractions)
    assert fractions[0] == table["building_fraction"].min() and fractions[-1] == table["building_fraction"].max()
    assert mosaic_picks(table, 0) == [] and len(mosaic_picks(table, 50)) == 12


def test_bad_options_and_folders_are_errors(tianchi, tmp_path) -> None:
    with pytest.raises(ConfigError, match="chunk_rows"):
        describe_masks(tianchi["train_mask"], tianchi["train_dir"], chunk_rows=0)
    with pytest.raises(ConfigError, match="image_size"):
        describe_masks(tianchi["train_mask"], tianchi["train_dir"], image_size=[512])
    with pytest.raises(ConfigError, match="valid names"):
        describe_masks(tianchi["train_mask"], tianchi["train_dir"], chunk=5)
    with pytest.raises(DatasetError, match="not a folder"):
        describe_masks(tianchi["train_mask"], tmp_path / "nowhere")
    wrong = describe_masks(tianchi["train_mask"], tianchi["train_dir"], image_size=[256, 256])
    assert {r.kind for r in wrong.bad_rows} >= {"wrong_size"} and len(wrong.table) < 12


# ---- stratified folds -------------------------------------------------------------------------------


def _table(fractions: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"name": [f"{i:05d}.jpg" for i in range(len(fractions))],
                         "building_fraction": fractions, "empty": [f == 0 for f in fractions]})


def _check_balanced(table: pd.DataFrame, folds: pd.Series, k: int, bins: int) -> None:
    assert folds.index.tolist() == table["name"].tolist()  # every image, exactly once, in table order
    assert set(folds.unique()) <= set(range(k))
    strata = fold_strata(table, bins)
    histograms = pd.crosstab(strata, folds).reindex(columns=range(k), fill_value=0)
    assert (histograms.max(axis=1) - histograms.min(axis=1) <= 1).all()  # within one image per bin
    sizes = folds.value_counts().reindex(range(k), fill_value=0)
    assert sizes.max() - sizes.min() <= 1


@given(
    fractions=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0), st.sampled_from([0.1, 0.25])),
                       min_size=8, max_size=120),
    k=st.integers(2, 8), bins=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
)
def test_folds_have_the_same_distribution(fractions, k, bins, seed) -> None:
    table = _table(fractions)
    k = min(k, len(table))
    folds = stratified_folds(table, folds=k, bins=bins, seed=seed)
    _check_balanced(table, folds, k, bins)
    strata = fold_strata(table, bins)
    assert (strata[table["name"][table["empty"]]] == 0).all()
    assert (strata[table["name"][~table["empty"]]] >= 1).all() and strata.max() <= bins


def test_folds_are_deterministic_by_seed_and_independent_of_row_order() -> None:
    rng = np.random.default_rng(0)
    table = _table([0.0] * 10 + rng.uniform(0.01, 0.6, 50).tolist())
    first = stratified_folds(table, folds=5, seed=7)
    pd.testing.assert_series_equal(first, stratified_folds(table, FoldOptions(folds=5, seed=7)))
    shuffled = table.sample(frac=1, random_state=1)
    pd.testing.assert_series_equal(stratified_folds(shuffled, folds=5, seed=7), first.reindex(shuffled["name"]))
    assert not stratified_folds(table, folds=5, seed=8).equals(first)
    plain = stratified_folds(table, folds=5, stratify="none", seed=7)
    assert plain.value_counts().tolist() == [12] * 5


def test_folds_of_a_described_dataset(tianchi) -> None:
    table = describe_masks(tianchi["train_mask"], tianchi["train_dir"]).table
    folds = stratified_folds(table, folds=3, bins=2, seed=0)
    _check_balanced(table, folds, 3, 2)
    written_back = pd.DataFrame({"name": table["name"], "fold": folds.to_numpy()})
    assert written_back.groupby("fold").size().tolist() == [4, 4, 4]


def test_fold_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="at most one fold per image"):
        stratified_folds(_table([0.1, 0.2]), folds=3)
    with pytest.raises(ConfigError, match="folds"):
        stratified_folds(_table([0.1, 0.2]), folds=1)
    with pytest.raises(DatasetError, match="lacks the column"):
        stratified_folds(pd.DataFrame({"name": ["a"]}), folds=2)
    with pytest.raises(DatasetError, match="more than once"):
        stratified_folds(pd.concat([_table([0.1, 0.2])] * 2), folds=2)
