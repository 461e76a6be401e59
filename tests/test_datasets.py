import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image

from rsseg.errors import DatasetError
from rsseg.tianchi import rle
from rsseg.tianchi.files import write_mask_csv
from rsseg.training.augment import TrainTransform
from rsseg.training.datasets import ChipDataset, TianchiDataset
from rsseg.training.splits import split_indices

SIZE = 64


def make_tianchi(root, n=6, size=SIZE):
    """Tiles with one bright rectangle each (its mask exactly), the last one without buildings."""
    (root / "train").mkdir(parents=True)
    rows = []
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        if i < n - 1:
            mask[4 + i : 20 + i, 8 : 30 + 2 * i] = 1
        rgb = np.where(mask[..., None] == 1, [230, 230, 230], [40, 90, 40]).astype(np.uint8)
        Image.fromarray(rgb).save(root / "train" / f"t{i:02d}.jpg", quality=95)
        rows.append((f"t{i:02d}.jpg", rle.encode(mask)))
    write_mask_csv(rows, root / "train_mask.csv")
    return root


def test_tianchi_items_are_raw_pixels_and_decoded_masks(tmp_path):
    ds = TianchiDataset(make_tianchi(tmp_path), size=SIZE)
    assert len(ds) == 6 and ds.bands == 3
    item = ds[1]
    assert set(item) == {"image", "mask", "valid"}
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["image"].max() > 200  # raw 0-255 values: the model normalises
    expected = np.zeros((SIZE, SIZE), np.float32)
    expected[5:21, 8:32] = 1
    assert np.array_equal(item["mask"][0].numpy(), expected)
    assert item["valid"].shape == (1, SIZE, SIZE) and bool((item["valid"] == 1).all())
    assert ds[5]["mask"].sum() == 0
    assert torch.equal((item["image"][0] > 128).float(), item["mask"][0])


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(50, "train", 0.2, seed=3), split_indices(50, "val", 0.2, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted([*train, *val]) == list(range(50))
    assert np.array_equal(val, split_indices(50, "val", 0.2, seed=3))
    assert not np.array_equal(val, split_indices(50, "val", 0.2, seed=4))
    folds = [split_indices(50, "val", seed=1, folds=5, fold=k) for k in range(5)]
    assert sorted(np.concatenate(folds).tolist()) == list(range(50))
    assert np.array_equal(split_indices(50, "train", seed=1, folds=5, fold=2), np.sort(np.concatenate(
        [f for k, f in enumerate(folds) if k != 2])))
    with pytest.raises(DatasetError, match="fold 5 of 5"):
        split_indices(50, "val", folds=5, fold=5)


def test_tianchi_split_and_seeded_transforms(tmp_path):
    root = make_tianchi(tmp_path)
    transform = TrainTransform(crop=32, brightness=0.2)
    train = TianchiDataset(root, "train", val_fraction=0.34, seed=1, transform=transform, size=SIZE)
    val = TianchiDataset(root, "val", val_fraction=0.34, seed=1, size=SIZE)
    assert len(train) == 4 and len(val) == 2 and not set(train.names) & set(val.names)
    first = train[0]
    assert first["image"].shape == (3, 32, 32) and first["mask"].shape == (1, 32, 32)
    assert torch.equal(first["image"], train[0]["image"])  # seeded by (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(first["image"], train[0]["image"])


def test_tianchi_bad_input(tmp_path):
    root = make_tianchi(tmp_path / "a")
    (root / "train" / "t02.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 images named in train_mask.csv are missing .*t02.jpg"):
        TianchiDataset(root, size=SIZE)
    root = make_tianchi(tmp_path / "b")
    Image.new("RGB", (SIZE, SIZE // 2)).save(root / "train" / "t03.jpg")
    with pytest.raises(DatasetError, match=r"t03.jpg is 64x32; expected 64x64"):
        TianchiDataset(root, size=SIZE)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train_mask.csv").write_text("")
    with pytest.raises(DatasetError, match="lists no images"):
        TianchiDataset(tmp_path / "c")
    with pytest.raises(DatasetError, match="not found"):
        TianchiDataset(tmp_path / "nowhere")


def make_chips(out, n=4, size=16, bands=4, dtype="uint16"):
    """A chip folder in the layout of rsseg.tiling.write_chips (index.csv + index.json + GeoTIFFs)."""
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    rows = ["image,label,col_off,row_off,width,height,minx,miny,maxx,maxy,building_frac,nodata_frac"]
    for i in range(n):
        transform = Affine(1.0, 0.0, 500000.0 + i * size, 0.0, -1.0, 4000000.0)
        labels = np.zeros((size, size), np.uint8)
        labels[2:8, 3:9 + i] = 1
        labels[:, -2:] = 255
        data = (labels[None] == 1) * np.arange(1000, 1000 + 100 * bands, 100)[:, None, None] + 7
        for name, array in ((f"images/c{i}.tif", data.astype(dtype)), (f"labels/c{i}.tif", labels[None])):
            with rasterio.open(out / name, "w", driver="GTiff", width=size, height=size, count=array.shape[0],
                               dtype=array.dtype, crs="EPSG:32650", transform=transform) as dst:
                dst.write(array)
        x0 = 500000.0 + i * size
        rows.append(f"images/c{i}.tif,labels/c{i}.tif,{i * size},0,{size},{size},{x0},{4000000.0 - size},"
                    f"{x0 + size},4000000.0,0.1,0.0")
    (out / "index.csv").write_text("\n".join(rows) + "\n")
    meta = {"crs": "EPSG:32650", "size": size, "bands": list(range(1, bands + 1)), "dtype": dtype, "nodata": None}
    (out / "index.json").write_text(json.dumps(meta))
    return out


def test_chip_dataset_reads_bands_labels_and_ignore(tmp_path):
    ds = ChipDataset([make_chips(tmp_path / "a"), make_chips(tmp_path / "b") / "index.csv"])
    assert len(ds) == 8 and ds.bands == 4 and ds.size == 16 and ds.max_value == 65535
    item = ds[1]
    assert item["image"].shape == (4, 16, 16)
    assert item["image"][3].max() == 1307  # raw uint16 values
    assert item["mask"][0, 2:8, 3:10].eq(1).all() and item["mask"].sum() == 6 * 7
    assert item["valid"][0, :, -2:].eq(0).all() and item["valid"][0, :, :-2].eq(1).all()
    train = ChipDataset(tmp_path / "a", "train", val_fraction=0.25, transform=TrainTransform(crop=8))
    assert len(train) == 3 and train[0]["image"].shape == (4, 8, 8)


def test_chip_dataset_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        ChipDataset(tmp_path / "missing")
    make_chips(tmp_path / "three", bands=3)
    with pytest.raises(DatasetError, match="disagree on"):
        ChipDataset([make_chips(tmp_path / "a"), tmp_path / "three"])
    (tmp_path / "a" / "labels" / "c2.tif").unlink()
    with pytest.raises(DatasetError, match="1 listed chip files are missing"):
        ChipDataset(tmp_path / "a")
    empty = make_chips(tmp_path / "e", n=0)
    with pytest.raises(DatasetError, match="list no chips"):
        ChipDataset(empty)


@pytest.fixture(scope="module")
def scene_chips(tmp_path_factory):
    """Chips of one generated scene (256 px, 32-px chips overlapping by 8) and of a second scene, by write_chips."""
    from rsseg.synth.generate import footprints_path, make_scene
    from rsseg.tiling import write_chips

    root = tmp_path_factory.mktemp("scenes")
    folders = []
    for seed in (1, 2):
        scene = root / f"scene{seed}.tif"
        make_scene(scene, size=256, seed=seed, progress=False)
        write_chips(scene, root / f"chips{seed}", size=32, overlap=8, labels=footprints_path(scene))
        folders.append(root / f"chips{seed}")
    return folders


def _windows(ds):
    """Scene and pixel box (col0, row0, col1, row1) of each of the dataset's chips, from the chips themselves."""
    out = []
    for image, _ in ds.items:
        with rasterio.open(image) as src:
            t = src.transform
            out.append((Path(image).parent.parent.name, t.c, t.f, t.c + src.width * t.a, t.f + src.height * t.e))
    return out


def _pixels_shared(a, b):
    return [(x, y) for x in a for y in b if x[0] == y[0] and x[1] < y[3] and y[1] < x[3]
            and min(x[2], y[2]) > max(x[4], y[4])]


def test_one_scene_splits_by_blocks_with_a_gap_and_no_shared_pixel(scene_chips, tmp_path):
    one = scene_chips[0]
    train = ChipDataset(one, "train", val_fraction=0.2, seed=0)
    val = ChipDataset(one, "val", val_fraction=0.2, seed=0)
    assert train.unit == "block" and len(train) and len(val)
    assert not _pixels_shared(_windows(train), _windows(val))  # no validation pixel in any training chip
    with open(one / "index.csv", newline="") as fh:
        rows = {r["image"]: r for r in csv.DictReader(fh)}
    gap = 8 * 0.5  # the overlap, in metres (0.5 m pixels)
    for t in _windows(train):  # and at least the overlap between them
        for v in _windows(val):
            dx, dy = max(v[1] - t[3], t[1] - v[3]), max(t[4] - v[2], v[4] - t[2])
            assert max(dx, dy) >= gap - 1e-6
    sides = train.sides
    assert set(sides.values()) == {"train", "val", "gap"} and len(sides) == len(rows)
    assert sum(s == "val" for s in sides.values()) == len(val) and sum(s == "train" for s in sides.values()) == len(
        train)
    assert sides == ChipDataset(one, "val", val_fraction=0.2, seed=0).sides  # deterministic
    assert sides != ChipDataset(one, "val", val_fraction=0.2, seed=3).sides
    folds = [ChipDataset(one, "val", seed=0, folds=3, fold=k) for k in range(3)]
    assert sorted(i for f in folds for i in f.items) == sorted(
        (str(one / r["image"]), str(one / r["label"])) for r in rows.values())


def test_several_scenes_split_whole_scenes(scene_chips):
    train = ChipDataset(scene_chips, "train", val_fraction=0.1, seed=0)
    val = ChipDataset(scene_chips, "val", val_fraction=0.1, seed=0)
    assert train.unit == "scene" and "gap" not in train.sides.values()
    assert len({Path(i).parent.parent for i, _ in train.items}) == 1
    assert {Path(i).parent.parent for i, _ in val.items} == set(scene_chips) - {Path(train.items[0][0]).parent.parent}


def test_split_is_written_to_the_run_folder(scene_chips, tmp_path, stand_ins):
    from rsseg.training.config import load_config
    from rsseg.training.launch import fit

    cfg = load_config({"data": {"source": "chips", "chips": [str(scene_chips[0])], "batch_size": 4,
                                "val_fraction": 0.2},
                       "model": {"arch": stand_ins}, "run": {"out_dir": str(tmp_path / "run"), "epochs": 1,
                                                             "progress": False, "device": "cpu"}})
    fit(cfg)
    with open(tmp_path / "run" / "split.csv", newline="") as fh:
        written = {r["item"]: r["side"] for r in csv.DictReader(fh)}
    assert written == ChipDataset(scene_chips[0], "train", val_fraction=0.2).sides


@pytest.fixture(scope="module")
def tianchi20(tmp_path_factory):
    from rsseg.synth.generate import make_tianchi as generate

    root = tmp_path_factory.mktemp("tianchi20") / "data"
    generate(root, n_train=20, n_test=0, seed=3, progress=False)
    return root


def test_tianchi_folds_are_stratified_by_building_fraction(tianchi20, tmp_path):
    from rsseg.tianchi import describe_masks, fold_strata
    from rsseg.training.config import load_config
    from rsseg.training.launch import build_datasets

    table = describe_masks(tianchi20 / "train_mask.csv", None).table
    strata = fold_strata(table)
    assert strata.nunique() >= 3  # empty images and several bins: the test means something
    vals = []
    for k in range(4):
        cfg = load_config({"data": {"source": "tianchi", "root": str(tianchi20), "folds": 4, "fold": k, "seed": 1},
                           "run": {"out_dir": str(tmp_path)}})
        train, val = build_datasets(cfg)
        assert not set(train.names) & set(val.names) and sorted(train.names + val.names) == sorted(table["name"])
        assert train.sides == val.sides and sum(s == "val" for s in val.sides.values()) == len(val)
        vals.append(val.names)
    assert sorted(n for v in vals for n in v) == sorted(table["name"])  # every image validates exactly once
    counts = np.array([[int((strata[v] == s).sum()) for s in sorted(strata.unique())] for v in vals])
    assert (counts.max(0) - counts.min(0) <= 1).all(), counts  # fold histograms within one image per bin
    plain = TianchiDataset(tianchi20, "val", folds=4, fold=0, seed=1, stratify="none")
    assert len(plain) == 5
    with pytest.raises(DatasetError, match="fold 4 of 4 folds"):
        TianchiDataset(tianchi20, "val", folds=4, fold=4)
