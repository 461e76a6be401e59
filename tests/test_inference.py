"""Sliding-window inference: seams, georeferencing, nodata, submissions and bad input (rsseg.inference.predict)."""

import json

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch
from affine import Affine
from click.testing import CliRunner
from PIL import Image
from torch import nn

from rsseg.cli import cli, main
from rsseg.errors import CheckpointError, ConfigError, DatasetError, RasterError
from rsseg.fileio import file_sha256
from rsseg.inference import outputs
from rsseg.inference.blend import StripAccumulator, axis_shares, window_weights
from rsseg.inference.options import PredictOptions
from rsseg.inference.predict import predict_images, predict_raster, prob_path, read_tags
from rsseg.models import Segmenter, create_model, model_config, save_checkpoint
from rsseg.options import resolve
from rsseg.tianchi.files import read_masks_csv, validate_submission
from rsseg.tiling.grid import TileGrid, grid_offsets

TRANSFORM = Affine(0.3, 0.0, 500_000.0, 0.0, -0.3, 3_400_000.0)


def write_raster(path, data, nodata=None, crs="EPSG:32650", **options):
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=TRANSFORM, nodata=nodata, **options)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def fcn(seed=0, bands=3):
    """Three 3x3 convolutions: receptive field 7 px, i.e. less than half of the 32 px overlap used below."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(bands, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(8, 1, 3, padding=1))
    return Segmenter(net, (110.0,) * bands, (60.0,) * bands).eval()


def whole_image_prob(model, image):
    with torch.inference_mode():
        return torch.sigmoid(model(torch.from_numpy(image)[None]))[0, 0].numpy()


def read(path, masked=False):
    with rasterio.open(path) as src:
        return src.read(1, masked=masked)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real create_model checkpoint (U-Net, resnet18) whose meta holds a validation threshold."""
    torch.manual_seed(0)
    model = create_model("unet", "resnet18")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, model_config(model, arch="unet", encoder="resnet18", in_channels=3),
                    meta={"threshold": 0.4})
    return path


@pytest.fixture
def scene(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (3, 300, 410), dtype=np.uint8)
    return write_raster(tmp_path / "scene.tif", image), image


@pytest.mark.parametrize(("tta", "batch_size"), [("none", 3), ("flip", 5)])
def test_windowed_prediction_equals_whole_image(tmp_path, scene, tta, batch_size):
    src, image = scene
    model = fcn()
    out = predict_raster(model, src, tmp_path / "p.tif", tile=128, overlap=32, tta=tta, batch_size=batch_size,
                         device="cpu", output="prob", prob_dtype="float32")
    got = read(out)
    want = whole_image_prob(model, image)
    if tta == "flip":
        views = [want, whole_image_prob(model, image[:, :, ::-1].copy())[:, ::-1],
                 whole_image_prob(model, image[:, ::-1].copy())[::-1],
                 whole_image_prob(model, image[:, ::-1, ::-1].copy())[::-1, ::-1]]
        want = np.mean(views, axis=0)
    assert got.shape == want.shape == (300, 410)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[-1], want[-1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[:, -1], want[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("width", "height", "size", "overlap"),
                         [(410, 300, 128, 32), (100, 37, 64, 40), (50, 20, 64, 8)])
def test_strip_blend_is_the_weighted_mean_of_the_windows(width, height, size, overlap):
    """Sums of prediction x share (the strip) equal sum(w * p) / sum(w) with the 2-D window weights."""
    grid = TileGrid(width, height, size, overlap)
    preds = torch.from_numpy(np.random.default_rng(4).random((len(grid), size, size), dtype=np.float32))
    sums, weights = np.zeros((height + size, width + size)), np.zeros((height + size, width + size))
    strip, got = StripAccumulator(grid, torch.device("cpu")), np.full((height, width), np.nan, np.float32)
    for window, pred in zip(grid, preds, strict=True):
        w = window_weights(grid, window)
        sums[window.row_off : window.row_off + size, window.col_off : window.col_off + size] += w * pred.numpy()
        weights[window.row_off : window.row_off + size, window.col_off : window.col_off + size] += w
        if (done := strip.add(window, pred)) is not None:
            got[done[0] : done[0] + len(done[1])] = done[1]
    np.testing.assert_allclose(got, sums[:height, :width] / weights[:height, :width], atol=1e-6, rtol=0)
    for length, shares in ((height, axis_shares(height, size, overlap)), (width, axis_shares(width, size, overlap))):
        total = np.zeros(length + size)
        for off, share in zip(grid_offsets(length, size, overlap), shares, strict=True):
            total[off : off + size] += share
        np.testing.assert_allclose(total[:length], 1, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path, scene):
    src, _ = scene
    kwargs = dict(tile=128, overlap=32, tta="d4", batch_size=4, output="both", prob_dtype="float32")
    cpu = predict_raster(fcn(), src, tmp_path / "cpu.tif", device="cpu", **kwargs)
    gpu = predict_raster(fcn(), src, tmp_path / "gpu.tif", device="cuda", **kwargs)
    np.testing.assert_allclose(read(prob_path(gpu)), read(prob_path(cpu)), atol=2e-3)  # cuDNN may use TF32
    bf16 = predict_raster(fcn(), src, tmp_path / "bf16.tif", device="cuda", precision="bf16", **kwargs)
    assert (read(bf16) == read(cpu)).mean() > 0.95


def test_default_batches_sized_in_views_equal_an_explicit_batch(tmp_path, scene, monkeypatch):
    """The default plan (views sized by free memory) and a window's views split over passes change nothing."""
    from rsseg.inference import batching

    src, _ = scene
    kwargs = dict(tile=128, overlap=32, tta="d4", device="cpu", output="prob", prob_dtype="float32")
    explicit = read(predict_raster(fcn(), src, tmp_path / "explicit.tif", batch_size=4, **kwargs))
    default = read(predict_raster(fcn(), src, tmp_path / "default.tif", **kwargs))
    np.testing.assert_allclose(default, explicit, atol=1e-6, rtol=0)
    monkeypatch.setattr(batching, "free_memory", lambda device: 12 * batching.BYTES_PER_PIXEL * 128 * 128)
    split = read(predict_raster(fcn(), src, tmp_path / "split.tif", **kwargs))  # 3 views per pass
    np.testing.assert_allclose(split, explicit, atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_cuda_index_with_default_batches_matches_cpu(tmp_path, scene):
    src, _ = scene
    kwargs = dict(tile=128, overlap=32, tta="d4", output="both", prob_dtype="float32")
    cpu = predict_raster(fcn(), src, tmp_path / "cpu.tif", device="cpu", **kwargs)
    gpu = predict_raster(fcn(), src, tmp_path / "gpu.tif", device="cuda:0", **kwargs)
    np.testing.assert_allclose(read(prob_path(gpu)), read(prob_path(cpu)), atol=2e-3)
    assert torch.cuda.current_device() == 0
    last = torch.cuda.device_count() - 1
    gpu_n = predict_raster(fcn(), src, tmp_path / "gpu_n.tif", device=f"cuda:{last}", **kwargs)
    np.testing.assert_allclose(read(prob_path(gpu_n)), read(prob_path(cpu)), atol=2e-3)
    assert torch.cuda.current_device() == 0  # the process's current device is left as it was


def test_raster_smaller_than_a_window(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (3, 50, 70), dtype=np.uint8)
    src = write_raster(tmp_path / "small.tif", image)
    out = predict_raster(fcn(), src, tmp_path / "m.tif", tile=64, overlap=16, tta="d4", device="cpu",
                         output="both", prob_dtype="float32")
    mask, prob = read(out), read(prob_path(out))
    assert mask.shape == prob.shape == (50, 70)
    assert np.isfinite(prob).all() and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, (prob > 0.5).astype(np.uint8))


def nodata_scene(tmp_path):
    image = np.random.default_rng(2).integers(1, 256, (3, 200, 260), dtype=np.uint8)
    image[:, :40, :] = 0  # a nodata collar along the top
    image[:, 100:110, 200:] = 0  # and a patch at the right edge
    image[0, 150, 10] = 0  # one band at the nodata value is still valid data
    return write_raster(tmp_path / "nodata.tif", image, nodata=0), (image == 0).all(axis=0)


def test_georeferencing_nodata_and_tags(tmp_path):
    src, nodata = nodata_scene(tmp_path)
    model = fcn()
    out = predict_raster(model, src, tmp_path / "mask.tif", tile=128, overlap=32, tta="flip", device="cpu",
                         output="both", threshold=0.45)
    with rasterio.open(out) as mask_ds, rasterio.open(prob_path(out)) as prob_ds:
        for ds in (mask_ds, prob_ds):
            assert ds.crs.to_epsg() == 32650 and ds.transform == TRANSFORM
            assert ds.count == 1 and ds.dtypes[0] == "uint8" and (ds.width, ds.height) == (260, 200)
            assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
            assert ds.compression is not None
        assert mask_ds.nodata == 255 and prob_ds.nodata is None
        mask, prob, prob_valid = mask_ds.read(1), prob_ds.read(1), prob_ds.dataset_mask() > 0
    np.testing.assert_array_equal(mask == 255, nodata)
    np.testing.assert_array_equal(prob_valid, ~nodata)
    assert set(np.unique(mask[~nodata])) == {0, 1}
    p = prob[~nodata] / 255.0  # uint8 probabilities are rounded: compare away from the threshold
    assert (mask[~nodata][p > 0.45 + 0.5 / 255] == 1).all() and (mask[~nodata][p < 0.45 - 0.5 / 255] == 0).all()
    tags = read_tags(out)
    assert tags["rsseg:tta"] == "flip" and tags["rsseg:threshold"] == "0.45"
    assert tags["rsseg:source"] == src.name and len(tags["rsseg:checkpoint_sha256"]) == 64
    assert tags["rsseg:source_sha256"] == file_sha256(src)
    assert not any(str(tmp_path) in value for value in tags.values())  # no absolute local paths
    assert read_tags(prob_path(out)) == tags


@pytest.mark.parametrize("prob_dtype", ["uint8", "float32"])
def test_outputs_are_cogs_with_overviews_and_a_mask_colour_table(tmp_path, prob_dtype):
    """Both outputs: GDAL's COG layout, 512 px internal tiles, overviews; the mask has a colour table;
    values equal a plain streamed run's (the windowed prediction without the conversion)."""
    image = np.random.default_rng(7).integers(1, 256, (3, 1100, 1300), dtype=np.uint8)
    image[:, :40, :] = 0
    src = write_raster(tmp_path / "big.tif", image, nodata=0)
    model = fcn()
    out = predict_raster(model, src, tmp_path / "mask.tif", tile=256, overlap=32, tta="none", device="cpu",
                         output="both", prob_dtype=prob_dtype, threshold=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "mask.prob.tif", "mask.tif"]  # nothing staged
    prob_model = whole_image_prob(model, image)
    for path in (out, prob_path(out)):
        with rasterio.open(path) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512) and ds.compression is not None
            assert ds.overviews(1) and max(ds.width, ds.height) / ds.overviews(1)[-1] <= 512  # down to one tile
            assert ds.tags(ns="rsseg")["tta"] == "none"
            compression, width = ds.compression, ds.width
        with rasterio.open(path, overview_level=0) as ovr:  # overviews compressed like the full resolution
            assert ovr.compression == compression and ovr.width == (width + 1) // 2
    with rasterio.open(out) as ds:
        colors = ds.colormap(1)
        assert colors[1][:3] == (255, 0, 0) and colors[0][:3] == (0, 0, 0)
        mask = ds.read(1)
    with rasterio.open(prob_path(out)) as ds:
        prob, valid = ds.read(1), ds.dataset_mask() > 0
    nodata = (image == 0).all(axis=0)
    np.testing.assert_array_equal(mask == 255, nodata)
    np.testing.assert_array_equal(valid, ~nodata)
    plain = predict_raster(model, src, tmp_path / "plain" / "mask.tif", tile=256, overlap=32, tta="none",
                           device="cpu", output="both", prob_dtype=prob_dtype, threshold=0.5, cog=False)
    with rasterio.open(plain) as ds:  # --no-cog: the streamed tiled GeoTIFF, same pixels
        assert "LAYOUT" not in ds.tags(ns="IMAGE_STRUCTURE") and not ds.overviews(1) and ds.colormap(1)[1][0] == 255
        np.testing.assert_array_equal(ds.read(1), mask)
    np.testing.assert_array_equal(read(prob_path(plain)), prob)
    if prob_dtype == "float32":
        np.testing.assert_array_equal(np.isnan(prob), nodata)
        np.testing.assert_array_equal(mask[~nodata], (prob[~nodata] > 0.5).astype(np.uint8))
    # blended windows away from the no-data border equal the whole-image prediction (values unchanged)
    got = prob[100:, :].astype(np.float32) / (255 if prob_dtype == "uint8" else 1)
    np.testing.assert_allclose(got, prob_model[100:, :], atol=0.5 / 255 + 1e-5 if prob_dtype == "uint8" else 1e-5)


def test_compressed_staging_of_large_scenes_gives_the_same_cogs(tmp_path, monkeypatch):
    """Above STAGING_PLAIN_MAX bytes the staging files are ZSTD-compressed: same pixels, overviews and codecs."""
    image = np.random.default_rng(8).integers(1, 256, (3, 530, 700), dtype=np.uint8)
    image[:, :30, :] = 0
    src = write_raster(tmp_path / "scene.tif", image, nodata=0)  # over one 512 px tile: overviews
    kwargs = dict(tile=256, overlap=32, tta="none", device="cpu", output="both", threshold=0.5)
    plain = predict_raster(fcn(), src, tmp_path / "plain" / "m.tif", **kwargs)
    monkeypatch.setattr(outputs, "STAGING_PLAIN_MAX", 0)
    packed = predict_raster(fcn(), src, tmp_path / "packed" / "m.tif", **kwargs)
    assert sorted(p.name for p in packed.parent.iterdir()) == ["m.prob.tif", "m.tif"]
    codecs = rasterio.enums.Compression.deflate, rasterio.enums.Compression.zstd  # mask, probabilities
    for a, b, codec in ((plain, packed, codecs[0]), (prob_path(plain), prob_path(packed), codecs[1])):
        for level in (None, 0):
            with rasterio.open(a, overview_level=level) as x, rasterio.open(b, overview_level=level) as y:
                assert x.compression == y.compression == codec
                np.testing.assert_array_equal(x.read(1), y.read(1))
                np.testing.assert_array_equal(x.dataset_mask(), y.dataset_mask())


def test_a_mask_band_marks_nodata_too(tmp_path):
    image = np.random.default_rng(5).integers(0, 256, (3, 96, 120), dtype=np.uint8)
    valid = np.ones((96, 120), bool)
    valid[:, :30] = False
    src = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        write_raster(src, image)
        with rasterio.open(src, "r+") as ds:
            ds.write_mask(valid.astype(np.uint8) * 255)
    out = predict_raster(fcn(), src, tmp_path / "m.tif", tile=64, overlap=16, tta="none", device="cpu")
    np.testing.assert_array_equal(read(out) == 255, ~valid)


def test_float_probabilities_mark_nodata_with_nan(tmp_path):
    src, nodata = nodata_scene(tmp_path)
    out = predict_raster(fcn(), src, tmp_path / "p.tif", tile=96, overlap=32, tta="none", device="cpu",
                         output="prob", prob_dtype="float32")
    prob = read(out)
    np.testing.assert_array_equal(np.isnan(prob), nodata)
    assert ((prob[~nodata] >= 0) & (prob[~nodata] <= 1)).all()


def test_checkpoint_threshold_and_digest(tmp_path, checkpoint):
    image = np.random.default_rng(3).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    src = write_raster(tmp_path / "s.tif", image)
    out = predict_raster(checkpoint, src, tmp_path / "m.tif", tile=64, overlap=16, tta="none", device="cpu",
                         output="both", prob_dtype="float32")
    tags = read_tags(out)
    assert tags["rsseg:threshold"] == "0.4"
    assert tags["rsseg:precision"] == "fp32"  # auto: the checkpoint records no validation precision
    assert tags["rsseg:checkpoint"] == checkpoint.name
    assert tags["rsseg:checkpoint_sha256"] == file_sha256(checkpoint)
    np.testing.assert_array_equal(read(out), (read(prob_path(out)) > 0.4).astype(np.uint8))


class FailingModel(nn.Module):
    """Works for ``n`` batches, then raises (to check that a failed run leaves nothing behind)."""

    def __init__(self, n):
        super().__init__()
        self.inner, self.n = fcn(), n

    def forward(self, x):
        self.n -= 1
        if self.n < 0:
            raise RuntimeError("boom")
        return self.inner(x)


def test_a_failed_run_leaves_no_output(tmp_path, scene):
    src, _ = scene
    with pytest.raises(RuntimeError, match="boom"):
        predict_raster(FailingModel(3), src, tmp_path / "out.tif", tile=64, overlap=16, tta="none",
                       batch_size=2, device="cpu", output="both")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_existing_output_is_refused_unless_overwrite(tmp_path, scene):
    src, _ = scene
    dst = tmp_path / "out.tif"
    dst.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        predict_raster(fcn(), src, dst, tile=128, overlap=32, tta="none", device="cpu")
    assert dst.read_bytes() == b"keep me"
    predict_raster(fcn(), src, dst, tile=128, overlap=32, tta="none", device="cpu", overwrite=True)
    assert read(dst).shape == (300, 410)


def test_band_count_must_match_the_model(tmp_path, checkpoint):
    src = write_raster(tmp_path / "four.tif", np.zeros((4, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(RasterError, match="4 band.*trained on 3"):
        predict_raster(checkpoint, src, tmp_path / "out.tif", device="cpu")
    assert not (tmp_path / "out.tif").exists()
    # GDAL's default for 4 uint8 bands is RGBA: the alpha band is the nodata mask, not a model band
    rgba = np.full((4, 32, 32), 200, np.uint8)
    rgba[3, :, :8] = 0
    out = predict_raster(checkpoint, write_raster(tmp_path / "rgba.tif", rgba), tmp_path / "rgba_mask.tif",
                         device="cpu", tile=32, overlap=8, tta="none")
    assert (read(out)[:, :8] == 255).all() and (read(out)[:, 8:] != 255).all()


def write_described(path, data, descriptions):
    write_raster(path, data, photometric="minisblack")
    with rasterio.open(path, "r+") as ds:
        ds.descriptions = tuple(descriptions)
    return path


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    """A checkpoint whose meta records its source bands (red, green, blue: bands 1-3 of its scenes)."""
    torch.manual_seed(0)
    model = create_model("unet", "resnet18")
    path = tmp_path_factory.mktemp("ckpt") / "rgb.pt"
    bands = [{"band": i, "description": d} for i, d in enumerate(("red", "green", "blue"), start=1)]
    save_checkpoint(path, model, model_config(model, arch="unet", encoder="resnet18", in_channels=3),
                    meta={"threshold": 0.5, "bands": bands})
    return path


def test_bands_select_and_order_the_scene_bands(tmp_path):
    image = np.random.default_rng(11).integers(0, 256, (4, 96, 128), dtype=np.uint8)
    src = write_raster(tmp_path / "rgbn.tif", image, photometric="minisblack")  # GDAL: 4 uint8 bands = RGBA
    model = fcn()
    out = predict_raster(model, src, tmp_path / "p.tif", tile=128, overlap=32, tta="none", device="cpu",
                         output="prob", prob_dtype="float32", bands=[4, 3, 2])
    want = predict_raster(model, write_raster(tmp_path / "nir_r_g.tif", image[[3, 2, 1]]), tmp_path / "w.tif",
                          tile=128, overlap=32, tta="none", device="cpu", output="prob", prob_dtype="float32")
    np.testing.assert_array_equal(read(out), read(want))
    with pytest.raises(RasterError, match=r"has 4 bands \(no descriptions\); --bands 1,5 names band\(s\) 5"):
        predict_raster(model, src, tmp_path / "q.tif", device="cpu", bands=[1, 5])
    with pytest.raises(RasterError, match="--bands selects 2; the model was trained on 3"):
        predict_raster(model, src, tmp_path / "q.tif", device="cpu", bands=[1, 2])
    with pytest.raises(ConfigError, match="bands"):
        predict_raster(model, src, tmp_path / "q.tif", device="cpu", bands=[0, 1, 2])


def test_recorded_bands_are_found_by_description_or_refused_in_one_line(tmp_path, rgb_checkpoint):
    image = np.random.default_rng(12).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    # described in another order, with a fourth band: the model's red, green, blue are found by name
    src = write_described(tmp_path / "bgrn.tif", image, ["Blue", "green", "red", "nir"])
    out = predict_raster(rgb_checkpoint, src, tmp_path / "a.tif", tile=64, overlap=16, tta="none", device="cpu",
                         output="prob", prob_dtype="float32")
    want = predict_raster(rgb_checkpoint, write_raster(tmp_path / "rgb.tif", image[[2, 1, 0]]), tmp_path / "b.tif",
                          tile=64, overlap=16, tta="none", device="cpu", output="prob", prob_dtype="float32")
    np.testing.assert_allclose(read(out), read(want), atol=1e-6)
    # no descriptions: the recorded indexes 1-3 of a 4-band scene
    plain = write_raster(tmp_path / "plain.tif", image, photometric="minisblack")
    got = predict_raster(rgb_checkpoint, plain, tmp_path / "c.tif", tile=64, overlap=16, tta="none", device="cpu",
                         output="prob", prob_dtype="float32")
    np.testing.assert_allclose(read(got), read(predict_raster(
        rgb_checkpoint, write_raster(tmp_path / "first3.tif", image[:3]), tmp_path / "d.tif", tile=64, overlap=16,
        tta="none", device="cpu", output="prob", prob_dtype="float32")), atol=1e-6)
    # a described scene without a blue band: one line naming what it has
    pan = write_described(tmp_path / "pan.tif", image[:2], ["red", "pan"])
    with pytest.raises(RasterError) as err:
        predict_raster(rgb_checkpoint, pan, tmp_path / "e.tif", device="cpu")
    message = str(err.value)
    assert "\n" not in message and "has 2 bands (1 red, 2 pan)" in message and "lacks green, blue" in message
    assert not (tmp_path / "e.tif").exists()
    # --bands overrides the recorded bands (a differing description is only logged)
    predict_raster(rgb_checkpoint, src, tmp_path / "f.tif", tile=64, overlap=16, tta="none", device="cpu",
                   bands=[1, 2, 4])


def test_bands_through_the_cli(tmp_path, rgb_checkpoint):
    image = np.random.default_rng(13).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    src = write_described(tmp_path / "s.tif", image, ["red", "green", "blue", "nir"])
    result = CliRunner().invoke(cli, ["predict", str(rgb_checkpoint), str(src), str(tmp_path / "m.tif"),
                                      "--bands", "3,2,1", "--tta", "none", "--device", "cpu", "--tile", "64",
                                      "--overlap", "16"])
    assert result.exit_code == 0, result.output
    assert read(tmp_path / "m.tif").shape == (64, 64)


# ------------------------------------------------------------------------------------------ resolution
class OpenedBlue(nn.Module):
    """A scale-sensitive stand-in for a model trained at 0.3 m: the generated scenes' roofs are bluer than the
    ground; that map is opened (eroded, dilated) over 15 px and smoothed, so its footprints depend on the
    pixel size (at 0.6 m, 15 px are twice as many metres)."""

    def forward(self, x):
        roofs = (x.float()[:, 2:3] > 100).float()
        roofs = torch.nn.functional.max_pool2d(-torch.nn.functional.max_pool2d(-roofs, 15, 1, 7), 15, 1, 7)
        return (torch.nn.functional.avg_pool2d(roofs, 5, 1, 2, count_include_pad=False) - 0.5) * 20


def footprint_iou(mask_path, footprints):
    from rasterio.features import rasterize

    with rasterio.open(mask_path) as ds:
        mask, transform, crs = ds.read(1) == 1, ds.transform, ds.crs
    truth = rasterize(footprints.to_crs(crs).geometry, out_shape=mask.shape, transform=transform).astype(bool)
    return (mask & truth).sum() / (mask | truth).sum()


def test_windows_are_resampled_to_the_models_gsd_and_written_on_the_scene_grid(tmp_path):
    from rsseg.synth.generate import make_scene

    footprints = make_scene(tmp_path / "fine.tif", size=768, seed=3, gsd=0.3, progress=False)
    make_scene(tmp_path / "coarse.tif", size=384, seed=3, gsd=0.6, progress=False)  # the same layout at 0.6 m
    model, kw = OpenedBlue(), dict(window=256, overlap=64, tta="none", device="cpu", output="both", threshold=0.5)
    native = predict_raster(model, tmp_path / "fine.tif", tmp_path / "native.tif", gsd="0.3", **kw)
    resampled = predict_raster(model, tmp_path / "coarse.tif", tmp_path / "resampled.tif", gsd="0.3", **kw)
    without = predict_raster(model, tmp_path / "coarse.tif", tmp_path / "without.tif", gsd="native", **kw)
    iou = {name: footprint_iou(path, footprints) for name, path in
           (("native", native), ("resampled", resampled), ("without", without))}
    assert abs(iou["resampled"] - iou["native"]) <= 0.05, iou
    assert iou["resampled"] > iou["without"] + 0.05, iou
    with rasterio.open(tmp_path / "coarse.tif") as src, rasterio.open(resampled) as out:
        assert (out.width, out.height, out.transform, out.crs) == (src.width, src.height, src.transform, src.crs)
    assert read_tags(resampled)["rsseg:read_gsd_m"] == "0.3" and "rsseg:read_gsd_m" not in read_tags(without)
    assert read(prob_path(resampled)).shape == (384, 384)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging files left


def test_model_grid_follows_the_checkpoint_gsd_within_a_tolerance():
    from rsseg.inference.resample import model_grid
    from rsseg.training.bandstats import gsd_metres as scene_gsd

    info = dict(width=1000, height=800, crs=rasterio.crs.CRS.from_epsg(32650), transform=TRANSFORM)
    grid = model_grid("s.tif", info, {"gsd_m": 0.6}, "auto")
    assert (grid["width"], grid["height"]) == (500, 400) and grid["transform"].a == pytest.approx(0.6)
    assert model_grid("s.tif", info, {"gsd_m": 0.32}, "auto") is None  # within 10%
    assert model_grid("s.tif", info, {"gsd_m": 0.6}, "native") is None
    assert model_grid("s.tif", info, {}, "auto") is None  # older checkpoints: no GSD recorded
    assert model_grid("s.tif", dict(info, crs=None), {"gsd_m": 0.6}, "auto") is None  # unknown scene GSD
    assert model_grid("s.tif", info, {}, "0.15")["width"] == 2000
    degrees = Affine(0.5 / 111_320, 0, 114.3, 0, -0.5 / 111_320, 30.6)
    assert scene_gsd("EPSG:4326", degrees, 100, 100) == pytest.approx(0.5 * (1 + np.cos(np.radians(30.6))) / 2,
                                                                     rel=0.01)
    assert PredictOptions(gsd=0.30).gsd == "0.3" and PredictOptions(gsd="Native").gsd == "native"
    with pytest.raises(ConfigError, match="gsd='fine': expected auto, native or a pixel size"):
        resolve(PredictOptions, None, {"gsd": "fine"})


# ------------------------------------------------------------------------------------- image folders
def test_a_folder_of_plain_images_gets_one_mask_per_image(tmp_path):
    from rsseg.inference.images import predict_folder

    rng = np.random.default_rng(21)
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = {name: rng.integers(0, 256, (70, 90, 3), dtype=np.uint8) for name in ("a", "b", "c")}
    Image.fromarray(pixels["a"]).save(folder / "a.png")
    Image.fromarray(pixels["b"]).save(folder / "b.jpg", quality=95)
    Image.fromarray(pixels["c"]).save(folder / "c.tif")
    write_raster(folder / "geo.tif", pixels["a"].transpose(2, 0, 1))  # georeferenced
    (folder / "a.png.aux.xml").write_text("<PAMDataset/>")  # sidecars are not images
    model = fcn()
    out = predict_folder(model, folder, tmp_path / "masks", window=64, overlap=16, tta="none", device="cpu",
                         threshold=0.5)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.tif", "geo.tif"]
    with rasterio.open(out / "geo.tif") as ds:
        assert ds.crs.to_epsg() == 32650 and ds.transform == TRANSFORM
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    for name, source in (("a.png", "a.png"), ("b.png", "b.jpg"), ("c.tif", "c.tif")):
        with Image.open(out / name) as mask, Image.open(folder / source) as image:
            assert mask.size == image.size and mask.mode == "P"  # palette: buildings red
            values = np.asarray(mask)
        want = predict_raster(model, folder / "geo.tif", tmp_path / f"ref_{name}.tif", window=64, overlap=16,
                              tta="none", device="cpu", output="mask", threshold=0.5) if name == "a.png" else None
        assert set(np.unique(values)) <= {0, 1}
        if want is not None:  # the same pixels as a GeoTIFF give the same mask
            np.testing.assert_array_equal(values, read(want))
    with pytest.raises(FileExistsError, match="overwrite"):
        predict_folder(model, folder, out, window=64, overlap=16, tta="none", device="cpu")
    predict_folder(model, folder, out, window=64, overlap=16, tta="none", device="cpu", overwrite=True)


def test_predict_command_on_an_image_folder_and_the_tianchi_path_stays(tmp_path, checkpoint, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((512, 512, 3), np.uint8)).save(folder / "x.jpg")
    args = ["--tta", "none", "--device", "cpu", "--tile", "256", "--overlap", "32"]
    masks = CliRunner().invoke(cli, ["predict", str(checkpoint), str(folder), str(tmp_path / "masks"), *args])
    assert masks.exit_code == 0, masks.output
    assert [p.name for p in (tmp_path / "masks").iterdir()] == ["x.png"]
    csv = CliRunner().invoke(cli, ["predict", str(checkpoint), str(folder), str(tmp_path / "sub.csv"), *args])
    assert csv.exit_code == 0, csv.output
    assert list(read_masks_csv(tmp_path / "sub.csv")) == ["x.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in run_cli(["predict", str(checkpoint), str(empty), str(tmp_path / "m2"), *args], capsys)


# ------------------------------------------------------------------------------------------- Tianchi
def test_submission_from_generated_tianchi_data_validates_and_scores(tmp_path, checkpoint):
    from rsseg.synth.generate import make_tianchi

    info = make_tianchi(tmp_path / "tc", n_train=1, n_test=3, seed=0)
    sub = tmp_path / "submission.csv"
    runner = CliRunner()
    done = runner.invoke(cli, ["predict", str(checkpoint), str(info["test_dir"]), str(sub), "--tta", "none",
                               "--device", "cpu", "--sample", str(info["sample_submission"])], catch_exceptions=False)
    assert done.exit_code == 0 and done.output.strip() == str(sub)
    assert validate_submission(sub, info["sample_submission"]) == []
    with open(info["sample_submission"]) as sample:
        expected = [line.split("\t")[0] for line in sample.read().splitlines()]
    assert [line.split("\t")[0] for line in sub.read_text().splitlines()] == expected
    done = runner.invoke(cli, ["score", str(sub), str(info["test_mask"])], catch_exceptions=False)
    result = json.loads(done.output)
    assert result["images"] == 3 and 0.0 <= result["mean_dice"] <= 1.0


def test_images_without_sample_are_in_name_order(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("b.jpg", "a.jpg", "c.JPG"):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / name)
    out = predict_images(fcn(), folder, tmp_path / "sub.csv", tta="flip", batch_size=2, device="cpu", threshold=0.5)
    rows = out.read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["a.jpg", "b.jpg", "c.JPG"]
    assert all(r.count("\t") == 1 for r in rows)


def test_min_pixels_empties_small_masks_and_defaults_to_the_checkpoint(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / name)
    model = fcn()
    plain = read_masks_csv(predict_images(model, folder, tmp_path / "plain.csv", tta="none", device="cpu",
                                          threshold=0.5))
    counts = {name: int(plain.mask(name).sum()) for name in plain}
    assert min(counts.values()) > 0
    cut = sorted(counts.values())[0] + 1  # drops the smaller mask only
    kept = read_masks_csv(predict_images(model, folder, tmp_path / "cut.csv", tta="none", device="cpu",
                                         threshold=0.5, min_pixels=cut))
    assert {name: int(kept.mask(name).sum()) for name in kept} == {
        name: (n if n >= cut else 0) for name, n in counts.items()}
    path = tmp_path / "m.pt"  # threshold 0 marks every pixel; min_pixels from the checkpoint empties all
    unet = create_model("unet", "resnet18", encoder_depth=3, decoder_channels=(16, 8, 4))
    save_checkpoint(path, unet, model_config(unet, arch="unet", encoder="resnet18", in_channels=3,
                                             encoder_depth=3, decoder_channels=[16, 8, 4]),
                    meta={"threshold": 0.0, "min_pixels": 512 * 512 + 1})
    everything_dropped = read_masks_csv(predict_images(path, folder, tmp_path / "meta.csv", tta="none",
                                                       device="cpu"))
    assert all(everything_dropped[name] == "" for name in everything_dropped)


# --------------------------------------------------------------------------------------- bad input
def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("rsseg: error: ")
    return err


def test_bad_checkpoints_through_the_cli(tmp_path, scene, capsys):
    src, _ = scene
    out = tmp_path / "out.tif"
    assert "not found" in run_cli(["predict", str(tmp_path / "missing.pt"), str(src), str(out)], capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not an rsseg checkpoint" in run_cli(["predict", str(foreign), str(src), str(out)], capsys)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert "not a loadable torch checkpoint" in run_cli(["predict", str(text), str(src), str(out)], capsys)
    assert not out.exists()


def test_bad_inputs_through_the_cli(tmp_path, checkpoint, capsys):
    four = write_raster(tmp_path / "four.tif", np.zeros((4, 32, 32), np.uint8), photometric="minisblack")
    out = tmp_path / "out.tif"
    assert "trained on 3" in run_cli(["predict", str(checkpoint), str(four), str(out), "--device", "cpu"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no JPG" in run_cli(["predict", str(checkpoint), str(empty), str(tmp_path / "s.csv")], capsys)
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.zeros((256, 300, 3), np.uint8)).save(odd / "x.jpg")
    err = run_cli(["predict", str(checkpoint), str(odd), str(tmp_path / "s.csv"), "--device", "cpu"], capsys)
    assert "300x256" in err and "512x512" in err
    out.write_text("existing")
    three = write_raster(tmp_path / "three.tif", np.zeros((3, 32, 32), np.uint8))
    assert "exists" in run_cli(["predict", str(checkpoint), str(three), str(out)], capsys)
    assert out.read_text() == "existing"
    assert not (tmp_path / "s.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "four.tif", "odd", "out.tif", "three.tif"]


def test_library_errors_are_rssegerrors(tmp_path):
    with pytest.raises(DatasetError):
        predict_images(fcn(), tmp_path, tmp_path / "s.csv", device="cpu")
    Image.fromarray(np.zeros((512, 512, 3), np.uint8)).save(tmp_path / "a.jpg")
    with pytest.raises(CheckpointError, match="not found"):
        predict_images(tmp_path / "nope.pt", tmp_path, tmp_path / "s.csv", device="cpu")


# ------------------------------------------------------------------------------------- options once
def test_options_are_defined_once_for_library_cli_and_pipeline():
    from typing import get_args

    from rsseg.inference.options import PredictOptions, TtaMode
    from rsseg.inference.tta import PRECISIONS, TTA_MODES
    from rsseg.pipeline.stages import PredictScenesParams, PredictTianchiParams

    command = cli.commands["predict"]
    params = {p.name: p for p in command.params}
    for name, field in PredictOptions.model_fields.items():
        assert params[name].default == field.default, name
    assert tuple(params["tta"].type.choices) == tuple(TTA_MODES) == get_args(TtaMode)
    assert tuple(params["precision"].type.choices) == PRECISIONS
    assert "--tile" in params["window"].opts and "--window" in params["window"].opts
    assert issubclass(PredictScenesParams, PredictOptions) and issubclass(PredictTianchiParams, PredictOptions)
    scenes = PredictScenesParams(checkpoint="m.pt", scenes="s/", tile=256)  # YAML files keep `tile:`
    assert scenes.window == 256 and scenes.output_kind == "both" and not scenes.overwrite
    assert PredictOptions(output="prob").output_kind == "prob"


def test_bad_options_are_config_errors_naming_the_field(tmp_path, scene):
    src, _ = scene
    with pytest.raises(ConfigError, match="tta"):
        predict_raster(fcn(), src, tmp_path / "o.tif", tta="rot", device="cpu")
    with pytest.raises(ConfigError, match="batch_size"):
        predict_raster(fcn(), src, tmp_path / "o.tif", batch_size=0, device="cpu")
    with pytest.raises(ConfigError, match="valid names"):
        predict_raster(fcn(), src, tmp_path / "o.tif", tiles=64, device="cpu")
    with pytest.raises(ConfigError, match="overlap") as info:
        predict_raster(fcn(), src, tmp_path / "o.tif", window=64, overlap=64, device="cpu")
    assert isinstance(info.value.__cause__, ValueError)  # the grid's own message, chained
    assert not list(tmp_path.glob("o*"))


def test_row_copies_are_waited_for_on_the_stream_of_their_device(monkeypatch):
    """The writer's event is recorded on the stream the copy was queued on: the rows' GPU, not the current one."""
    import contextlib

    from rsseg.inference import streams

    calls = []

    class Host:
        def copy_(self, src, non_blocking=False):
            calls.append(("copy", src.device, non_blocking))
            return self

    class Event:
        def record(self, stream=None):
            calls.append(("record", stream))

    def device(dev):
        calls.append(("current", dev))
        return contextlib.nullcontext()

    class Rows:
        device, shape, dtype = torch.device("cuda", 1), (2, 3), torch.float32

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: f"stream of {dev}")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: Host() if pin_memory else None)
    host, event = streams._copy_to_host(Rows())
    assert isinstance(host, Host) and isinstance(event, Event)
    assert calls == [("current", torch.device("cuda", 1)), ("copy", torch.device("cuda", 1), True),
                     ("record", "stream of cuda:1")]


@pytest.mark.gpu
def test_row_copies_from_the_last_gpu_arrive_whole():
    from rsseg.inference.streams import _copy_to_host

    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    rows = torch.rand((512, 4096), device=dev)
    host, event = _copy_to_host(rows)
    event.synchronize()
    assert host.is_pinned() and torch.equal(host, rows.cpu())


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke_prints_json_lines(tmp_path):
    """benchmarks/gpu_check.sh --cpu-smoke: a JSON line per part, ok or not, and a summary line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORKDIR": str(tmp_path),
           "GPU_CHECK_PARTS": "predict bogus", "PYTHONPATH": str(root)}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line.get("part", line.get("gpu_check")) for line in lines] == ["start", "predict", "bogus", "done"]
    predict = lines[1]
    assert predict["ok"] and predict["device"] == "cpu" and predict["d4_views_per_forward"] == 8
    assert predict["none_windows_per_s"] > 0 and predict["d4_bare_forward_s"] > 0
    assert lines[2]["ok"] is False and "unknown part" in lines[2]["error"]
    assert lines[3] == {"gpu_check": "done", "ok": False} and done.returncode == 1


@pytest.mark.parametrize("threads", [2, 3])
def test_batches_read_in_threads_equal_one_reader(tmp_path, threads):
    from rsseg.inference.streams import read_batches
    from rsseg.tiling.grid import TileGrid

    image = np.random.default_rng(7).integers(0, 256, (3, 300, 410), dtype=np.uint8)
    src = write_raster(tmp_path / "s.tif", image)
    grid = TileGrid(410, 300, 128, 32)
    one = list(read_batches(src, grid, 3, pin=False))
    many = list(read_batches(src, grid, 3, pin=False, threads=threads))
    assert [w for w, _ in many] == [w for w, _ in one] and len(one) == -(-len(grid) // 3)
    for (_, a), (_, b) in zip(one, many, strict=True):
        assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)
    window, pixels = one[-1][0][-1], one[-1][1][-1]  # the last window: zero-padded beyond the raster
    h, w = 300 - window.row_off, 410 - window.col_off
    assert np.array_equal(pixels[:, :h, :w].numpy(), image[:, window.row_off :, window.col_off :])
    assert not pixels[:, h:].any() and not pixels[:, :, w:].any()
    stopped = read_batches(src, grid, 1, pin=False, threads=threads)
    next(stopped)
    stopped.close()  # leaving early shuts the readers down


def s3_on(monkeypatch, url):
    """``s3://bucket/...`` (GDAL's /vsis3/) read from the test's HTTP server ``url``, unsigned."""
    for key, value in dict(AWS_S3_ENDPOINT=url.removeprefix("http://"), AWS_HTTPS="NO", AWS_VIRTUAL_HOSTING="FALSE",
                           AWS_NO_SIGN_REQUEST="YES", AWS_REGION="us-east-1").items():
        monkeypatch.setenv(key, value)


def test_a_remote_scene_predicts_like_the_local_file(tmp_path, scene, http_root, checkpoint, monkeypatch):
    root, url, requests = http_root
    local, _ = scene
    (root / "bucket").mkdir()
    rasterio.shutil.copy(local, root / "bucket" / "scene.tif", driver="COG", blocksize=128)
    model = fcn()
    args = dict(tile=128, overlap=32, device="cpu", output="both")
    expected = predict_raster(model, local, tmp_path / "local.tif", **args)
    remote = f"/vsicurl/{url}/bucket/scene.tif"
    got = predict_raster(model, remote, tmp_path / "http.tif", **args)
    assert any(r[2] for r in requests if r[1] == "/bucket/scene.tif"), "read with Range requests"
    for a, b in ((expected, got), (prob_path(expected), prob_path(got))):
        np.testing.assert_array_equal(read(a), read(b))
    tags = read_tags(got)
    assert tags["rsseg:source"] == "scene.tif" and "rsseg:source_sha256" not in tags  # not downloaded to hash
    # s3:// through the CLI: the name reaches GDAL as given (Path() would make it s3:/bucket/scene.tif)
    s3_on(monkeypatch, url)
    result = CliRunner().invoke(cli, ["predict", str(checkpoint), "s3://bucket/scene.tif", str(tmp_path / "s3.tif"),
                                      "--tile", "128", "--overlap", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    predict_raster(checkpoint, local, tmp_path / "ref.tif", tile=128, overlap=32, device="cpu")
    np.testing.assert_array_equal(read(tmp_path / "s3.tif"), read(tmp_path / "ref.tif"))
