"""Tests of rsseg.vector.evaluate: SpaceNet-rule matching, the min-area rule, object F1 and area IoU on
hand-made buildings."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from rsseg.cli import cli, main
from rsseg.errors import ConfigError
from rsseg.vector import EvaluateOptions
from rsseg.vector.evaluate import evaluate_vectors, match_buildings
from rsseg.vector.files import write_vectors

UTM = "EPSG:32650"
X0, Y0 = 500_000.0, 4_000_000.0


def box(x0, y0, x1, y1):
    return shapely.box(X0 + x0, Y0 + y0, X0 + x1, Y0 + y1)


def frame(*geoms, crs=UTM):
    return gpd.GeoDataFrame({"id": range(1, len(geoms) + 1)}, geometry=list(geoms), crs=crs)


TRUTH = frame(box(0, 0, 10, 10),  # split in two by the prediction
              box(20, 0, 30, 10), box(31, 0, 41, 10),  # predicted as one merged building
              box(50, 0, 60, 10),  # predicted shifted by 2 m: IoU 80/120
              box(70, 0, 80, 10))  # predicted shifted by 6 m: IoU 40/160, missed
PRED = frame(box(0, 0, 3, 10), box(3, 0, 10, 10),  # IoU 0.3 and 0.7: one match, one false positive
             box(20, 0, 41, 10),  # IoU 100/210 with each: no match
             box(52, 0, 62, 10),
             box(76, 0, 86, 10))


def test_split_merged_and_shifted_buildings():
    result = evaluate_vectors(PRED, TRUTH)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 3, 3)
    assert result["precision"] == pytest.approx(2 / 5)
    assert result["recall"] == pytest.approx(2 / 5)
    assert result["f1"] == pytest.approx(0.4)
    assert result["mean_iou"] == pytest.approx((0.7 + 80 / 120) / 2)
    truth_area, pred_area = 500.0, 10 * 10 + 210 + 100 + 100
    overlap = 100 + 200 + 80 + 40
    assert result["area_iou"] == pytest.approx(overlap / (truth_area + pred_area - overlap))
    assert result["area_dice"] == pytest.approx(2 * overlap / (truth_area + pred_area))
    json.dumps(result)


def test_one_to_one_in_prediction_order():
    truth = frame(box(0, 0, 10, 10)).geometry.values.to_numpy()
    pred = frame(box(1, 0, 11, 10), box(0, 0, 10, 10)).geometry.values.to_numpy()  # IoU 0.82 then 1.0
    p, t, iou = match_buildings(pred, truth)
    assert p.tolist() == [0] and t.tolist() == [0] and iou[0] == pytest.approx(90 / 110)
    # a prediction takes the best still unmatched truth building
    truth = frame(box(0, 0, 10, 10), box(1, 0, 11, 10)).geometry.values.to_numpy()
    pred = frame(box(0, 0, 10, 10), box(0.5, 0, 10.5, 10)).geometry.values.to_numpy()
    p, t, _ = match_buildings(pred, truth)
    assert list(zip(p.tolist(), t.tolist(), strict=True)) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="IoU threshold"):
        match_buildings(pred, truth, iou_threshold=1.5)
    with pytest.raises(ConfigError, match="iou"):
        evaluate_vectors(frame(), frame(), iou=1.5)
    assert evaluate_vectors(PRED, TRUTH, EvaluateOptions(iou=0.24))["tp"] == 4
    with pytest.raises(OSError, match="missing.gpkg: no such file"):  # a VectorError
        evaluate_vectors("missing.gpkg", TRUTH)


def test_files_in_different_crs_and_empty_cases(tmp_path):
    write_vectors(TRUTH, tmp_path / "truth.gpkg")
    write_vectors(TRUTH, tmp_path / "same.geojson")  # EPSG:4326, rounded to 7 decimals
    result = evaluate_vectors(tmp_path / "same.geojson", tmp_path / "truth.gpkg")
    assert result["crs"] == UTM and result["f1"] == 1.0 and result["area_iou"] > 0.999
    geographic = evaluate_vectors(tmp_path / "truth.gpkg", tmp_path / "same.geojson")
    assert geographic["crs"] == UTM and geographic["f1"] == 1.0  # the UTM zone of the geographic truth
    empty = frame()
    assert evaluate_vectors(empty, empty)["f1"] == 1.0
    nothing = evaluate_vectors(frame(crs="EPSG:4326"), frame(crs="EPSG:4326"))  # no building to place a UTM zone
    assert (nothing["f1"], nothing["area_iou"], nothing["n_pred"]) == (1.0, 1.0, 0)
    missed = evaluate_vectors(empty, TRUTH)
    assert (missed["f1"], missed["fn"], missed["area_iou"]) == (0.0, 5, 0.0)


def test_cli_evaluate(tmp_path):
    write_vectors(PRED, tmp_path / "pred.geojson")
    write_vectors(TRUTH, tmp_path / "truth.gpkg")
    run = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "pred.geojson"), str(tmp_path / "truth.gpkg"),
                                   "--iou", "0.24"], catch_exceptions=False)
    assert run.exit_code == 0
    result = json.loads(run.stdout)
    assert (result["tp"], result["iou_threshold"]) == (4, 0.24)  # the 6 m shift (IoU 0.25) counts


@pytest.mark.parametrize(("case", "message"), [("text", "not a vector file"), ("no_crs", "no CRS"),
                                               ("points", "expected building polygons"), ("iou", "iou"),
                                               ("parquet", "not a vector file"), ("min_area", "min_area")])
def test_cli_evaluate_bad_input(tmp_path, capsys, case, message):
    write_vectors(TRUTH, tmp_path / "truth.gpkg")
    pred = tmp_path / "pred.geojson"
    if case == "text":
        pred.write_text("no vectors here\n")
    elif case == "parquet":
        pred = tmp_path / "pred.parquet"
        pred.write_text("no vectors here\n")
    elif case == "no_crs":
        with pytest.warns(UserWarning, match="'crs' was not provided"):  # pyogrio's, the point of the case
            frame(box(0, 0, 1, 1), crs=None).to_file(tmp_path / "pred.gpkg")
        pred = tmp_path / "pred.gpkg"
    elif case == "points":
        write_vectors(gpd.GeoDataFrame(geometry=[shapely.Point(X0, Y0)], crs=UTM), pred)
    else:
        write_vectors(PRED, pred)
    flags = {"iou": ["--iou", "0"], "min_area": ["--min-area", "-1"]}.get(case, [])
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(pred), str(tmp_path / "truth.gpkg"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("rsseg: error:") and message in lines[0]


def test_min_area_leaves_small_polygons_out_on_both_sides():
    small_truth = [box(100, 0, 102, 2), box(110, 0, 112, 2)]  # 4 m2 each: one found, one missed
    small_pred = [box(100, 0, 102, 2), box(120, 0, 121, 3)]  # 4 m2 (a match) and 3 m2 (a false positive)
    truth = frame(*TRUTH.geometry, *small_truth)
    pred = frame(*PRED.geometry, *small_pred)
    counted = evaluate_vectors(pred, truth)
    assert (counted["tp"], counted["fp"], counted["fn"]) == (3, 4, 4)
    assert (counted["min_area_m2"], counted["left_out"]) == (0.0, {"pred": 0, "truth": 0})
    rule = evaluate_vectors(pred, truth, min_area=5)
    assert (rule["tp"], rule["fp"], rule["fn"], rule["n_pred"], rule["n_truth"]) == (2, 3, 3, 5, 5)
    assert rule["left_out"] == {"pred": 2, "truth": 2} and rule["min_area_m2"] == 5
    assert rule["iou_threshold"] == 0.5 and "under 5 m2 left out on both sides" in rule["rule"]
    plain = evaluate_vectors(PRED, TRUTH)
    assert {k: rule[k] for k in ("f1", "mean_iou", "area_iou")} == pytest.approx(
        {k: plain[k] for k in ("f1", "mean_iou", "area_iou")})
    # the area is on the ground: 3 m x 3 m (9 m2) drawn in Web Mercator at latitude 50 covers ~3.7 m2
    mercator = frame(shapely.box(1_113_195, 6_446_276, 1_113_198, 6_446_279), crs="EPSG:3857")
    assert evaluate_vectors(mercator, mercator, min_area=5)["left_out"] == {"pred": 1, "truth": 1}
    assert evaluate_vectors(mercator, mercator, min_area=3)["left_out"] == {"pred": 0, "truth": 0}
    assert np.cos(np.radians(50)) ** 2 * 9 == pytest.approx(3.7, abs=0.05)
    with pytest.raises(ConfigError, match="min_area"):
        evaluate_vectors(pred, truth, min_area=-1)


def test_cli_evaluate_min_area_and_geoparquet(tmp_path):
    from rsseg.pipeline.stages import EvaluateParams

    truth = frame(*TRUTH.geometry, box(100, 0, 102, 2))
    write_vectors(frame(*PRED.geometry, box(120, 0, 121, 3)), tmp_path / "pred.parquet")
    write_vectors(truth, tmp_path / "truth.gpkg")
    run = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "pred.parquet"), str(tmp_path / "truth.gpkg"),
                                   "--min-area", "5"], catch_exceptions=False)
    assert run.exit_code == 0
    result = json.loads(run.stdout)
    assert (result["tp"], result["fp"], result["fn"], result["left_out"]) == (2, 3, 3, {"pred": 1, "truth": 1})
    assert (result["min_area_m2"], result["iou_threshold"]) == (5.0, 0.5)
    assert EvaluateParams(pred="p", truth="t", min_area=20).min_area == 20  # the pipeline stage's parameter
