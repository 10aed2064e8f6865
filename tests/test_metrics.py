"""The competition metric: hand-computed cases, an independent two-pass check, and `evaluate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from geopose_mlops.cli import main
from geopose_mlops.data import io
from geopose_mlops.metrics import GeoposeMetric, PooledR2, angle_error_deg, evaluate_folder


def test_r2_on_a_hand_computed_4x4_case() -> None:
    truth = np.arange(16, dtype=np.float64).reshape(4, 4)  # mean 7.5, SST = sum((i - 7.5)^2) = 340
    pred = truth + np.array([1.0, -1.0] * 8).reshape(4, 4)  # SSE = 16
    acc = PooledR2()
    acc.update(truth, pred)
    assert acc.r2 == pytest.approx(1 - 16 / (340 + 1e-4), abs=1e-12)


def test_city_score_is_the_mean_of_agl_and_vflow_r2_by_hand() -> None:
    # 2x2 image, scale 2 px/m, angle 0 -> flow = (0, 2 * agl). Predict half the height, exact angle/scale.
    truth = np.array([[0.0, 2.0], [4.0, 6.0]])
    pred = truth / 2
    metric = GeoposeMetric()
    metric.update("JAX", pred, truth, 2.0, 0.0, 2.0, 0.0)
    city = metric.compute()["cities"]["JAX"]
    agl_sst, agl_sse = 20.0, (0 + 1 + 4 + 9)
    # VFLOW pools both components: x = 0 everywhere (8 values in all), y = 2 * agl.
    flow_true = np.concatenate([np.zeros(4), 2 * truth.ravel()])
    flow_sst = float(np.square(flow_true - flow_true.mean()).sum())
    flow_sse = 4 * agl_sse
    assert city["agl_r2"] == pytest.approx(1 - agl_sse / (agl_sst + 1e-4), abs=1e-12)
    assert city["vflow_r2"] == pytest.approx(1 - flow_sse / (flow_sst + 1e-4), abs=1e-12)
    assert city["score"] == pytest.approx((city["agl_r2"] + city["vflow_r2"]) / 2)
    assert city["agl_rmse"] == pytest.approx(math.sqrt(agl_sse / 4))


def test_perfect_predictions_score_one_and_nan_truth_is_left_out() -> None:
    rng = np.random.default_rng(0)
    metric = GeoposeMetric()
    for city in ("ARG", "OMA"):
        truth = rng.uniform(0, 30, (8, 8))
        truth[0, :3] = np.nan
        pred = truth.copy()
        pred[0, :3] = 1e6  # wildly wrong where the truth has no data: must not count
        metric.update(city, pred, truth, 3.0, 1.0, 3.0, 1.0)
    scores = metric.compute()
    assert scores["final_score"] == pytest.approx(1.0, abs=1e-6)
    assert set(scores["cities"]) == {"ARG", "OMA"}
    assert scores["cities"]["ARG"]["pixels"] == 64 - 3


def test_image_with_no_valid_pixel_is_skipped_not_divided_by_zero() -> None:
    metric = GeoposeMetric()
    metric.update("ATL", np.zeros((4, 4)), np.full((4, 4), np.nan), 1.0, 0.0, 1.0, 0.0, sample_id="ATL_x")
    assert metric.skipped == ["ATL_x"]
    assert math.isnan(metric.compute()["final_score"])


def test_angle_error_wraps_around_the_circle() -> None:
    assert angle_error_deg(math.radians(359), math.radians(1)) == pytest.approx(2.0)
    assert angle_error_deg(math.pi, -math.pi) == pytest.approx(0.0, abs=1e-9)


def _two_pass_score(images: list[dict]) -> float:
    """Independent re-implementation: gather every pixel of a city, then R2 with a second pass."""
    per_city: dict[str, dict[str, list]] = {}
    for im in images:
        valid = np.isfinite(im["agl_true"])
        d = per_city.setdefault(im["city"], {"ht": [], "hp": [], "ft": [], "fp": []})
        ht, hp = im["agl_true"][valid], im["agl_pred"][valid]
        d["ht"].append(ht)
        d["hp"].append(hp)
        for h, s, a, key in (
            (ht, im["scale_true"], im["angle_true"], "ft"),
            (hp, im["scale_pred"], im["angle_pred"], "fp"),
        ):
            d[key].append(np.concatenate([h * s * math.sin(a), h * s * math.cos(a)]))
    scores = []
    for d in per_city.values():
        r2s = []
        for t, p in (
            (np.concatenate(d["ht"]), np.concatenate(d["hp"])),
            (np.concatenate(d["ft"]), np.concatenate(d["fp"])),
        ):
            r2s.append(1 - np.sum((p - t) ** 2) / (np.sum((t - t.mean()) ** 2) + 1e-4))
        scores.append(np.mean(r2s))
    return float(np.mean(scores))


@pytest.fixture()
def submission(tmp_path):
    """A truth folder and a perturbed prediction folder of 2 images in each of 3 cities, 16 px."""
    rng = np.random.default_rng(0)
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    images = []
    for city in ("ARG", "ATL", "JAX"):
        for k in range(2):
            name = f"{city}_img{k}"
            agl = np.round(rng.gamma(2.0, 5.0, (16, 16)), 2)
            agl[rng.random((16, 16)) < 0.05] = np.nan
            pred = np.round(np.clip(agl + rng.normal(0, 2, agl.shape), 0, None), 2)
            pred = np.nan_to_num(pred, nan=3.0)
            scale_t, angle_t = rng.uniform(1, 4), rng.uniform(-math.pi, math.pi)
            scale_p, angle_p = scale_t * rng.uniform(0.9, 1.1), angle_t + rng.normal(0, 0.1)
            io.write_agl(truth_dir / f"{name}_AGL.tif", agl)
            io.write_vflow(truth_dir / f"{name}_VFLOW.json", scale_t, angle_t)
            io.write_agl(pred_dir / f"{name}_AGL.tif", pred)
            io.write_vflow(pred_dir / f"{name}_VFLOW.json", scale_p, angle_p)
            # what the files hold after the round trip (cm rounding, px/cm)
            images.append(
                {
                    "city": city,
                    "agl_true": io.read_agl(truth_dir / f"{name}_AGL.tif").astype(np.float64),
                    "agl_pred": io.read_agl(pred_dir / f"{name}_AGL.tif").astype(np.float64),
                    "scale_true": io.read_vflow(truth_dir / f"{name}_VFLOW.json")[0],
                    "angle_true": angle_t,
                    "scale_pred": io.read_vflow(pred_dir / f"{name}_VFLOW.json")[0],
                    "angle_pred": angle_p,
                }
            )
    return truth_dir, pred_dir, images


def test_evaluate_equals_an_independent_two_pass_computation(submission) -> None:
    truth_dir, pred_dir, images = submission
    scores = evaluate_folder(pred_dir, truth_dir, progress=False)
    assert abs(scores["final_score"] - _two_pass_score(images)) < 1e-9
    assert 0.0 < scores["final_score"] < 1.0


def test_evaluate_cli_writes_the_spec_json(submission, tmp_path) -> None:
    truth_dir, pred_dir, _ = submission
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(
        main, ["evaluate", "--predictions-dir", str(pred_dir), "--truth-dir", str(truth_dir), "--output-json", str(out)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    expected_keys = {
        "score",
        "agl_r2",
        "vflow_r2",
        "agl_rmse",
        "mag_rmse",
        "epe_rmse",
        "angle_error_deg",
        "scale_error",
    }
    assert set(doc["cities"]) == {"ARG", "ATL", "JAX"}
    assert expected_keys <= set(doc["cities"]["ATL"])
    assert doc["final_score"] == pytest.approx(np.mean([c["score"] for c in doc["cities"].values()]))


def test_evaluate_names_every_missing_prediction(submission) -> None:
    truth_dir, pred_dir, _ = submission
    (pred_dir / "ATL_img1_AGL.tif").unlink()
    (pred_dir / "JAX_img0_VFLOW.json").unlink()
    result = CliRunner().invoke(main, ["evaluate", "--predictions-dir", str(pred_dir), "--truth-dir", str(truth_dir)])
    assert result.exit_code == 1
    assert "ATL_img1_AGL.tif" in result.output and "JAX_img0_VFLOW.json" in result.output
    assert "2 prediction file(s) missing" in result.output
