"""Test-time augmentation (rsseg.inference.tta) and the blending weights (rsseg.inference.blend)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rsseg.errors import ConfigError
from rsseg.inference.blend import axis_weights, edge_margin, window_weights
from rsseg.inference.tta import TTA_MODES, Predictor, resolve_device, tta_views
from rsseg.models import Segmenter
from rsseg.tiling.grid import TileGrid, grid_offsets

# Each D4 element written out by hand, independently of rsseg.training.augment: (forward, inverse) on HW arrays.
HAND_D4 = {
    0: (lambda a: a, lambda a: a),
    1: (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
    2: (lambda a: a[::-1, ::-1], lambda a: a[::-1, ::-1]),
    3: (lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 1)),
    4: (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    5: (lambda a: np.rot90(a[:, ::-1], 1), lambda a: np.rot90(a, -1)[:, ::-1]),
    6: (lambda a: a[::-1, :], lambda a: a[::-1, :]),
    7: (lambda a: np.rot90(a[:, ::-1], -1), lambda a: np.rot90(a, 1)[:, ::-1]),
}


def skewed_model(seed: int = 0) -> Segmenter:
    """A small conv net with random (so not rotation-invariant) kernels and a position-dependent bias."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 5, padding=2))
    return Segmenter(net, (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)).eval()


def reference_tta(model: nn.Module, image: np.ndarray, views: tuple[int, ...]) -> np.ndarray:
    """Mean over views of the model's probability on each transformed image, mapped back by hand."""
    out = []
    for k in views:
        forward, inverse = HAND_D4[k]
        x = np.ascontiguousarray(np.stack([forward(band) for band in image]))
        with torch.inference_mode():
            prob = torch.sigmoid(model(torch.from_numpy(x)[None].float()))[0, 0].numpy()
        out.append(inverse(prob))
    return np.mean(out, axis=0)


def test_hand_table_matches_the_d4_definition():
    from rsseg.training.augment import d4_apply

    probe = np.arange(12).reshape(3, 4)
    for k, (forward, inverse) in HAND_D4.items():
        assert np.array_equal(forward(probe), d4_apply(probe, k)), k
        assert np.array_equal(inverse(forward(probe)), probe), k


@pytest.mark.parametrize("mode", ["none", "flip", "d4"])
def test_tta_is_the_mean_of_the_views_mapped_back(mode):
    model = skewed_model()
    image = np.random.default_rng(1).integers(0, 256, (2, 3, 24, 24), dtype=np.uint8)
    predictor = Predictor(model, torch.device("cpu"), tta=mode)
    got = predictor(torch.from_numpy(image)).numpy()
    assert got.shape == (2, 24, 24) and got.dtype == np.float32
    for i in range(2):
        np.testing.assert_allclose(got[i], reference_tta(model, image[i], TTA_MODES[mode]), atol=1e-6)


def test_views_differ_so_the_tta_test_can_catch_a_wrong_inverse():
    model = skewed_model()
    image = np.random.default_rng(2).integers(0, 256, (3, 24, 24), dtype=np.uint8)
    per_view = [reference_tta(model, image, (k,)) for k in range(8)]
    for k in range(1, 8):
        assert np.abs(per_view[k] - per_view[0]).max() > 1e-3, f"model invariant under D4 element {k}"
    # Mapping rot90 back with rot90 again (a mis-ordered inverse) changes the average.
    forward, _ = HAND_D4[1]
    x = np.ascontiguousarray(np.stack([forward(b) for b in image]))
    with torch.inference_mode():
        wrong = np.rot90(torch.sigmoid(model(torch.from_numpy(x)[None].float()))[0, 0].numpy(), 1)
    assert np.abs(wrong - per_view[1]).max() > 1e-3


def test_flip_views_are_the_four_flips():
    probe = np.arange(6).reshape(2, 3)
    from rsseg.training.augment import d4_apply

    got = {d4_apply(probe, k).tobytes() for k in tta_views("flip")}
    want = {a.tobytes() for a in (probe, probe[:, ::-1], probe[::-1], probe[::-1, ::-1])}
    assert got == want


def test_bf16_on_cpu_agrees_with_fp32():
    model = skewed_model()
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    fp32 = Predictor(model, torch.device("cpu"), "flip", "fp32")(image)
    bf16 = Predictor(model, torch.device("cpu"), "flip", "bf16")(image)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05
    assert ((fp32 > 0.5) == (bf16 > 0.5)).float().mean() > 0.95


def test_bad_options_name_the_choices():
    with pytest.raises(ConfigError, match="none, flip, d4"):
        tta_views("rot")
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):  # fp16 is a precision now
        Predictor(skewed_model(), torch.device("cpu"), "none", "int8")
    with pytest.raises(ConfigError, match="square"):
        Predictor(skewed_model(), torch.device("cpu"), "d4")(torch.zeros((1, 3, 8, 16), dtype=torch.uint8))
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_predictor_matches_cpu():
    model = skewed_model()
    image = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    cpu = Predictor(skewed_model(), torch.device("cpu"), "d4")(image)
    gpu = Predictor(model, torch.device("cuda"), "d4")(image.pin_memory())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 1e-3
    bf16 = Predictor(skewed_model(), torch.device("cuda"), "d4", "bf16")(image.pin_memory())
    assert ((bf16.cpu() > 0.5) == (cpu > 0.5)).float().mean() > 0.95


# ------------------------------------------------------------------------------------------ weights
def test_axis_weights_shape():
    w = axis_weights(64, 16, True, True)
    m = edge_margin(16)
    assert m == 4 and w.dtype == np.float32 and w.shape == (64,)
    assert (w[:m] == 0).all() and (w[-m:] == 0).all() and (w[16:-16] == 1).all()
    assert (np.diff(w[:16]) >= 0).all() and 0 < w[m] < 1
    assert (axis_weights(64, 16, False, False) == 1).all()  # no taper on sides at the raster edge
    assert axis_weights(64, 16, False, True)[0] == 1 and axis_weights(64, 16, True, False)[-1] == 1


@given(length=st.integers(1, 400), size=st.integers(1, 80), data=st.data())
def test_total_weight_is_positive_along_an_axis(length, size, data):
    overlap = data.draw(st.integers(0, size - 1))
    total = np.zeros(max(length, size))
    for off in grid_offsets(length, size, overlap):
        total[off : off + size] += axis_weights(size, overlap, off > 0, off + size < length)
    assert (total[:length] > 0).all()


@given(width=st.integers(1, 90), height=st.integers(1, 90), size=st.integers(2, 40), data=st.data())
def test_total_weight_is_positive_over_a_grid(width, height, size, data):
    grid = TileGrid(width, height, size, data.draw(st.integers(0, size - 1)))
    total = np.zeros((max(height, size), max(width, size)))
    for tile in grid:
        total[tile.row_off : tile.row_off + size, tile.col_off : tile.col_off + size] += window_weights(grid, tile)
    assert (total[:height, :width] > 0).all()
    assert all(0 <= window_weights(grid, t).min() and window_weights(grid, t).max() <= 1 for t in grid)


# ------------------------------------------------------------------------------------------ forward batches
@pytest.mark.parametrize(("mode", "max_views"), [("d4", 1), ("d4", 3), ("d4", 8), ("flip", 5), ("none", 2)])
def test_views_in_chunks_equal_all_at_once(mode, max_views):
    image = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (3, 3, 24, 24), dtype=np.uint8))
    whole = Predictor(skewed_model(), torch.device("cpu"), mode)(image)
    chunked = Predictor(skewed_model(), torch.device("cpu"), mode, max_views=max_views)(image)
    assert chunked.shape == whole.shape == (3, 24, 24)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


class OomAbove(nn.Module):
    """Raises a real ``torch.OutOfMemoryError`` for batches above ``limit``; records every batch it was given."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.batches = model, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's logits, or an out-of-memory error."""
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (stub: batch {x.shape[0]} > {self.limit})")
        return self.model(x)


def test_out_of_memory_halves_the_views_and_retries(caplog):
    image = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (2, 3, 24, 24), dtype=np.uint8))
    expected = Predictor(skewed_model(), torch.device("cpu"), "d4")(image)
    stub = OomAbove(skewed_model(), limit=5)
    predictor = Predictor(stub, torch.device("cpu"), "d4", max_views=16)
    with caplog.at_level("WARNING", logger="rsseg.inference.tta"):
        got = predictor(image)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert stub.batches[:3] == [16, 8, 4] and set(stub.batches[2:]) == {4}  # 2 windows x 8 views: 16 -> 8 -> 4
    assert predictor.max_views == 4  # kept for the next batches
    assert [r.getMessage() for r in caplog.records] == [
        "out of memory on cpu with 16 views per forward pass; retrying with 8",
        "out of memory on cpu with 8 views per forward pass; retrying with 4"]
    stub.batches.clear()
    predictor(image)
    assert stub.batches == [4, 4, 4, 4]


def test_out_of_memory_at_one_view_is_raised():
    predictor = Predictor(OomAbove(skewed_model(), limit=0), torch.device("cpu"), "flip", max_views=2)
    with pytest.raises(torch.OutOfMemoryError, match="stub"):
        predictor(torch.zeros((1, 3, 8, 8), dtype=torch.uint8))
    assert predictor.max_views == 1
    with pytest.raises(ConfigError, match="max_views"):
        Predictor(skewed_model(), torch.device("cpu"), "none", max_views=0)


def test_forward_batches_are_sized_in_views_by_free_memory():
    from rsseg.inference.batching import BYTES_PER_PIXEL, MAX_VIEWS, batch_plan, views_per_forward

    cpu, view = torch.device("cpu"), BYTES_PER_PIXEL * 512 * 512
    assert views_per_forward(cpu, 512, free=64 * 2**30) == MAX_VIEWS["cpu"] == 8
    assert views_per_forward(cpu, 512, free=12 * view) == 3  # a quarter of the free memory
    assert views_per_forward(cpu, 512, "bf16", free=12 * view) == 6
    assert views_per_forward(cpu, 512, free=0) == 1
    # d4 gets the views of none: 8 views -> 1 window x 8 views, 8 windows x 1 view
    assert batch_plan(None, 8, cpu, 512, free=64 * 2**30) == (1, 8)
    assert batch_plan(None, 1, cpu, 512, free=64 * 2**30) == (8, 8)
    assert batch_plan(None, 8, cpu, 512, free=12 * view) == (1, 3)  # a window's views in several passes
    assert batch_plan(5, 8, cpu, 512, free=0) == (5, 40)  # an explicit batch size wins
    assert views_per_forward(torch.device("cuda"), 512, "bf16", free=80 * 2**30) == MAX_VIEWS["cuda"]
    assert views_per_forward(cpu, 512) >= 1  # the machine's own available memory


@pytest.mark.gpu
def test_out_of_memory_halving_on_a_real_gpu():
    """A forward pass too big for the GPU is halved until it fits and equals the small batches' result."""
    device = torch.device("cuda")
    free = torch.cuda.mem_get_info(device)[0]
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 1, 1))
    model = Segmenter(net, (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)).eval()
    side = 1024  # 64 x 1024^2 fp32 activations: 256 MiB a view; the first pass asks for about 4x the free memory
    windows = max(1, int(4 * free // (256 * 2**20) // 8))
    image = torch.randint(0, 256, (windows, 3, side, side), dtype=torch.uint8)
    predictor = Predictor(model, device, "d4", max_views=windows * 8)
    got = predictor(image)
    assert predictor.max_views < windows * 8
    small = Predictor(model, device, "d4", max_views=predictor.max_views)(image[:1])
    torch.testing.assert_close(got[:1], small, atol=1e-5, rtol=0)


def test_cuda_devices_resolve_with_their_index(monkeypatch):
    """cuda and auto name the current GPU by index; an index the process does not see is a ConfigError."""
    from rsseg.inference.tta import on_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"sees 2 CUDA device\(s\) \(cuda:0 \.\. cuda:1"):
        resolve_device("cuda:2")
    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # set_device for the block, restored after
    with on_device(torch.device("cpu")):
        pass


def test_reader_threads_feed_a_gpu_and_stay_single_on_cpu():
    from rsseg.inference.batching import reader_threads

    assert reader_threads(torch.device("cpu")) == 1
    assert 2 <= reader_threads(torch.device("cuda", 0)) <= 4


# ------------------------------------------------------------------------------- precision (auto, fp16)
@pytest.mark.parametrize(("validated", "facts", "want"), [
    ("bf16", ("cuda", (8, 0), False), "bf16"),   # A100/H100: native bf16
    ("bf16", ("cuda", (7, 5), False), "fp32"),   # T4: bf16 emulated -> fp32
    ("fp16", ("cuda", (7, 0), False), "fp16"),   # V100: validated in fp16 with a GradScaler
    ("bf16", ("cpu", None, True), "bf16"),       # CPU with AVX512-BF16/AMX
    ("bf16", ("cpu", None, False), "fp32"),
    ("fp16", ("cpu", None, True), "fp32"),       # fp16 is not native on CPUs
    ("fp32", ("cuda", (9, 0), False), "fp32"),
    (None, ("cuda", (9, 0), False), "fp32"),     # older checkpoints record no precision
])
def test_auto_precision_follows_the_checkpoint_where_the_device_supports_it(validated, facts, want):
    from rsseg.inference.tuned import inference_precision
    from rsseg.training.devices import DeviceFacts

    meta = {} if validated is None else {"precision": validated}
    device = torch.device(facts[0])
    assert inference_precision("auto", meta, device, DeviceFacts(facts[0], facts[1], facts[2])) == want
    assert inference_precision("fp16", meta, device, DeviceFacts(facts[0], facts[1], facts[2])) == "fp16"


def test_fp16_forward_passes_match_fp32():
    model, x = skewed_model(), torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fp32 = Predictor(model, torch.device("cpu"), "flip", "fp32")(x)
    fp16 = Predictor(model, torch.device("cpu"), "flip", "fp16")(x)
    assert fp16.dtype == torch.float32
    np.testing.assert_allclose(fp16.numpy(), fp32.numpy(), atol=5e-3)
    with pytest.raises(ConfigError, match="auto is resolved"):
        Predictor(model, torch.device("cpu"), "none", "auto")


def test_a_threshold_tuned_with_another_tta_or_precision_is_used_and_logged(caplog):
    from rsseg.inference.tuned import setting, tuned_with

    meta = {"threshold": 0.4, "precision": "bf16"}
    assert tuned_with(meta) == ("none", "bf16")
    assert tuned_with({"threshold_tta": "d4", "threshold_precision": "fp32"}) == ("d4", "fp32")
    with caplog.at_level("INFO", logger="rsseg.inference.tuned"):
        assert setting(None, meta, "threshold", 0.5, "none", "bf16") == 0.4
        assert not caplog.records
        assert setting(None, meta, "threshold", 0.5, "d4", "fp32") == 0.4
    assert "threshold 0.4 was tuned with TTA none in bf16; predicting with TTA d4 in fp32" in caplog.text
    assert setting(0.3, meta, "threshold", 0.5, "d4", "fp32") == 0.3
    assert setting(None, {}, "threshold", 0.5, "d4", "fp32") == 0.5
