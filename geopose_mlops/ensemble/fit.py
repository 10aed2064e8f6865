"""Fit ensemble weights, city height factors and a scale model on out-of-fold statistics.

Everything maximises the competition score itself (``stats.ensemble_score``), not a pooled MSE:

- ``simplex``: height, scale and angle weights, each non-negative and summing to 1, by SLSQP, in two
  rounds of coordinate ascent (heights given scale and angle, then scale, then angle);
- ``caruana``: greedy forward selection with replacement (Caruana et al. 2004, as AutoGluon does), the
  same weights for every target;
- ``equal``: 1/K each.

Then per-city height factors (closed form: the score is a ratio of quadratics in one factor) are kept
only for cities where they improve the score under a nested fold check (each image scored with factors
fitted on the other folds), and an XGBoost model of scale from gsd, city and the ensemble's scale is kept
only if its nested out-of-fold predictions improve the score. OOF weights are fitted on single-fold
predictions, while at test time each member is the mean of its fold models (usually a little better).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from geopose_mlops.constants import CITIES, R2_EPS
from geopose_mlops.ensemble.stats import OofStatistics, circular_mean, ensemble_score
from geopose_mlops.errors import ConfigError

METHODS = ("simplex", "caruana", "equal")
SCALE_MODEL_FILE = "scale_model.json"


@dataclass
class EnsembleSpec:
    """What ``ensemble.json`` holds: enough, with the members' checkpoints, to predict.

    Attributes:
        members: Member cv run ids.
        method: ``simplex``, ``caruana`` or ``equal``.
        height_weights, scale_weights, angle_weights: Per member, each summing to 1.
        city_height_factors: Height multiplier per city (only cities where it helped).
        scale_model: File name of the XGBoost scale model beside ensemble.json, or None.
        oof_score: Out-of-fold score of the whole ensemble.
        oof_city_scores: Its score per city.
        equal_weights_oof_score: The score of equal weights, for comparison.
        member_oof_scores: Each member's own out-of-fold score.
        member_folds: Per member, ``{fold: fold run id}`` (filled in by the caller).
        image_size: Training side of the members, px (filled in by the caller).
    """

    members: list[str]
    method: str
    height_weights: list[float]
    scale_weights: list[float]
    angle_weights: list[float]
    city_height_factors: dict[str, float] = field(default_factory=dict)
    scale_model: str | None = None
    oof_score: float = float("nan")
    oof_city_scores: dict[str, float] = field(default_factory=dict)
    equal_weights_oof_score: float = float("nan")
    member_oof_scores: dict[str, float] = field(default_factory=dict)
    member_folds: dict[str, dict[str, str]] = field(default_factory=dict)
    image_size: int = 0

    @property
    def best_member_oof_score(self) -> float:
        """The best single member's out-of-fold score."""
        return max(self.member_oof_scores.values())

    def save(self, path: str | Path) -> None:
        """Write ``ensemble.json``."""
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> EnsembleSpec:
        """Read ``ensemble.json``."""
        return cls(**json.loads(Path(path).read_text()))


def _score(stats: OofStatistics, w: np.ndarray, v: np.ndarray, u: np.ndarray, **factors: object) -> float:
    return ensemble_score(stats, w, stats.scale_pred @ v, circular_mean(stats.angle_pred, u), **factors)["final_score"]


def _simplex_argmax(objective, start: np.ndarray) -> np.ndarray:
    """Maximise ``objective(w)`` over the probability simplex (SLSQP), never returning worse than start."""
    result = minimize(
        lambda w: -objective(w),
        start,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * len(start),
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        options={"maxiter": 200, "ftol": 1e-12},
    )
    w = np.clip(result.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    return w if objective(w) >= objective(start) else start


def fit_simplex_weights(stats: OofStatistics, rounds: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Height, scale and angle weights on the simplex that maximise the OOF score (coordinate ascent)."""
    k = len(stats.members)
    # Start from the better of equal weights and the best single member, so the fit never loses to either.
    starts = [np.full(k, 1.0 / k), *np.eye(k)]
    w = v = u = max(starts, key=lambda x: _score(stats, x, x, x))
    for _ in range(rounds):
        w = _simplex_argmax(lambda x, v=v, u=u: _score(stats, x, v, u), w)
        v = _simplex_argmax(lambda x, w=w, u=u: _score(stats, w, x, u), v)
        u = _simplex_argmax(lambda x, w=w, v=v: _score(stats, w, v, x), u)
    return w, v, u


def fit_caruana_weights(stats: OofStatistics, rounds: int = 20) -> np.ndarray:
    """Greedy forward selection with replacement: each round adds the member that most raises the score.

    Returns:
        (K,) weights = how often each member was picked / rounds (used for every target).
    """
    k = len(stats.members)
    counts = np.zeros(k)
    for _ in range(rounds):
        trial_scores = []
        for m in range(k):
            trial = counts.copy()
            trial[m] += 1
            w = trial / trial.sum()
            trial_scores.append(_score(stats, w, w, w))
        counts[int(np.argmax(trial_scores))] += 1
    return counts / counts.sum()


def fit_city_factors(stats: OofStatistics, w: np.ndarray, scale: np.ndarray, angle: np.ndarray) -> dict[str, float]:
    """Per-city height factor maximising the city's score, in closed form.

    For a city, both SSEs are ``f^2 A - 2 f B + C`` in the factor f, so the score
    ``1 - (SSE_agl / SST_agl + SSE_flow / SST_flow) / 2`` peaks at
    ``f = (B / SST_agl + B' / SST_flow) / (A / SST_agl + A' / SST_flow)``.
    """
    quad = np.einsum("k,nkl,l->n", w, stats.gram, w)
    lin = stats.cross @ w
    st, at = stats.scale_true, stats.angle_true
    factors = {}
    for city in CITIES:
        mask = stats.cities == city
        n = stats.n[mask].sum()
        if not mask.any() or n == 0:
            continue
        sst_agl = stats.sum_y2[mask].sum() - stats.sum_y[mask].sum() ** 2 / n + R2_EPS
        flow_sum = (stats.sum_y * st * (np.sin(at) + np.cos(at)))[mask].sum()
        sst_flow = (stats.sum_y2 * st**2)[mask].sum() - flow_sum**2 / (2 * n) + R2_EPS
        a, b = quad[mask].sum(), lin[mask].sum()
        a_flow = (scale**2 * quad)[mask].sum()
        b_flow = (scale * st * np.cos(angle - at) * lin)[mask].sum()
        denominator = a / sst_agl + a_flow / sst_flow
        if denominator > 0:
            factors[city] = float((b / sst_agl + b_flow / sst_flow) / denominator)
    return factors


def nested_city_factors(
    stats: OofStatistics, w: np.ndarray, scale: np.ndarray, angle: np.ndarray
) -> tuple[dict[str, float], np.ndarray]:
    """Each image's city factor fitted without its own fold, and per city the score change it brings.

    Returns:
        (``{city: nested score - plain score}`` (> 0: the factor helps), (N,) per-image factors).
    """
    image_factors = np.ones(len(stats))
    folds = np.unique(stats.folds)
    if len(folds) < 2:
        return {}, image_factors
    for fold in folds:
        held_out = stats.folds == fold
        rest = ~held_out
        fitted = fit_city_factors(stats.subset(rest), w, scale[rest], angle[rest])
        image_factors[held_out] = [fitted.get(c, 1.0) for c in stats.cities[held_out]]
    plain = ensemble_score(stats, w, scale, angle)["cities"]
    nested = ensemble_score(stats, w, scale, angle, image_factors=image_factors)["cities"]
    return {city: nested[city]["score"] - plain[city]["score"] for city in plain}, image_factors


def _scale_features(stats: OofStatistics, ensemble_scale: np.ndarray) -> np.ndarray:
    one_hot = np.array([[c == city for city in CITIES] for c in stats.cities], dtype=np.float64)
    return np.column_stack([stats.gsd, ensemble_scale, one_hot])


def scale_model_features(gsd: np.ndarray, ensemble_scale: np.ndarray, cities: list[str]) -> np.ndarray:
    """Features of the scale model at prediction time: gsd (m/px), ensemble scale (px/m), city one-hot."""
    one_hot = np.array([[c == city for city in CITIES] for c in cities], dtype=np.float64)
    return np.column_stack([np.asarray(gsd, np.float64), np.asarray(ensemble_scale, np.float64), one_hot])


def _xgb(seed: int = 0):
    from xgboost import XGBRegressor

    return XGBRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.9, random_state=seed)


def nested_scale_model_predictions(stats: OofStatistics, ensemble_scale: np.ndarray) -> np.ndarray | None:
    """Scale per image from XGBoost models fitted on the other folds (None with fewer than 2 folds)."""
    folds = np.unique(stats.folds)
    if len(folds) < 2:
        return None
    features = _scale_features(stats, ensemble_scale)
    predicted = np.empty(len(stats))
    for fold in folds:
        held_out = stats.folds == fold
        model = _xgb().fit(features[~held_out], stats.scale_true[~held_out])
        predicted[held_out] = model.predict(features[held_out])
    return np.clip(predicted, 0.0, None)


def fit_ensemble(
    stats: OofStatistics, method: str = "simplex", scale_model_dir: str | Path | None = None
) -> EnsembleSpec:
    """Fit the whole ensemble on OOF statistics and score every choice honestly.

    Args:
        stats: The members' statistics.
        method: ``simplex``, ``caruana`` or ``equal``.
        scale_model_dir: Where to save the XGBoost scale model if it is kept (None: never fit one).

    Raises:
        ConfigError: Unknown method.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")
    k = len(stats.members)
    equal = np.full(k, 1.0 / k)
    member_scores = {}
    for m, name in enumerate(stats.members):
        one = np.eye(k)[m]
        member_scores[name] = _score(stats, one, one, one)
    if method == "simplex":
        w, v, u = fit_simplex_weights(stats)
    elif method == "caruana":
        w = v = u = fit_caruana_weights(stats)
    else:
        w = v = u = equal
    scale, angle = stats.scale_pred @ v, circular_mean(stats.angle_pred, u)
    gains, nested_factors = nested_city_factors(stats, w, scale, angle)
    all_factors = fit_city_factors(stats, w, scale, angle)
    factors = {city: all_factors[city] for city, gain in gains.items() if gain > 0 and city in all_factors}
    # The honest per-image factors: fitted without the image's fold, for the cities that keep one.
    honest = np.where([c in factors for c in stats.cities], nested_factors, 1.0)
    scale_model, honest_scale = None, scale
    if scale_model_dir is not None:
        nested = nested_scale_model_predictions(stats, scale)
        if nested is not None:
            with_model = ensemble_score(stats, w, nested, angle, image_factors=honest)["final_score"]
            without = ensemble_score(stats, w, scale, angle, image_factors=honest)["final_score"]
            if with_model > without:
                model = _xgb().fit(_scale_features(stats, scale), stats.scale_true)
                model.save_model(str(Path(scale_model_dir) / SCALE_MODEL_FILE))
                scale_model, honest_scale = SCALE_MODEL_FILE, nested
    # Factors and scale model enter the reported score only as fitted without each image's own fold.
    final = ensemble_score(stats, w, honest_scale, angle, image_factors=honest)
    return EnsembleSpec(
        members=list(stats.members),
        method=method,
        height_weights=w.tolist(),
        scale_weights=v.tolist(),
        angle_weights=u.tolist(),
        city_height_factors=factors,
        scale_model=scale_model,
        oof_score=final["final_score"],
        oof_city_scores={c: v["score"] for c, v in final["cities"].items()},
        equal_weights_oof_score=_score(stats, equal, equal, equal),
        member_oof_scores=member_scores,
    )
