"""Losses: zero at the truth, NaN pixels ignored, the R² loss is 1 - R² per city, weights override."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geopose_mlops.constants import AGL, CITY, MAG, SCALE, XYDIR
from geopose_mlops.errors import ConfigError
from geopose_mlops.models.losses import DEFAULT_WEIGHTS, build_loss

NAMES = list(DEFAULT_WEIGHTS)


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
    total, parts = build_loss(name)(_truth_as_outputs(batch), batch)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(parts) == {"agl", "mag", "angle", "scale"}
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in parts.values())


@pytest.mark.parametrize("name", NAMES)
def test_nan_pixels_are_ignored(name: str) -> None:
    batch = _batch()
    outputs = _truth_as_outputs(batch)
    # Whatever is predicted where the truth is NaN changes nothing, and gets no gradient.
    wild_agl = torch.where(torch.isnan(batch[AGL]), torch.tensor(1e6), outputs[AGL]).requires_grad_(True)
    wild = {**outputs, AGL: wild_agl}
    total, _ = build_loss(name)(wild, batch)
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
    total, parts = build_loss(name)(outputs, batch)
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


def test_r2_loss_is_one_minus_r2_per_city_averaged() -> None:
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
    _, parts = build_loss("r2")(outputs, batch)

    a, p = agl.numpy(), pred.numpy()
    expected = ((1 - _r2(a[:2], p[:2])) + (1 - _r2(a[2:], p[2:]))) / 2
    assert parts["agl"] == pytest.approx(expected, rel=1e-5)
    # by hand: city 1 truth [1,2,3,4,0,2,2] mean 2, SST 10, SSE 0.25+1+1+1 = 3.25; city 3 SST 20, SSE 2
    assert parts["agl"] == pytest.approx((3.25 / (10 + 1e-4) + 2 / (20 + 1e-4)) / 2, rel=1e-5)


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
        build_loss("r2", {"angle": -1})
