import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_rsseg as _rsseg  # (exit code, stdout, stderr)

from rsseg.errors import RLEError, SubmissionError
from rsseg.tianchi.files import (
    iter_masks,
    read_masks_csv,
    score,
    validate_submission,
    write_mask_csv,
    write_submission,
)
from rsseg.tianchi.rle import encode


def _rect(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros((512, 512), np.uint8)
    mask[r0:r1, c0:c1] = 1
    return mask


@pytest.fixture
def truth(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    masks = {"AAAAAAAAAA.jpg": _rect(0, 10, 0, 10), "BBBBBBBBBB.jpg": np.zeros((512, 512), np.uint8),
             "CCCCCCCCCC.jpg": _rect(100, 300, 200, 260)}
    truth_csv = write_mask_csv(((n, encode(m)) for n, m in masks.items()), tmp_path / "truth.csv")
    sample = write_mask_csv(((n, "") for n in masks), tmp_path / "sample.csv")
    return truth_csv, sample, masks


def test_file_layout_is_tab_separated_without_header(truth) -> None:
    truth_csv, _, masks = truth
    lines = truth_csv.read_text().splitlines()
    assert lines[0] == "AAAAAAAAAA.jpg\t" + encode(masks["AAAAAAAAAA.jpg"])
    assert lines[1] == "BBBBBBBBBB.jpg\t"
    assert len(lines) == 3


def test_mask_table_is_lazy_mapping(truth) -> None:
    truth_csv, _, masks = truth
    table = read_masks_csv(truth_csv)
    assert list(table) == list(masks)
    assert table["BBBBBBBBBB.jpg"] == ""
    assert table.line("CCCCCCCCCC.jpg") == 3
    for name, mask in iter_masks(truth_csv):
        assert np.array_equal(mask, masks[name])


def test_mask_table_accepts_crlf_and_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"A.jpg\t1 3\r\nB.jpg\r\nC.jpg\t\r\n")
    table = read_masks_csv(path)
    assert dict(table) == {"A.jpg": "1 3", "B.jpg": "", "C.jpg": ""}
    assert table.mask("A.jpg")[:3, 0].tolist() == [1, 1, 1]


def test_duplicate_name_is_an_error_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("A.jpg\t1 1\nB.jpg\t\nA.jpg\t2 1\n")
    with pytest.raises(SubmissionError, match="line 3: A.jpg duplicates line 1"):
        read_masks_csv(path)


def test_bad_rle_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("A.jpg\t1 1\nB.jpg\t5 x\n")
    table = read_masks_csv(path)
    with pytest.raises(ValueError, match=r"m.csv line 2 \(B.jpg\): token 2"):
        table.mask("B.jpg")


def test_write_submission_follows_sample_order(truth, tmp_path: Path) -> None:
    _, sample, masks = truth
    preds = {n: masks[n] for n in reversed(list(masks))}
    out = write_submission(preds, tmp_path / "sub.csv", sample)
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == list(masks)
    assert validate_submission(out, sample) == []
    result = score(out, truth[0])
    assert result == {"mean_dice": 1.0, "images": 3, "empty_truth": 1}


def test_write_submission_refuses_missing_and_extra(truth, tmp_path: Path) -> None:
    _, sample, masks = truth
    with pytest.raises(SubmissionError, match="1 missing"):
        write_submission({n: m for n, m in list(masks.items())[:2]}, tmp_path / "sub.csv", sample)
    with pytest.raises(SubmissionError, match="1 not in the sample"):
        write_submission({**masks, "ZZZZZZZZZZ.jpg": ""}, tmp_path / "sub.csv", sample)
    assert not (tmp_path / "sub.csv").exists()


def test_validate_reports_every_problem_with_line(truth, tmp_path: Path) -> None:
    _, sample, _ = truth
    sub = tmp_path / "sub.csv"
    sub.write_text(
        "CCCCCCCCCC.jpg\t1 1\n"  # out of order
        "AAAAAAAAAA.jpg\t262144 5\n"  # past the end
        "AAAAAAAAAA.jpg\t1 1\n"  # duplicate
        "XXXXXXXXXX.jpg\t\n"  # not in the sample
        "bad row with spaces\n"
    )
    problems = validate_submission(sub, sample)
    text = "\n".join(problems)
    assert "line 3: AAAAAAAAAA.jpg duplicates line 2" in text
    assert "line 5: image name 'bad row with spaces'" in text
    assert "missing BBBBBBBBBB.jpg (line 2 of sample.csv)" in text
    assert "line 4: XXXXXXXXXX.jpg is not in sample.csv" in text
    assert "not in the sample submission's order" in text
    assert "line 2 (AAAAAAAAAA.jpg): run 1 (262144 5) ends at pixel 262148, past the end" in text
    assert len(problems) == 6


def test_score_is_mean_per_image_dice(truth, tmp_path: Path) -> None:
    truth_csv, _, masks = truth
    # image A: half of the predicted pixels right; image B: empty truth, non-empty prediction -> 0; C exact.
    pred_a = _rect(0, 10, 0, 20)  # 200 px, 100 in common with the 100-px truth -> 2*100/300
    sub = write_mask_csv([("AAAAAAAAAA.jpg", encode(pred_a)), ("BBBBBBBBBB.jpg", "1 1"),
                          ("CCCCCCCCCC.jpg", encode(masks["CCCCCCCCCC.jpg"]))], tmp_path / "sub.csv")
    result = score(sub, truth_csv)
    assert result["mean_dice"] == pytest.approx((2 * 100 / 300 + 0.0 + 1.0) / 3)


def test_score_refuses_submission_missing_images(truth, tmp_path: Path) -> None:
    sub = write_mask_csv([("AAAAAAAAAA.jpg", "")], tmp_path / "sub.csv")
    with pytest.raises(SubmissionError, match="lacks 2 of the 3 images"):
        score(sub, truth[0])


def test_cli_score_and_validate(truth, tmp_path: Path) -> None:
    truth_csv, sample, _ = truth
    code, stdout, stderr = _rsseg("score", truth_csv, truth_csv)
    assert code == 0, stderr
    assert '"mean_dice": 1.0' in stdout
    assert _rsseg("validate", truth_csv, sample)[0] == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("AAAAAAAAAA.jpg\t1 2 3\n")
    code, _, stderr = _rsseg("validate", bad, sample)
    assert code == 1
    assert "odd number of RLE tokens" in stderr and "missing BBBBBBBBBB.jpg" in stderr


def test_cli_bad_input_is_one_line_exit_2(truth, tmp_path: Path) -> None:
    sub = write_mask_csv([("AAAAAAAAAA.jpg", "")], tmp_path / "sub.csv")
    code, _, stderr = _rsseg("score", sub, truth[0])
    assert code == 2
    assert stderr.strip().count("\n") == 0 and stderr.startswith("rsseg: error: sub.csv lacks 2")
    bad = tmp_path / "bad.csv"
    bad.write_text("AAAAAAAAAA.jpg\t1 x\nBBBBBBBBBB.jpg\t\nCCCCCCCCCC.jpg\t\n")
    code, _, stderr = _rsseg("score", bad, truth[0])
    assert code == 2 and stderr.strip() == "rsseg: error: bad.csv line 1 (AAAAAAAAAA.jpg): token 2 ('x') is not " \
        "a non-negative integer; expected space-separated 'start length' pairs of digits"


@pytest.mark.slow
def test_console_script_smoke(truth) -> None:
    """The real ``python -m rsseg.cli`` process: output, exit status 0 and the one-line error with exit 2."""
    truth_csv, sample, _ = truth
    done = subprocess.run([sys.executable, "-m", "rsseg.cli", "score", truth_csv, truth_csv],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert '"mean_dice": 1.0' in done.stdout
    done = subprocess.run([sys.executable, "-m", "rsseg.cli", "score", sample, truth_csv, "--bogus"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2


def test_rows_are_found_with_mixed_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"".join(b"%d.jpg\t%d 1\n" % (i, i + 1) for i in range(7))
                     + b"x.jpg\ty 1 2\r\nlast.jpg\t")
    table = read_masks_csv(path)
    assert list(table) == [f"{i}.jpg" for i in range(7)] + ["x.jpg", "last.jpg"]
    assert [table[f"{i}.jpg"] for i in range(7)] == [f"{i + 1} 1" for i in range(7)]
    assert table["x.jpg"] == "y 1 2" and table["last.jpg"] == "" and table.line("last.jpg") == 9
    assert len(read_masks_csv(write_mask_csv([], tmp_path / "empty.csv"))) == 0


def test_mask_table_holds_no_open_file(truth) -> None:
    import gc
    import pickle
    import warnings

    truth_csv, _, masks = truth
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # an unclosed file would be reported at collection
        table = read_masks_csv(truth_csv)
        assert table["CCCCCCCCCC.jpg"] == encode(masks["CCCCCCCCCC.jpg"])
        with table:
            assert np.array_equal(table.mask("AAAAAAAAAA.jpg"), masks["AAAAAAAAAA.jpg"])
            copy = pickle.loads(pickle.dumps(table))  # e.g. a DataLoader worker's copy
        assert table._file is None and copy._file is None
        assert np.array_equal(copy.mask("CCCCCCCCCC.jpg"), masks["CCCCCCCCCC.jpg"])
        assert copy.line("CCCCCCCCCC.jpg") == 3 and "ZZZ.jpg" not in copy
        with pytest.raises(KeyError):
            copy["ZZZ.jpg"]
        del table, copy
        gc.collect()


def test_bad_rle_keeps_the_codec_error_as_cause(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("A.jpg\t1 2 3\n")
    with pytest.raises(RLEError, match=r"m.csv line 1 \(A.jpg\): odd number") as info:
        read_masks_csv(path).mask("A.jpg")
    assert isinstance(info.value.__cause__, RLEError)


@pytest.mark.parametrize("name", [" lead.jpg", "trail.jpg ", "in side.jpg", ""])
def test_names_with_spaces_are_named_problems(tmp_path, name) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f"ok.jpg\t1 2\n{name}\t3 4\n")
    with pytest.raises(SubmissionError, match=r"line 2: image name .* is empty or contains spaces"):
        read_masks_csv(path)
