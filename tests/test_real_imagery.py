"""Training on real-world imagery: band statistics per data type, source bands and GSD in the checkpoint."""

import json
import warnings

import numpy as np
import pytest
import rasterio
import rasterio.features
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from stand_ins import TINY_ARCH

from rsseg.errors import DatasetError
from rsseg.models import load_checkpoint
from rsseg.synth.generate import make_scene
from rsseg.training.augment import TrainTransform
from rsseg.training.bandstats import StatsAccumulator, combine_stats, gsd_metres, normalisation
from rsseg.training.config import load_config
from rsseg.training.datasets import ChipDataset
from rsseg.training.launch import build_datasets, fit

CHIP = 64


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A generated 512^2 scene at 0.3 m: its pixels (H, W, 3 uint8), building labels, CRS and transform."""
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    footprints = make_scene(path, size=512, seed=3, gsd=0.3, progress=False)
    with rasterio.open(path) as src:
        image, crs, transform = np.moveaxis(src.read(), 0, -1), src.crs, src.transform
    labels = rasterio.features.rasterize(footprints.geometry, out_shape=image.shape[:2], transform=transform,
                                         dtype="uint8")
    return image, labels, crs, transform


def write_chips(out, image, labels, crs, transform, band_stats=True, descriptions=None):
    """A chip folder in the layout of rsseg tile (64-px chips, no overlap), written here with rasterio."""
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    rows = ["image,label,col_off,row_off,width,height,minx,miny,maxx,maxy,building_frac,nodata_frac"]
    height, width, bands = image.shape
    for row in range(0, height, CHIP):
        for col in range(0, width, CHIP):
            chip_t = transform @ Affine.translation(col, row)
            name = f"r{row}_c{col}.tif"
            for sub, array in (("images", np.moveaxis(image[row:row + CHIP, col:col + CHIP], -1, 0)),
                               ("labels", labels[None, row:row + CHIP, col:col + CHIP])):
                with rasterio.open(out / sub / name, "w", driver="GTiff", width=CHIP, height=CHIP,
                                   count=array.shape[0], dtype=array.dtype, crs=crs, transform=chip_t) as dst:
                    dst.write(array)
                    if sub == "images" and descriptions:
                        dst.descriptions = tuple(descriptions)
            minx, maxy = chip_t @ (0, 0)
            maxx, miny = chip_t @ (CHIP, CHIP)
            rows.append(f"images/{name},labels/{name},{col},{row},{CHIP},{CHIP},{minx},{miny},{maxx},{maxy},0,0")
    (out / "index.csv").write_text("\n".join(rows) + "\n")
    meta = {"scene": "scene.tif", "crs": crs.to_string(), "width": width, "height": height,
            "transform": list(transform)[:6], "size": CHIP, "overlap": 0, "bands": list(range(1, bands + 1)),
            "dtype": image.dtype.name, "nodata": None}
    if band_stats:
        acc = StatsAccumulator(bands, image.dtype)
        acc.add(image)
        meta["band_stats"] = acc.stats(descriptions)
    (out / "index.json").write_text(json.dumps(meta))
    return out


def chips_config(chips, out, epochs=3):
    return {"data": {"source": "chips", "chips": [str(chips)], "batch_size": 8, "val_fraction": 0.25,
                     "augment": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.1}},
            "model": {"arch": TINY_ARCH},
            "optim": {"lr": 0.02, "warmup_fraction": 0.0},
            "run": {"out_dir": str(out), "epochs": epochs, "progress": False, "device": "cpu", "precision": "fp32",
                    "thresholds": [0.3, 0.4, 0.5, 0.6, 0.7]}}


DTYPES = {  # data type: how the uint8 scene becomes it
    "uint16": lambda x: x.astype(np.uint16) * 8,  # 11-bit data
    "int16": lambda x: (x.astype(np.int16) * 8 - 1000).astype(np.int16),
    "float32": lambda x: x.astype(np.float32) / 255,  # reflectance
}


@pytest.mark.slow  # four short training runs (~15 s)
def test_every_data_type_trains_as_well_as_uint8(scene, tmp_path, stand_ins):
    image, labels, crs, transform = scene
    base = write_chips(tmp_path / "uint8", image, labels, crs, transform)
    ref = load_checkpoint(fit(load_config(chips_config(base, tmp_path / "run_uint8"))))
    assert ref["meta"]["val_dice"] > 0.3  # it learnt something
    for name, convert in DTYPES.items():
        chips = write_chips(tmp_path / name, convert(image), labels, crs, transform, band_stats=name != "int16")
        ckpt = load_checkpoint(fit(load_config(chips_config(chips, tmp_path / f"run_{name}"))))
        assert ckpt["meta"]["val_dice"] == pytest.approx(ref["meta"]["val_dice"], abs=0.02), name
        # the model normalises with the data's own statistics: 11-bit data is not divided by 255
        scale = {"uint16": 8, "int16": 8, "float32": 1 / 255}[name]
        np.testing.assert_allclose(ckpt["model"]["std"], np.array(ref["model"]["std"]) * scale, rtol=1e-3)
        assert ckpt["meta"]["band_stats"][0]["dtype"] == name


def test_band_stats_from_the_index_or_computed_from_the_chips(scene, tmp_path):
    image, labels, crs, transform = scene
    stats = [{"band": b + 1, "description": None, "mean": 10.0 * (b + 1), "std": 2.0, "p01": 0.0, "p99": 50.0,
              "dtype": "uint8"} for b in range(3)]
    given = write_chips(tmp_path / "given", image, labels, crs, transform, band_stats=False)
    meta = json.loads((given / "index.json").read_text())
    (given / "index.json").write_text(json.dumps(dict(meta, band_stats=stats)))
    assert ChipDataset(given).band_stats == stats
    computed = write_chips(tmp_path / "computed", image[..., :2].astype(np.uint16) * 8, labels, crs, transform,
                           band_stats=False, descriptions=["red", "nir"])
    ds = ChipDataset(computed)
    pixels = image[..., :2].reshape(-1, 2).astype(np.float64) * 8
    for b, found in enumerate(ds.band_stats):
        assert found["mean"] == pytest.approx(pixels[:, b].mean()) and found["dtype"] == "uint16"
        assert found["std"] == pytest.approx(pixels[:, b].std(), rel=1e-6)
        assert found["p01"] == np.percentile(pixels[:, b], 1, method="inverted_cdf")
        assert found["p99"] == np.percentile(pixels[:, b], 99, method="inverted_cdf")
    assert ds.source_bands == [{"band": 1, "description": "red"}, {"band": 2, "description": "nir"}]
    assert ds.gsd == pytest.approx(0.3)


def test_band_stats_combine_by_pixel_count_or_equally():
    a = [{"band": 1, "description": "red", "mean": 0.0, "std": 1.0, "p01": -2.0, "p99": 2.0, "dtype": "int16"}]
    b = [dict(a[0], mean=4.0, std=1.0, p01=2.0, p99=6.0)]
    equal = combine_stats([a, b])[0]
    assert equal["mean"] == 2.0 and equal["std"] == pytest.approx(np.sqrt(5.0)) and equal["p99"] == 4.0
    weighted = combine_stats([[dict(a[0], count=300)], [dict(b[0], count=100)]])[0]
    values = np.concatenate([np.repeat([-1.0, 1.0], 150), np.repeat([3.0, 5.0], 50)])  # same means and stds
    assert weighted["mean"] == pytest.approx(values.mean()) and weighted["std"] == pytest.approx(values.std())
    assert weighted["count"] == 400 and weighted["description"] == "red"
    assert normalisation([dict(a[0], std=0.0)]) == ([0.0], [1.0])
    with pytest.raises(DatasetError, match="disagree"):
        combine_stats([a, a + b])
    acc = StatsAccumulator(2, "float32", nodata=0.0)
    acc.add(np.zeros((4, 4, 2), np.float32))
    with pytest.raises(DatasetError, match="every pixel is nodata"):
        acc.stats()
    acc.add(np.array([[[1.0, 2.0], [3.0, np.nan], [0.0, 0.0]]], np.float32))
    assert [s["mean"] for s in acc.stats()] == [1.0, 2.0]  # nodata pixels and NaNs left out


def test_gsd_in_metres_for_projected_and_geographic_grids():
    assert gsd_metres("EPSG:32650", [0.3, 0, 500000, 0, -0.3, 4e6], 100, 100) == pytest.approx(0.3)
    assert gsd_metres("EPSG:2263", [2.0, 0, 0, 0, -2.0, 0], 10, 10) == pytest.approx(0.6096, rel=1e-4)  # US feet
    # SpaceNet-1 Rio: ~0.5 m pixels of 4.5e-6 degrees at 22.9 S
    rio = gsd_metres("EPSG:4326", [4.5e-6, 0, -43.2, 0, -4.5e-6, -22.9], 400, 400)
    assert rio == pytest.approx(0.5 * (1 + np.cos(np.radians(22.9))) * 4.5e-6 * 111_320, rel=0.01)
    assert gsd_metres("", [1, 0, 0, 0, -1, 0], 1, 1) is None


def test_photometric_augmentation_keeps_the_data_range():
    rng = np.random.default_rng(0)
    image = np.full((8, 8, 3), 2000.0, np.float32)
    image[0, 0] = 4000.0
    out = TrainTransform(d4=False, brightness=0.5, contrast=0.5, min_value=0.0, max_value=65535.0).photometric(
        image, rng)
    assert out.max() > 255 and out.max() <= 65535  # uint16: not clipped to 255
    signed = TrainTransform(d4=False, brightness=0.5, min_value=-32768.0, max_value=32767.0).photometric(
        -image, np.random.default_rng(1))
    assert signed.min() < 0  # int16: negative values kept
    floats = TrainTransform(d4=False, brightness=0.5, min_value=None, max_value=None).photometric(
        image / 1e4, np.random.default_rng(2))
    assert floats.max() != pytest.approx(0.4)  # changed, not clipped


def test_checkpoint_records_bands_stats_and_gsd(scene, tmp_path, stand_ins):
    image, labels, crs, transform = scene
    chips = write_chips(tmp_path / "c", image, labels, crs, transform, descriptions=["r", "g", "b"])
    cfg = chips_config(chips, tmp_path / "run", epochs=1)
    ckpt = load_checkpoint(fit(load_config(cfg)))
    meta = ckpt["meta"]
    assert meta["bands"] == [{"band": 1, "description": "r"}, {"band": 2, "description": "g"},
                             {"band": 3, "description": "b"}]
    assert meta["gsd_m"] == pytest.approx(0.3)
    assert [s["mean"] for s in meta["band_stats"]] == pytest.approx(ckpt["model"]["mean"])
    cfg["model"].update(mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0])  # set in the config: they win
    cfg["run"]["out_dir"] = str(tmp_path / "set")
    ckpt = load_checkpoint(fit(load_config(cfg)))
    assert ckpt["model"]["mean"] == [1.0, 2.0, 3.0] and ckpt["model"]["std"] == [4.0, 5.0, 6.0]
    train, _ = build_datasets(load_config(cfg))
    assert torch.is_tensor(train[0]["image"])


def write_patches(root, image, labels, fmt="png", mask_kind="0/255", georef=None, size=128):
    """The scene cut into size^2 image/mask patch files (PNG without georeferencing by default)."""
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    ext = {"png": "png", "GTiff": "tif"}[fmt]
    driver = {"png": "PNG", "GTiff": "GTiff"}[fmt]
    for row in range(0, image.shape[0], size):
        for col in range(0, image.shape[1], size):
            patch = np.moveaxis(image[row:row + size, col:col + size], -1, 0)
            lab = labels[row:row + size, col:col + size]
            mask = {"0/1": lab[None], "0/255": lab[None] * 255, "rgb": np.repeat(lab[None] * 255, 3, axis=0)}[
                mask_kind].astype(np.uint8)
            mask[0, :2] = 7  # an ignore value on the first two rows
            extra = {} if georef is None else {"crs": georef[0], "transform": georef[1] @ Affine.translation(col, row)}
            for folder, array in (("img", patch), ("gt", mask)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain PNG patches
                    with rasterio.open(root / folder / f"p{row}_{col}.{ext}", "w", driver=driver, width=size,
                                       height=size, count=array.shape[0], dtype=array.dtype, **extra) as dst:
                        dst.write(array)
    return root


def images_config(root, out, epochs=3, **data):
    cfg = chips_config(root, out, epochs)
    cfg["data"] = dict(source="images", images=str(root / "img"), masks=str(root / "gt" / "*"), batch_size=4,
                       val_fraction=0.25, augment={"brightness": 0.2, "contrast": 0.2}, **data)
    return cfg


@pytest.mark.parametrize("mask_kind", ["0/1", "0/255", "rgb"])
def test_image_folder_pairs_by_stem_and_reads_every_mask_kind(scene, tmp_path, mask_kind):
    from rsseg.training.imagefolders import ImageFolderDataset

    image, labels, crs, transform = scene
    root = write_patches(tmp_path, image, labels, mask_kind=mask_kind)
    (root / "img" / "p0_0.png.aux.xml").write_text("<PAMDataset/>")  # a GDAL sidecar is not an image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NotGeoreferencedWarning escapes
        ds = ImageFolderDataset(root / "img", root / "gt", mask_ignore=7)
        item = ds[0]
    assert len(ds) == 16 and ds.bands == 3 and ds.size == 128 and ds.gsd is None
    assert item["image"].shape == (3, 128, 128) and item["valid"][0, :2].sum() == 0
    np.testing.assert_array_equal(item["mask"][0, 2:].numpy(), labels[2:128, :128])
    train = ImageFolderDataset(root / "img", str(root / "gt" / "*.png"), "train", val_fraction=0.25)
    val = ImageFolderDataset(root / "img", root / "gt", "val", val_fraction=0.25)
    assert len(train) == 12 and len(val) == 4 and not {p for p, _ in train.items} & {p for p, _ in val.items}
    assert [s["dtype"] for s in val.band_stats] == ["uint8"] * 3 and val.band_stats == train.band_stats


def test_image_folder_band_stats_are_of_the_training_images(scene, tmp_path):
    from rsseg.training.imagefolders import ImageFolderDataset

    image, labels, crs, transform = scene
    root = write_patches(tmp_path, image, labels)
    train = ImageFolderDataset(root / "img", root / "gt", "train", val_fraction=0.25)
    pixels = np.concatenate([train.load(i)[0].reshape(-1, 3) for i in range(len(train))]).astype(np.float64)
    assert [s["mean"] for s in train.band_stats] == pytest.approx(pixels.mean(axis=0).tolist())
    assert [s["std"] for s in train.band_stats] == pytest.approx(pixels.std(axis=0).tolist(), rel=1e-6)


def test_image_folder_unmatched_stems_are_one_error(scene, tmp_path):
    from rsseg.training.imagefolders import ImageFolderDataset

    image, labels, crs, transform = scene
    root = write_patches(tmp_path, image, labels)
    (root / "gt" / "p0_0.png").rename(root / "gt" / "p0_0_mask.png")
    (root / "gt" / "p0_128.png").unlink()
    with pytest.raises(DatasetError, match=r"unmatched stems .*: 2 images without a mask \(p0_0, p0_128\); "
                                           r"1 masks without an image \(p0_0_mask\)") as err:
        ImageFolderDataset(root / "img", root / "gt")
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="matches no files"):
        ImageFolderDataset(root / "img", str(root / "nothing" / "*.png"))


def test_training_on_georeferenced_tiff_patches_records_their_gsd(scene, tmp_path, stand_ins):
    image, labels, crs, transform = scene
    root = write_patches(tmp_path / "data", image, labels, fmt="GTiff", mask_kind="0/1", georef=(crs, transform))
    ckpt = load_checkpoint(fit(load_config(images_config(root, tmp_path / "run", epochs=1, mask_ignore=7))))
    meta = ckpt["meta"]
    assert meta["gsd_m"] == pytest.approx(0.3) and meta["data"]["source"] == "images"
    assert len(meta["bands"]) == 3 and meta["band_stats"][0]["dtype"] == "uint8"
    with open(tmp_path / "run" / "split.csv", newline="") as fh:
        sides = [line.split(",")[-1].strip() for line in fh.readlines()[1:]]
    assert sorted(set(sides)) == ["train", "val"] and len(sides) == 16


@pytest.mark.slow  # a short training run on PNG patches (~10 s)
def test_training_on_png_patches_learns(scene, tmp_path, stand_ins):
    image, labels, crs, transform = scene
    root = write_patches(tmp_path / "data", image, labels)
    ckpt = load_checkpoint(fit(load_config(images_config(root, tmp_path / "run", epochs=4, mask_ignore=7))))
    assert ckpt["meta"]["val_dice"] > 0.3 and ckpt["meta"]["gsd_m"] is None
