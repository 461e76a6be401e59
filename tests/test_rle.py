import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rsseg.errors import RLEError
from rsseg.tianchi.rle import decode, encode


def _single(row: int, col: int) -> np.ndarray:
    mask = np.zeros((512, 512), np.uint8)
    mask[row, col] = 1
    return mask


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (_single(0, 0), "1 1"),
        (_single(1, 0), "2 1"),
        (_single(0, 1), "513 1"),
        (np.ones((512, 512), np.uint8), "1 262144"),
        (np.zeros((512, 512), np.uint8), ""),
    ],
)
def test_known_vectors(mask: np.ndarray, expected: str) -> None:
    assert encode(mask) == expected
    assert np.array_equal(decode(expected), mask)


def test_runs_continue_across_columns() -> None:
    mask = np.zeros((512, 512), np.uint8)
    mask[510:, 0] = 1
    mask[:2, 1] = 1
    assert encode(mask) == "511 4"
    assert np.array_equal(decode("511 4"), mask)


def test_last_pixel_and_non_square_shape() -> None:
    mask = np.zeros((3, 5), bool)
    mask[2, 4] = True
    mask[0, 0] = True
    assert encode(mask) == "1 1 15 1"
    assert decode("1 1 15 1", shape=(3, 5)).dtype == np.uint8
    assert np.array_equal(decode("1 1 15 1", shape=(3, 5)), mask)


def test_any_nonzero_value_is_building() -> None:
    mask = np.array([[0, 255], [7, 0]], dtype=np.uint8)
    assert encode(mask) == "2 2"


def test_adjacent_runs_decode_like_one() -> None:
    assert np.array_equal(decode("1 2 3 2", shape=(2, 3)), decode("1 4", shape=(2, 3)))


@pytest.mark.parametrize("missing", [None, float("nan"), "", "   ", "\t"])
def test_missing_values_decode_empty(missing: object) -> None:
    out = decode(missing)
    assert out.shape == (512, 512) and out.dtype == np.uint8 and not out.any()


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 x", r"token 2 \('x'\) is not a non-negative integer"),
        ("1.5 2", r"token 1 \('1.5'\)"),
        ("-3 2", r"token 1 \('-3'\)"),
        ("+3 2", r"token 1 \('\+3'\)"),
        ("3 2\u00a05 1", r"token 2 \('2\\xa05'\)"),
        ("1 2 3 4\x00", r"token 4 \('4\\x00'\)"),
        ("2 9223372036854775807", r"run 1 \(2 9223372036854775807\) ends at pixel 9223372036854775808, past"),
        ("1 99999999999999999999999", r"ends at pixel 99999999999999999999999, past the end"),
        ("18446744073709551617 1", r"run 1 \(18446744073709551617 1\) ends at pixel 18446744073709551617, past"),
        ("1 2 3", r"odd number of RLE tokens \(3\)"),
        ("0 5", r"start 0 < 1"),
        ("4 0", r"length 0 < 1"),
        ("262144 2", r"past the end of a 512x512 image"),
        ("5 3 6 1", r"runs 1 and 2 are overlapping"),
        ("10 2 1 1", r"runs 1 and 2 are out of order"),
    ],
)
def test_decode_rejects_with_named_problem(rle: str, message: str) -> None:
    with pytest.raises(RLEError, match=message):
        decode(rle)


def test_rle_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        decode("1")


def test_encode_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode(np.zeros((2, 2, 2)))
    with pytest.raises(RLEError, match=r"shape \(4,\)"):
        encode(np.ones(4))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_encode_empty_shapes(shape: tuple[int, int]) -> None:
    assert encode(np.zeros(shape, np.uint8)) == ""


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda h: st.integers(1, 40).flatmap(
            lambda w: arrays(np.uint8, (h, w), elements=st.integers(0, 1))
        )
    )
)
def test_round_trip_random_shapes(mask: np.ndarray) -> None:
    code = encode(mask)
    assert np.array_equal(decode(code, shape=mask.shape), mask)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_round_trip_densities_512(density: float, seed: int) -> None:
    mask = (np.random.default_rng(seed).random((512, 512)) < density).astype(np.uint8)
    code = encode(mask)
    assert np.array_equal(decode(code), mask)
    if code:
        starts = np.array(code.split(), dtype=np.int64)[0::2]
        assert starts.min() >= 1 and np.all(np.diff(starts) > 0)


def _runs_by_definition(mask: np.ndarray) -> str:
    """The convention spelled out: column-major pixels, 1-based starts, one pair per run."""
    pixels = np.concatenate([[0], (mask != 0).ravel(order="F").astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(pixels))
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(edges[0::2], edges[1::2], strict=True))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 130), st.integers(1, 1100), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1),
       st.sampled_from(["uint8", "bool", "255", "int64", "float32", "fortran", "strided"]))
def test_encode_any_layout_matches_the_definition(height: int, width: int, density: float, seed: int,
                                                  kind: str) -> None:
    mask = (np.random.default_rng(seed).random((height, width)) < density).astype(np.uint8)
    variant = {"uint8": mask, "bool": mask.astype(bool), "255": mask * 255, "int64": mask.astype(np.int64) * -3,
               "float32": mask.astype(np.float32) * 0.5, "fortran": np.asfortranarray(mask),
               "strided": np.repeat(mask, 2, axis=1)[:, ::2]}[kind]
    assert encode(variant) == _runs_by_definition(mask)


def _decode_by_definition(pairs: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray | None:
    """The convention spelled out, one pixel at a time; None where the runs break it."""
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    previous_end = 0
    for start, length in pairs:
        if start < 1 or length < 1 or start <= previous_end or start - 1 + length > flat.size:
            return None
        for pixel in range(start - 1, start - 1 + length):
            flat[pixel] = 1
        previous_end = start - 1 + length
    return flat.reshape(shape, order="F")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 45), st.integers(0, 12)), max_size=12),
       st.sampled_from([(5, 6), (1, 30), (6, 1), (4, 4)]))
def test_decode_matches_the_definition_and_rejects_every_bad_run(pairs: list[tuple[int, int]],
                                                                 shape: tuple[int, int]) -> None:
    rle = " ".join(f"{s} {n}" for s, n in pairs)
    expected = _decode_by_definition(pairs, shape)
    if expected is None:
        with pytest.raises(RLEError, match="run"):
            decode(rle, shape=shape)
    else:
        decoded = decode(rle, shape=shape)
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, expected)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789 x-+.\t\u00a0", max_size=30))
def test_decode_gives_a_mask_or_an_rle_error(rle: str) -> None:
    try:
        out = decode(rle, shape=(8, 8))
    except RLEError:
        return
    assert out.shape == (8, 8) and set(np.unique(out).tolist()) <= {0, 1}
