"""Training losses over model outputs and batches (dicts keyed by the names in ``constants``).

``build_loss(name, weights, city_means)`` returns ``loss_fn(outputs, batch) -> (total, parts)``: ``total``
is the weighted sum of its terms (height ``agl``, magnitude ``mag``, direction ``angle``, ``scale``;
``r2`` adds two) as a scalar tensor to back-propagate, ``parts`` the unweighted terms as floats for
logging. Pixels whose target is NaN (no data) are left out of every pixel term; a batch without a
single valid pixel gives finite terms (0).

- ``mse`` (default): the public baseline's (pubgeo/monocular-geocentric-pose, ``utilities/ml_utils.py``
  and ``main.py``): NaN-masked MSE on height (m) and magnitude (px), MSE on the (sin, cos) direction and
  on the scale, weighted agl 1, mag 2, angle 10, scale 10 (``main.py``'s ``--agl-weight`` ...
  defaults). The baseline trains in the same units (``misc_utils.load_vflow`` converts AGL to m and
  scale to px/m), so its weights carry over unchanged.
- ``r2``: the 1st-place team's (drivendataorg/overhead-geopose-challenge, ``1st Place/training/
  losses.py`` ``r2_per_city`` and ``configs/v2l_tune.json``): for height and magnitude, per city present
  in the batch, the SSE over the batch's valid pixels of that city divided by their squared deviation
  from the city's mean over the *training set* (``CityMeans``, from ``city_means_from``), plus the
  metric's 1e-4; averaged over those cities; MSE on direction (weight 2) and scale (20); and, as that
  config has them, a focal MSE on height and magnitude (``masked_focal_mse``, weight 0.05 each:
  ``FocalAGLLossCalculator``, ``FocalMAGLossCalculator``). Dividing by the spread about the training-set
  mean is what the competition's pooled R² measures; the spread about the batch's own mean (a batch
  holds one or two images per city) is tiny and noisy, and a model trained on it learned a constant
  (issue 15). The focal terms matter too: an R² term is about 1 whatever the heights' units, so alone
  it pulls the linear height output towards metres-sized values ~100x more weakly than MSE does (on
  synthetic data, 60 epochs of one 16-image set: training R² 0.43 without them, 0.80 with, MSE 0.85).
- ``huber_cos``: the 2nd-place team's (``2nd Place/configs/loss/huber_cos.yaml``): Huber on height
  (delta 5 m) and magnitude (delta 10 px), direction as (1 - cosine similarity) + MSE, all weight 1;
  their model had no least-squares scale term, so scale MSE is added here with weight 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from geopose_mlops.constants import AGL, CITIES, CITY, MAG, R2_EPS, SCALE, XYDIR
from geopose_mlops.errors import ConfigError

TERMS = ("agl", "mag", "angle", "scale")  # every loss's terms; ``r2`` adds ``agl_focal``, ``mag_focal``
MEAN_TERMS = ("agl", "mag")  # the pixel terms whose R² needs a city mean: height (m), magnitude (px)

DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "mse": {"agl": 1.0, "mag": 2.0, "angle": 10.0, "scale": 10.0},
    "r2": {"agl": 1.0, "mag": 1.0, "angle": 2.0, "scale": 20.0, "agl_focal": 0.05, "mag_focal": 0.05},
    "huber_cos": {"agl": 1.0, "mag": 1.0, "angle": 1.0, "scale": 1.0},
}

HUBER_DELTA_AGL = 5.0  # m
HUBER_DELTA_MAG = 10.0  # px
FOCAL_BETA, FOCAL_GAMMA = 0.2, 1.0  # 1st place ``weighted_focal_mse_loss`` (sigmoid activation)

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class CityMeans:
    """Per city, the mean height and magnitude over the valid pixels of the training images.

    Attributes:
        agl: City name -> mean height above ground, m.
        mag: City name -> mean flow magnitude (height x scale), px.
        pixels: City name -> number of valid pixels the means were taken over.
    """

    agl: Mapping[str, float]
    mag: Mapping[str, float]
    pixels: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in MEAN_TERMS:
            for city, value in getattr(self, key).items():
                if city not in CITIES:
                    raise ConfigError(f"city mean of {key} for {city!r}: expected one of {', '.join(CITIES)}")
                if not isinstance(value, int | float) or not math.isfinite(value):
                    raise ConfigError(f"city mean of {key} for {city}={value!r}: expected a finite number")

    @classmethod
    def from_mapping(cls, means: Mapping[str, Mapping[str, float]]) -> CityMeans:
        """From ``{"ARG": {"agl": m, "mag": px}, ...}`` (a city may give either or both)."""
        return cls(
            agl={city: float(v["agl"]) for city, v in means.items() if "agl" in v},
            mag={city: float(v["mag"]) for city, v in means.items() if "mag" in v},
        )

    def as_params(self) -> dict[str, float]:
        """Flat ``{"r2_mean_agl_m_ARG": m, "r2_mean_mag_px_ARG": px, ...}`` for ``mlflow.log_params``."""
        params = {f"r2_mean_agl_m_{city}": round(value, 4) for city, value in self.agl.items()}
        params |= {f"r2_mean_mag_px_{city}": round(value, 4) for city, value in self.mag.items()}
        return params

    def vector(self, key: str) -> torch.Tensor:
        """float32 (len(CITIES),) means of ``agl`` or ``mag`` in CITIES order; NaN for a city without one."""
        means = getattr(self, key)
        return torch.tensor([means.get(city, math.nan) for city in CITIES], dtype=torch.float32)


def _valid_pixel_sums(
    agl: np.ndarray, scales: np.ndarray, rows: Iterable[int], power: int
) -> Iterator[tuple[int, int, float, float]]:
    """``(row, valid pixels, sum of height**power over them in float64, scale)`` per image with a valid pixel.

    Reads one image at a time, so a memory-mapped cache is never held whole.
    """
    for row in rows:
        image = np.asarray(agl[row])
        valid = np.isfinite(image)
        n = int(valid.sum())
        if n:
            total = float(np.add.reduce(np.power(image, power, dtype=np.float64), axis=None, where=valid))
            yield int(row), n, total, float(scales[row])


def city_means_from(
    agl: np.ndarray, scales: np.ndarray, cities: np.ndarray, rows: Sequence[int] | np.ndarray | None = None
) -> CityMeans:
    """Per-city mean height and magnitude over the valid pixels of the given images, streamed one by one.

    Reads one image at a time (the cache is memory-mapped; all N images are never held at once) and
    sums in float64. An image whose scale is not finite adds to the height mean only (its magnitude is
    no data, as in the batches). Cities without a valid pixel are left out.

    Args:
        agl: float32 (N, S, S) heights, m; NaN = no data (e.g. ``SampleCache.agl``).
        scales: (N,) px/m (``SampleCache.scale``).
        cities: (N,) city index into CITIES (``SampleCache.city_index``).
        rows: The images to use, e.g. a fold's training rows (None: all N).

    Returns:
        The means, and the pixel counts they were taken over.
    """
    count = np.zeros(len(CITIES), np.int64)
    agl_sum = np.zeros(len(CITIES), np.float64)
    mag_count = np.zeros(len(CITIES), np.int64)
    mag_sum = np.zeros(len(CITIES), np.float64)
    for row, n, total, scale in _valid_pixel_sums(agl, scales, range(len(agl)) if rows is None else rows, 1):
        city = int(cities[row])
        count[city] += n
        agl_sum[city] += total
        if math.isfinite(scale):
            mag_count[city] += n
            mag_sum[city] += total * scale
    present = [i for i in range(len(CITIES)) if count[i]]
    return CityMeans(
        agl={CITIES[i]: float(agl_sum[i] / count[i]) for i in present},
        mag={CITIES[i]: float(mag_sum[i] / mag_count[i]) for i in present if mag_count[i]},
        pixels={CITIES[i]: int(count[i]) for i in present},
    )


UNIT_SAMPLE_IMAGES = 256  # images read to set the output units (evenly spaced over the training rows)


def output_units_from(
    agl: np.ndarray, scales: np.ndarray, rows: Sequence[int] | np.ndarray | None = None
) -> tuple[float, float]:
    """``(height m, magnitude px)``: the root mean square of the valid training heights and magnitudes.

    The ``PixelHead`` units of a model trained on these rows. Read one image at a time from at most
    ``UNIT_SAMPLE_IMAGES`` images evenly spaced over ``rows``; a spread of 0 (all ground) or no valid
    pixel gives 1.

    Args:
        agl: float32 (N, S, S) heights, m; NaN = no data (e.g. ``SampleCache.agl``).
        scales: (N,) px/m.
        rows: The training rows (None: all N).
    """
    rows = np.arange(len(agl)) if rows is None else np.asarray(rows)
    step = max(1, math.ceil(len(rows) / UNIT_SAMPLE_IMAGES))
    squares, count, mag_squares, mag_count = 0.0, 0, 0.0, 0
    for _, n, total, scale in _valid_pixel_sums(agl, scales, rows[::step], 2):
        squares, count = squares + total, count + n
        if math.isfinite(scale):
            mag_squares, mag_count = mag_squares + total * scale**2, mag_count + n
    height = math.sqrt(squares / count) if count else 0.0
    magnitude = math.sqrt(mag_squares / mag_count) if mag_count else 0.0
    return (height if height > 0 else 1.0), (magnitude if magnitude > 0 else 1.0)


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


def masked_focal_mse(
    pred: torch.Tensor, target: torch.Tensor, beta: float = FOCAL_BETA, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """Mean over the finite entries of ``target`` of ``e² (2 sigmoid(beta |e|) - 1)^gamma``, e = pred - target.

    Squared error weighted down where the error is small (0 at e = 0, about 1 beyond ~10/beta), so the
    large errors, in the target's own units, dominate (0 when there are no finite entries).
    """
    valid, target0 = _valid(target.float())
    error = (pred.float() - target0).abs()
    per_pixel = error**2 * (2 * torch.sigmoid(beta * error) - 1) ** gamma
    return torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum() / valid.sum().clamp_min(1)


def _per_city(per_image: torch.Tensor, city: torch.Tensor) -> torch.Tensor:
    """Sum a (B,) per-image quantity into (len(CITIES),) per city."""
    return torch.zeros(len(CITIES), dtype=per_image.dtype, device=per_image.device).index_add(0, city, per_image)


def per_city_r2_loss(
    pred: torch.Tensor, target: torch.Tensor, city: torch.Tensor, city_mean: torch.Tensor
) -> torch.Tensor:
    """Mean over the cities in the batch of ``SSE / (sum((y - city mean)^2) + 1e-4)``, y the valid pixels.

    With ``city_mean`` the city's mean over the training set this is 1 - R² of the batch's pixels
    measured as the competition pools them. A city of the batch whose mean is NaN (not in the training
    means) falls back to the mean of that city's valid pixels in this batch.

    Args:
        pred: Prediction (B, H, W).
        target: Truth (B, H, W), NaN = no data.
        city: City index (B,) into CITIES.
        city_mean: (len(CITIES),) mean of the target per city, in the target's units; NaN = unknown.

    Returns:
        Scalar loss; 0 when no city has a valid pixel.
    """
    valid, target0 = _valid(target.float())
    pred, city = pred.float(), city.long()
    dims = tuple(range(1, target.dim()))
    zeros = torch.zeros_like(target0)
    count = _per_city(valid.sum(dims).float(), city)
    batch_mean = _per_city(target0.sum(dims), city) / count.clamp_min(1)
    city_mean = city_mean.to(device=pred.device, dtype=torch.float32)
    mean = torch.where(torch.isfinite(city_mean), city_mean, batch_mean)
    pixel_mean = mean[city].view(-1, *([1] * len(dims)))
    sst = _per_city(torch.where(valid, (target0 - pixel_mean) ** 2, zeros).sum(dims), city)
    sse = _per_city(torch.where(valid, (pred - target0) ** 2, zeros).sum(dims), city)
    present = (count > 0).float()
    return (sse / (sst + R2_EPS) * present).sum() / present.sum().clamp_min(1)


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
        weights: Weight per term (keys ``agl``, ``mag``, ``angle``, ``scale``; ``r2`` also ``agl_focal``,
            ``mag_focal``).
        city_means: The training set's city means, used by ``r2`` (None: every city falls back to its
            batch mean).
    """

    def __init__(self, name: str, weights: Mapping[str, float], city_means: CityMeans | None = None) -> None:
        self.name = name
        self.weights = dict(weights)
        self.city_means = city_means
        means = city_means or CityMeans(agl={}, mag={})
        self._mean_vectors = {key: means.vector(key) for key in MEAN_TERMS}
        self._terms: dict[str, Callable[[Tensors, Tensors], torch.Tensor]] = {
            "mse": self._mse_terms,
            "r2": self._r2_terms,
            "huber_cos": self._huber_cos_terms,
        }

    def __call__(self, outputs: Tensors, batch: Tensors) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (weighted total for backward, unweighted terms as floats)."""
        terms = self._terms[self.name](outputs, batch)
        total = sum(self.weights[key] * terms[key] for key in terms)
        # One device-to-host copy for all the logged values.
        values = torch.stack([terms[key].detach() for key in terms]).tolist()
        return total, dict(zip(terms, values, strict=True))

    def __repr__(self) -> str:
        means = "" if self.city_means is None else f", city_means={self.city_means.as_params()}"
        return f"GeoposeLoss({self.name!r}, weights={self.weights}{means})"

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
        if self._mean_vectors["agl"].device != city.device:  # moved once, not copied every step
            self._mean_vectors = {key: value.to(city.device) for key, value in self._mean_vectors.items()}
        means = self._mean_vectors
        agl, mag = batch[AGL].to(city.device), batch[MAG].to(city.device)
        return {
            "agl": per_city_r2_loss(outputs[AGL], agl, city, means["agl"]),
            "mag": per_city_r2_loss(outputs[MAG], mag, city, means["mag"]),
            "angle": angle,
            "scale": scale,
            "agl_focal": masked_focal_mse(outputs[AGL], agl),
            "mag_focal": masked_focal_mse(outputs[MAG], mag),
        }

    def _huber_cos_terms(self, outputs: Tensors, batch: Tensors) -> dict[str, torch.Tensor]:
        angle_mse, scale = self._direction_scale(outputs, batch)
        return {
            "agl": masked_huber(outputs[AGL], batch[AGL], HUBER_DELTA_AGL),
            "mag": masked_huber(outputs[MAG], batch[MAG], HUBER_DELTA_MAG),
            "angle": cosine_loss(outputs[XYDIR], batch[XYDIR]) + angle_mse,
            "scale": scale,
        }


def build_loss(
    name: str = "mse",
    weights: Mapping[str, float] | None = None,
    city_means: CityMeans | Mapping[str, Mapping[str, float]] | None = None,
) -> GeoposeLoss:
    """Build a loss by name, with the per-term weights of its source unless overridden.

    Args:
        name: ``mse`` (baseline, default), ``r2`` (per-city R², 1st place) or ``huber_cos`` (2nd place).
        weights: Overrides for some of the loss's terms: ``agl``, ``mag``, ``angle``, ``scale`` (``r2`` also
            ``agl_focal``, ``mag_focal``), non-negative.
        city_means: Required by ``r2``, ignored by the others: the training images' mean height (m) and
            magnitude (px) per city, a ``CityMeans`` (``city_means_from``) or ``{"ARG": {"agl": m,
            "mag": px}, ...}``. A batch's city missing from it falls back to its batch mean.

    Raises:
        ConfigError: Unknown loss name or weight key, a negative or non-finite weight, ``r2`` without
            city means, or a city mean for an unknown city or not finite.
    """
    if name not in DEFAULT_WEIGHTS:
        raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(DEFAULT_WEIGHTS)}")
    merged = dict(DEFAULT_WEIGHTS[name])
    for key, value in (weights or {}).items():
        if key not in merged:
            raise ConfigError(f"unknown loss weight {key!r} for loss {name!r}; valid: {', '.join(merged)}")
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"loss weight {key}={value!r}: expected a finite number >= 0")
        merged[key] = float(value)
    if name != "r2":
        return GeoposeLoss(name, merged)
    if city_means is None:
        raise ConfigError(
            "loss 'r2' needs the training images' mean height and magnitude per city: "
            "pass city_means=city_means_from(cache.agl, cache.scale, cache.city_index, rows=train_rows)"
        )
    if not isinstance(city_means, CityMeans):
        city_means = CityMeans.from_mapping(city_means)
    return GeoposeLoss(name, merged, city_means)
