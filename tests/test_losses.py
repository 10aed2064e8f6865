"""Losses: zero at the truth, NaN pixels ignored, the R² loss is 1 - R² per city against the training
set's city means, weights override."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geopose_mlops.constants import AGL, CITY, MAG, SCALE, XYDIR
from geopose_mlops.errors import ConfigError
from geopose_mlops.models.losses import DEFAULT_WEIGHTS, CityMeans, build_loss, city_means_from

NAMES = list(DEFAULT_WEIGHTS)
MEANS = {"ARG": {"agl": 8.0, "mag": 12.0}, "JAX": {"agl": 11.0, "mag": 14.0}, "OMA": {"agl": 9.0, "mag": 13.0}}


def _build(name: str, weights: dict[str, float] | None = None):
    """The loss ``name``; ``r2`` with city means for every city of ``_batch``."""
    return build_loss(name, weights, city_means=MEANS if name == "r2" else None)


def _batch(seed: int = 0, batch: int = 4, side: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    agl = torch.rand(batch, side, side, generator=gen) * 20.0
    agl[:, :2, :2] = float("nan")
    scale = 1.0 + torch.rand(batch, generator=gen)
    angle = torch.rand(batch, generator=gen) * 2 * math.pi
    return {
        AGL: agl,
        MAG: agl * scale[:, None, None],
        XYDIR: torch.stack([torch.sin(angle), torch.cos(angle)], dim=1),
        SCALE: scale,
        CITY: torch.tensor([0, 0, 2, 3])[:batch],
    }


def _truth_as_outputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.nan_to_num(batch[key].clone(), nan=3.0) for key in (AGL, MAG, XYDIR, SCALE)}


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_zero_at_the_truth(name: str) -> None:
    batch = _batch()
    total, parts = _build(name)(_truth_as_outputs(batch), batch)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(parts) == set(DEFAULT_WEIGHTS[name])  # every weighted term is logged
    assert {"agl", "mag", "angle", "scale"} <= set(parts)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in parts.values())


@pytest.mark.parametrize("name", NAMES)
def test_nan_pixels_are_ignored(name: str) -> None:
    batch = _batch()
    outputs = _truth_as_outputs(batch)
    # Whatever is predicted where the truth is NaN changes nothing, and gets no gradient.
    wild_agl = torch.where(torch.isnan(batch[AGL]), torch.tensor(1e6), outputs[AGL]).requires_grad_(True)
    wild = {**outputs, AGL: wild_agl}
    total, _ = _build(name)(wild, batch)
    total.backward()
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(wild_agl.grad).all()
    assert torch.all(wild_agl.grad[torch.isnan(batch[AGL])] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_batch_without_valid_pixels_gives_finite_loss_and_gradients(name: str) -> None:
    batch = _batch()
    batch[AGL] = torch.full_like(batch[AGL], float("nan"))
    batch[MAG] = batch[AGL].clone()
    outputs = {k: v.requires_grad_(True) for k, v in _truth_as_outputs(_batch(seed=1)).items()}
    total, parts = _build(name)(outputs, batch)
    total.backward()
    assert math.isfinite(total.item())
    assert parts["agl"] == 0.0 and parts["mag"] == 0.0
    assert all(torch.isfinite(v.grad).all() for v in outputs.values() if v.grad is not None)


def test_mse_matches_the_hand_computed_value_with_baseline_weights() -> None:
    batch = _batch()
    outputs = _truth_as_outputs(batch)
    outputs[AGL] = outputs[AGL] + 2.0  # every valid pixel off by 2 m -> MSE 4
    outputs[SCALE] = outputs[SCALE] + 0.5  # -> MSE 0.25
    total, parts = build_loss("mse")(outputs, batch)
    assert parts["agl"] == pytest.approx(4.0, rel=1e-5)
    assert parts["scale"] == pytest.approx(0.25, rel=1e-5)
    assert total.item() == pytest.approx(1.0 * 4.0 + 10.0 * 0.25, rel=1e-5)


def _r2(truth: np.ndarray, pred: np.ndarray) -> float:
    valid = np.isfinite(truth)
    t, p = truth[valid], pred[valid]
    return 1.0 - ((t - p) ** 2).sum() / (((t - t.mean()) ** 2).sum() + 1e-4)


def test_r2_loss_falls_back_to_the_batch_mean_for_cities_without_a_training_mean() -> None:
    agl = torch.tensor(
        [
            [[1.0, 2.0], [3.0, float("nan")]],  # city 1
            [[4.0, 0.0], [2.0, 2.0]],  # city 1
            [[10.0, 12.0], [14.0, 16.0]],  # city 3
        ]
    )
    pred = torch.tensor(
        [
            [[1.5, 2.0], [2.0, 50.0]],
            [[4.0, 1.0], [2.0, 3.0]],
            [[11.0, 12.0], [13.0, 16.0]],
        ]
    )
    city = torch.tensor([1, 1, 3])
    batch = {AGL: agl, MAG: agl.clone(), XYDIR: torch.tensor([[0.0, 1.0]] * 3), SCALE: torch.ones(3), CITY: city}
    outputs = {AGL: pred, MAG: agl.nan_to_num(0.0), XYDIR: batch[XYDIR], SCALE: batch[SCALE]}
    _, parts = build_loss("r2", city_means=CityMeans(agl={}, mag={}))(outputs, batch)

    a, p = agl.numpy(), pred.numpy()
    expected = ((1 - _r2(a[:2], p[:2])) + (1 - _r2(a[2:], p[2:]))) / 2
    assert parts["agl"] == pytest.approx(expected, rel=1e-5)
    # by hand: city 1 truth [1,2,3,4,0,2,2] mean 2, SST 10, SSE 0.25+1+1+1 = 3.25; city 3 SST 20, SSE 2
    assert parts["agl"] == pytest.approx((3.25 / (10 + 1e-4) + 2 / (20 + 1e-4)) / 2, rel=1e-5)


def _one_minus_r2_about(truth: np.ndarray, pred: np.ndarray, mean: float) -> float:
    """1 - R² of the valid pixels, the total sum of squares taken about ``mean``."""
    valid = np.isfinite(truth)
    t, p = truth[valid].astype(np.float64), pred[valid].astype(np.float64)
    return ((t - p) ** 2).sum() / (((t - mean) ** 2).sum() + 1e-4)


def _two_city_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    agl = torch.tensor(
        [
            [[1.0, 2.0], [3.0, float("nan")]],  # ARG
            [[10.0, 12.0], [14.0, 16.0]],  # OMA
        ]
    )
    pred = torch.tensor([[[2.0, 2.0], [3.0, 100.0]], [[10.0, 10.0], [14.0, 17.0]]])
    mag = agl * 2.0
    batch = {AGL: agl, MAG: mag, XYDIR: torch.tensor([[0.0, 1.0]] * 2), SCALE: torch.full((2,), 2.0)}
    batch[CITY] = torch.tensor([0, 3])
    outputs = {AGL: pred, MAG: mag.nan_to_num(0.0) + 1.0, XYDIR: batch[XYDIR], SCALE: batch[SCALE]}
    return batch, outputs


def test_r2_loss_is_one_minus_r2_against_the_training_city_means() -> None:
    batch, outputs = _two_city_batch()
    means = {"ARG": {"agl": 4.0, "mag": 5.0}, "OMA": {"agl": 10.0, "mag": 30.0}}
    _, parts = build_loss("r2", city_means=means)(outputs, batch)

    # by hand, the NaN pixel (predicted 100) left out: ARG truth [1, 2, 3] about 4: SST 9+4+1 = 14, SSE 1;
    # OMA truth [10, 12, 14, 16] about 10: SST 0+4+16+36 = 56, SSE 4+1 = 5
    assert parts["agl"] == pytest.approx((1 / (14 + 1e-4) + 5 / (56 + 1e-4)) / 2, rel=1e-6)
    a, p = batch[AGL].numpy(), outputs[AGL].numpy()
    expected = (_one_minus_r2_about(a[0], p[0], 4.0) + _one_minus_r2_about(a[1], p[1], 10.0)) / 2
    assert parts["agl"] == pytest.approx(expected, rel=1e-6)
    # magnitude (px) against its own means: every valid pixel off by 1
    m, q = batch[MAG].numpy(), outputs[MAG].numpy()
    expected_mag = (_one_minus_r2_about(m[0], q[0], 5.0) + _one_minus_r2_about(m[1], q[1], 30.0)) / 2
    assert parts["mag"] == pytest.approx(expected_mag, rel=1e-6)
    assert parts["mag"] == pytest.approx((3 / (9 + 1 + 1 + 1e-4) + 4 / (100 + 36 + 4 + 4 + 1e-4)) / 2, rel=1e-6)
    # the spread about the training mean is never below the spread about the batch's own mean
    batch_mean_parts = build_loss("r2", city_means=CityMeans(agl={}, mag={}))(outputs, batch)[1]
    assert parts["agl"] < batch_mean_parts["agl"]


def test_r2_loss_adds_the_first_places_focal_terms_at_their_weight() -> None:
    batch, outputs = _two_city_batch()
    means = {"ARG": {"agl": 4.0, "mag": 5.0}, "OMA": {"agl": 10.0, "mag": 30.0}}
    total, parts = build_loss("r2", city_means=means)(outputs, batch)

    # by hand: e² (2 sigmoid(0.2 |e|) - 1) = e² tanh(0.1 |e|) over the 7 valid height pixels: errors 1, 0, 0
    # (ARG) and 2, 1, 0, 0 (OMA)
    focal = lambda e: e**2 * math.tanh(0.1 * abs(e))  # noqa: E731
    assert parts["agl_focal"] == pytest.approx((focal(1) + focal(2) + focal(1)) / 7, rel=1e-5)
    assert parts["mag_focal"] == pytest.approx(focal(1.0), rel=1e-5)  # every valid magnitude off by 1
    weighted = parts["agl"] + parts["mag"] + 2 * parts["angle"] + 20 * parts["scale"]
    weighted += 0.05 * (parts["agl_focal"] + parts["mag_focal"])
    assert total.item() == pytest.approx(weighted, rel=1e-5)
    without = build_loss("r2", {"agl_focal": 0.0, "mag_focal": 0.0}, city_means=means)(outputs, batch)[0]
    assert without.item() == pytest.approx(weighted - 0.05 * (parts["agl_focal"] + parts["mag_focal"]), rel=1e-5)


def test_a_city_without_a_training_mean_falls_back_to_its_batch_mean() -> None:
    batch, outputs = _two_city_batch()
    _, parts = build_loss("r2", city_means={"ARG": {"agl": 4.0, "mag": 5.0}})(outputs, batch)
    a, p = batch[AGL].numpy(), outputs[AGL].numpy()
    expected = (_one_minus_r2_about(a[0], p[0], 4.0) + _one_minus_r2_about(a[1], p[1], 13.0)) / 2
    assert parts["agl"] == pytest.approx(expected, rel=1e-6)


def test_city_means_from_streams_memory_mapped_cache_arrays(tmp_path) -> None:
    rng = np.random.default_rng(0)
    agl = (rng.random((6, 4, 4)) * 30).astype(np.float32)
    agl[0, :2] = np.nan
    agl[3] = np.nan  # an image without truth
    scale = np.array([1.5, 2.0, np.nan, 1.0, 3.0, 0.5], np.float32)
    city = np.array([0, 0, 1, 1, 3, 2], np.int64)
    np.save(tmp_path / "agl.npy", agl)
    mapped = np.load(tmp_path / "agl.npy", mmap_mode="r")
    rows = np.array([0, 1, 2, 3, 4])  # row 5 (JAX) is a validation image

    means = city_means_from(mapped, scale, city, rows=rows)

    arg = np.concatenate([agl[0][np.isfinite(agl[0])], agl[1].ravel()]).astype(np.float64)
    arg_mag = np.concatenate([agl[0][np.isfinite(agl[0])] * 1.5, agl[1].ravel() * 2.0]).astype(np.float64)
    assert set(means.agl) == {"ARG", "ATL", "OMA"} and set(means.mag) == {"ARG", "OMA"}
    assert means.agl["ARG"] == pytest.approx(arg.mean(), rel=1e-9)
    assert means.mag["ARG"] == pytest.approx(arg_mag.mean(), rel=1e-6)
    assert means.agl["ATL"] == pytest.approx(agl[2].astype(np.float64).mean(), rel=1e-9)  # scale NaN: height only
    assert means.mag["OMA"] == pytest.approx((agl[4].astype(np.float64) * 3.0).mean(), rel=1e-6)
    assert means.pixels == {"ARG": 24, "ATL": 16, "OMA": 16}
    assert city_means_from(mapped, scale, city).agl["JAX"] == pytest.approx(agl[5].astype(np.float64).mean())
    params = means.as_params()
    assert set(params) == {f"r2_mean_agl_m_{c}" for c in ("ARG", "ATL", "OMA")} | {
        f"r2_mean_mag_px_{c}" for c in ("ARG", "OMA")
    }
    assert params["r2_mean_agl_m_ARG"] == pytest.approx(arg.mean(), abs=1e-4)


def test_huber_cos_direction_term_is_one_minus_cosine_plus_mse() -> None:
    batch = _batch(batch=1)
    outputs = _truth_as_outputs(batch)
    angle = math.atan2(batch[XYDIR][0, 0].item(), batch[XYDIR][0, 1].item()) + math.pi / 2
    outputs[XYDIR] = torch.tensor([[math.sin(angle), math.cos(angle)]])
    _, parts = build_loss("huber_cos")(outputs, batch)
    # perpendicular unit vectors: cosine 0, squared distance 2 over 2 components -> MSE 1
    assert parts["angle"] == pytest.approx(1.0 + 1.0, rel=1e-5)


def test_weights_override_the_defaults() -> None:
    batch = _batch()
    outputs = _truth_as_outputs(batch)
    outputs[MAG] = outputs[MAG] + 1.0
    outputs[SCALE] = outputs[SCALE] + 1.0
    default_total, parts = build_loss("mse")(outputs, batch)
    assert default_total.item() == pytest.approx(2.0 * parts["mag"] + 10.0 * parts["scale"], rel=1e-5)
    total, _ = build_loss("mse", {"scale": 0.0, "mag": 3.0})(outputs, batch)
    assert total.item() == pytest.approx(3.0 * parts["mag"], rel=1e-5)


def test_bad_names_and_weights_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'l1'; valid: mse, r2, huber_cos"):
        build_loss("l1")
    with pytest.raises(ConfigError, match="unknown loss weight 'height'.*agl, mag, angle, scale"):
        build_loss("mse", {"height": 1.0})
    with pytest.raises(ConfigError, match="angle=-1"):
        build_loss("r2", {"angle": -1}, city_means=MEANS)
    with pytest.raises(ConfigError, match="loss 'r2' needs the training images' mean height"):
        build_loss("r2")
    with pytest.raises(ConfigError, match="'PAR': expected one of ARG, ATL, JAX, OMA"):
        build_loss("r2", city_means={"PAR": {"agl": 1.0, "mag": 1.0}})
    with pytest.raises(ConfigError, match="ARG=nan: expected a finite number"):
        build_loss("r2", city_means={"ARG": {"agl": math.nan, "mag": 1.0}})
