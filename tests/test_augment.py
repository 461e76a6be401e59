import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rsseg.errors import ConfigError
from rsseg.training.augment import (
    D4_NAMES,
    TrainTransform,
    colour_matrix,
    d4_apply,
    d4_inverse,
    d4_invert,
    random_crop,
)

ELEMENTS = range(8)


def _asymmetric(h=5, w=5, c=None):
    shape = (h, w) if c is None else (h, w, c)
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_eight_distinct_elements_numpy_and_torch():
    x = _asymmetric()
    seen = {d4_apply(x, k).tobytes() for k in ELEMENTS}
    assert len(seen) == 8 == len(D4_NAMES)
    t = torch.from_numpy(_asymmetric(4, 4)).view(1, 1, 4, 4)
    assert len({d4_apply(t, k).numpy().tobytes() for k in ELEMENTS}) == 8


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.sampled_from(list(ELEMENTS)))
def test_inverse_undoes_every_element(h, w, c, k):
    x = _asymmetric(h, w, c)
    assert np.array_equal(d4_invert(d4_apply(x, k), k), x)
    assert np.array_equal(d4_apply(d4_apply(x, d4_inverse(k)), k), x)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]  # NCHW
    assert torch.equal(d4_invert(d4_apply(t, k), k), t)


def test_torch_nchw_matches_numpy_hwc():
    x = _asymmetric(4, 6, 3)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    for k in ELEMENTS:
        assert np.array_equal(d4_apply(t, k)[0].permute(1, 2, 0).numpy(), d4_apply(x, k))


def _compose(a, b):
    """The element equal to applying ``b`` first, then ``a`` (StopIteration if none: not closed)."""
    probe = _asymmetric(4, 4)  # every element maps it differently
    target = d4_apply(d4_apply(probe, b), a)
    return next(k for k in ELEMENTS if np.array_equal(d4_apply(probe, k), target))


def test_composition_closes_and_forms_a_group():
    x = _asymmetric(4, 4)
    table = np.array([[_compose(a, b) for b in ELEMENTS] for a in ELEMENTS])
    for a in ELEMENTS:
        assert sorted(table[a]) == list(ELEMENTS)  # each row is a permutation (Latin square)
        assert table[a, d4_inverse(a)] == 0
        for b in ELEMENTS:
            assert np.array_equal(d4_apply(x, table[a, b]), d4_apply(d4_apply(x, b), a))
    assert table[1, 1] == 2 and table[4, 4] == 0
    with pytest.raises(ConfigError, match="0..7"):
        d4_apply(x, 8)


def _pattern(h=32, w=32):
    """An RGB image and a mask that marks exactly its pixels where channel 0 is bright (asymmetric L shape)."""
    mask = np.zeros((h, w), np.uint8)
    mask[3:20, 4:8] = 1
    mask[16:20, 4:25] = 1
    mask[1, w - 2] = 1
    image = np.stack([mask * 200.0 + 20.0, np.full((h, w), 50.0), np.arange(h * w).reshape(h, w) % 97], -1)
    return image.astype(np.float32), mask


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_transform_keeps_image_and_mask_aligned(shape):
    image, mask = _pattern(*shape)
    transform = TrainTransform(d4=True, crop=None)
    seen = set()
    for seed in range(40):
        out, (out_mask,) = transform(image, (mask,), np.random.default_rng(seed))
        assert out.shape == image.shape and out_mask.shape == mask.shape
        assert np.array_equal(out[..., 0] > 100, out_mask == 1)
        seen.add(out_mask.tobytes())
    assert len(seen) == (8 if shape[0] == shape[1] else 4)


def test_crop_takes_the_same_window_from_image_and_masks():
    image, mask = _pattern(32, 32)
    valid = np.arange(32 * 32).reshape(32, 32)
    rng = np.random.default_rng(3)
    out, (out_mask, out_valid) = random_crop(image, (mask, valid), 16, rng)
    row, col = divmod(int(out_valid[0, 0]), 32)
    assert out.shape == (16, 16, 3)
    assert np.array_equal(out_mask, mask[row : row + 16, col : col + 16])
    assert np.array_equal(out, image[row : row + 16, col : col + 16])
    with pytest.raises(ConfigError, match="larger than"):
        random_crop(image, (mask,), 33, rng)


def test_photometric_changes_the_image_only_and_stays_in_range():
    image, mask = _pattern()
    transform = TrainTransform(d4=False, brightness=0.3, contrast=0.3, saturation=0.5, hue=0.1, max_value=255.0)
    out, (out_mask,) = transform(image, (mask,), np.random.default_rng(0))
    assert np.array_equal(out_mask, mask)
    assert not np.allclose(out, image)
    assert out.min() >= 0 and out.max() <= 255 and out.dtype == np.float32
    again, _ = transform(image, (mask,), np.random.default_rng(0))
    assert np.array_equal(out, again)  # all randomness comes from the generator


def test_colour_matrix():
    rgb = np.random.default_rng(0).uniform(0, 255, (10, 3))
    assert np.allclose(colour_matrix(0.0, 1.0), np.eye(3))
    grey = rgb @ colour_matrix(0.0, 0.0).T
    assert np.allclose(grey, grey[:, :1]) and np.allclose(grey[:, 0], rgb @ [0.299, 0.587, 0.114])
    turned = rgb @ colour_matrix(0.25, 1.0).T
    luma = np.array([0.299, 0.587, 0.114])
    assert np.allclose(turned @ luma, rgb @ luma)  # hue keeps luma
    assert np.allclose(rgb @ colour_matrix(1.0, 1.0).T, rgb)  # a full turn is the identity
