"""Training losses over model outputs and batches (dicts keyed by the names in ``constants``).

``build_loss(name, weights)`` returns ``loss_fn(outputs, batch) -> (total, parts)``: ``total`` is the
weighted sum of four terms (height ``agl``, magnitude ``mag``, direction ``angle``, ``scale``) as a
scalar tensor to back-propagate, ``parts`` the unweighted terms as floats for logging. Pixels whose
target is NaN (no data) are left out of every pixel term; a batch without a single valid pixel gives
finite terms (0).

- ``mse`` (default): the public baseline's (pubgeo/monocular-geocentric-pose, ``utilities/ml_utils.py``
  and ``main.py``): NaN-masked MSE on height (m) and magnitude (px), MSE on the (sin, cos) direction and
  on the scale, weighted agl 1, mag 2, angle 10, scale 10 (``main.py``'s ``--agl-weight`` ...
  defaults). The baseline trains in the same units (``misc_utils.load_vflow`` converts AGL to m and
  scale to px/m), so its weights carry over unchanged.
- ``r2``: the 1st-place team's (drivendataorg/overhead-geopose-challenge, ``1st Place/training/
  losses.py`` ``r2_per_city`` and ``configs/v2l_tune.json``): for height and magnitude, per city present
  in the batch, SSE over the city's total sum of squares about its batch mean (1 - R², with the metric's
  1e-4 in the denominator), averaged over those cities; MSE on direction (weight 2) and scale (20).
- ``huber_cos``: the 2nd-place team's (``2nd Place/configs/loss/huber_cos.yaml``): Huber on height
  (delta 5 m) and magnitude (delta 10 px), direction as (1 - cosine similarity) + MSE, all weight 1;
  their model had no least-squares scale term, so scale MSE is added here with weight 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from geopose_mlops.constants import AGL, CITIES, CITY, MAG, R2_EPS, SCALE, XYDIR
from geopose_mlops.errors import ConfigError

TERMS = ("agl", "mag", "angle", "scale")

DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "mse": {"agl": 1.0, "mag": 2.0, "angle": 10.0, "scale": 10.0},
    "r2": {"agl": 1.0, "mag": 1.0, "angle": 2.0, "scale": 20.0},
    "huber_cos": {"agl": 1.0, "mag": 1.0, "angle": 1.0, "scale": 1.0},
}

HUBER_DELTA_AGL = 5.0  # m
HUBER_DELTA_MAG = 10.0  # px

Tensors = Mapping[str, torch.Tensor]


def _valid(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(finite mask, target with non-finite values replaced by 0 so no NaN reaches a gradient)."""
    valid = torch.isfinite(target)
    return valid, torch.where(valid, target, torch.zeros_like(target))


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the finite entries of ``target`` (0 when there are none)."""
    valid, target0 = _valid(target.float())
    sq = torch.where(valid, (pred.float() - target0) ** 2, torch.zeros_like(target0))
    return sq.sum() / valid.sum().clamp_min(1)


def masked_huber(pred: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber loss (quadratic within ``delta``, linear beyond) over the finite entries of ``target``."""
    valid, target0 = _valid(target.float())
    per_pixel = F.huber_loss(pred.float(), target0, reduction="none", delta=delta)
    return torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum() / valid.sum().clamp_min(1)


def per_city_r2_loss(pred: torch.Tensor, target: torch.Tensor, city: torch.Tensor) -> torch.Tensor:
    """Mean over the cities in the batch of ``SSE / (SST + 1e-4)`` = 1 - R² of that city's valid pixels.

    Args:
        pred: Prediction (B, H, W).
        target: Truth (B, H, W), NaN = no data.
        city: City index (B,) into CITIES.

    Returns:
        Scalar loss; 0 when no city has a valid pixel.
    """
    valid, target0 = _valid(target.float())
    pred = pred.float()
    terms, present = [], []
    for index in range(len(CITIES)):
        mask = valid & (city == index).view(-1, *([1] * (target.dim() - 1)))
        count = mask.sum()
        mean = torch.where(mask, target0, torch.zeros_like(target0)).sum() / count.clamp_min(1)
        sst = torch.where(mask, (target0 - mean) ** 2, torch.zeros_like(target0)).sum()
        sse = torch.where(mask, (pred - target0) ** 2, torch.zeros_like(target0)).sum()
        terms.append(sse / (sst + R2_EPS))
        present.append(count > 0)
    terms_t, present_t = torch.stack(terms), torch.stack(present).float()
    return (terms_t * present_t).sum() / present_t.sum().clamp_min(1)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cosine similarity between predicted and true direction vectors (B, 2)."""
    valid = torch.isfinite(target).all(dim=1)
    target0 = torch.where(valid[:, None], target.float(), torch.ones_like(target, dtype=torch.float32))
    cos = F.cosine_similarity(pred.float(), target0, dim=1, eps=1e-6)
    return torch.where(valid, 1.0 - cos, torch.zeros_like(cos)).sum() / valid.sum().clamp_min(1)


class GeoposeLoss:
    """A weighted sum of height, magnitude, direction and scale terms.

    Args:
        name: ``mse``, ``r2`` or ``huber_cos``.
        weights: Weight per term (keys ``agl``, ``mag``, ``angle``, ``scale``).
    """

    def __init__(self, name: str, weights: Mapping[str, float]) -> None:
        self.name = name
        self.weights = dict(weights)
        self._terms: dict[str, Callable[[Tensors, Tensors], torch.Tensor]] = {
            "mse": self._mse_terms,
            "r2": self._r2_terms,
            "huber_cos": self._huber_cos_terms,
        }

    def __call__(self, outputs: Tensors, batch: Tensors) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (weighted total for backward, unweighted terms as floats)."""
        terms = self._terms[self.name](outputs, batch)
        total = sum(self.weights[key] * terms[key] for key in TERMS)
        # One device-to-host copy for all four logged values.
        values = torch.stack([terms[key].detach() for key in TERMS]).tolist()
        return total, dict(zip(TERMS, values, strict=True))

    def __repr__(self) -> str:
        return f"GeoposeLoss({self.name!r}, weights={self.weights})"

    @staticmethod
    def _direction_scale(outputs: Tensors, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        target = batch[XYDIR].to(outputs[XYDIR].device)
        return masked_mse(outputs[XYDIR], target), masked_mse(outputs[SCALE], batch[SCALE].to(target.device))

    def _mse_terms(self, outputs: Tensors, batch: Tensors) -> dict[str, torch.Tensor]:
        angle, scale = self._direction_scale(outputs, batch)
        return {
            "agl": masked_mse(outputs[AGL], batch[AGL]),
            "mag": masked_mse(outputs[MAG], batch[MAG]),
            "angle": angle,
            "scale": scale,
        }

    def _r2_terms(self, outputs: Tensors, batch: Tensors) -> dict[str, torch.Tensor]:
        angle, scale = self._direction_scale(outputs, batch)
        city = batch[CITY].to(outputs[AGL].device)
        return {
            "agl": per_city_r2_loss(outputs[AGL], batch[AGL], city),
            "mag": per_city_r2_loss(outputs[MAG], batch[MAG], city),
            "angle": angle,
            "scale": scale,
        }

    def _huber_cos_terms(self, outputs: Tensors, batch: Tensors) -> dict[str, torch.Tensor]:
        angle_mse, scale = self._direction_scale(outputs, batch)
        return {
            "agl": masked_huber(outputs[AGL], batch[AGL], HUBER_DELTA_AGL),
            "mag": masked_huber(outputs[MAG], batch[MAG], HUBER_DELTA_MAG),
            "angle": cosine_loss(outputs[XYDIR], batch[XYDIR]) + angle_mse,
            "scale": scale,
        }


def build_loss(name: str = "mse", weights: Mapping[str, float] | None = None) -> GeoposeLoss:
    """Build a loss by name, with the per-term weights of its source unless overridden.

    Args:
        name: ``mse`` (baseline, default), ``r2`` (per-city R², 1st place) or ``huber_cos`` (2nd place).
        weights: Overrides for some or all of ``agl``, ``mag``, ``angle``, ``scale`` (non-negative).

    Raises:
        ConfigError: Unknown loss name or weight key, or a negative or non-finite weight.
    """
    if name not in DEFAULT_WEIGHTS:
        raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(DEFAULT_WEIGHTS)}")
    merged = dict(DEFAULT_WEIGHTS[name])
    for key, value in (weights or {}).items():
        if key not in merged:
            raise ConfigError(f"unknown loss weight {key!r} for loss {name!r}; valid: {', '.join(TERMS)}")
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"loss weight {key}={value!r}: expected a finite number >= 0")
        merged[key] = float(value)
    return GeoposeLoss(name, merged)
