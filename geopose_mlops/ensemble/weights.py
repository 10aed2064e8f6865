"""Weights on the simplex: SLSQP or Caruana's greedy selection on any score, and the scale/angle scores.

Height weights are fitted on the exact competition score (``stats.ensemble_score``). Scale and angle
weights must be fixed before the pixels are read (see ``stats``), so they are fitted on the per-image
table with the score the ensemble would have if its heights were the truth:

- scale: the VFLOW R² with true heights and angles, ``1 - sum_i (s_i - s_t,i)^2 sum y_i^2 / SST_flow``
  per city, averaged over cities (a height-energy-weighted squared scale error);
- angle: the VFLOW R² with true heights and scales, ``1 - sum_i 2 s_t,i^2 sum y_i^2 (1 - cos(a_i - a_t,i))
  / SST_flow`` per city, averaged over cities.

Both are the VFLOW score's own weighting of each image, exact when the heights are right; with imperfect
heights the VFLOW error also has cross terms between height and scale errors, which this ignores.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize

from geopose_mlops.constants import CITIES, R2_EPS
from geopose_mlops.ensemble.stats import ImageTable, circular_mean
from geopose_mlops.errors import ConfigError

METHODS = ("simplex", "caruana", "equal")
CARUANA_ROUNDS = 20


def simplex_argmax(objective: Callable[[np.ndarray], float], start: np.ndarray) -> np.ndarray:
    """Maximise ``objective(w)`` over the probability simplex by SLSQP, never returning worse than ``start``."""
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


def caruana_weights(objective: Callable[[np.ndarray], float], k: int, rounds: int = CARUANA_ROUNDS) -> np.ndarray:
    """Greedy forward selection with replacement (Caruana et al. 2004, as AutoGluon's ensemble selection).

    Each round adds the member that most raises ``objective`` of the selection's mean.

    Returns:
        (K,) how often each member was picked / rounds.
    """
    counts = np.zeros(k)
    for _ in range(rounds):
        trials = [objective((counts + np.eye(k)[m]) / (counts.sum() + 1)) for m in range(k)]
        counts[int(np.argmax(trials))] += 1
    return counts / counts.sum()


def fit_weights(objective: Callable[[np.ndarray], float], k: int, method: str) -> np.ndarray:
    """(K,) simplex weights maximising ``objective`` by ``method`` (simplex, caruana or equal).

    ``simplex`` starts SLSQP from the better of equal weights and the best single member, so it never
    returns worse than either.

    Raises:
        ConfigError: Unknown method.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")
    if method == "equal" or k == 1:
        return np.full(k, 1.0 / k)
    if method == "caruana":
        return caruana_weights(objective, k)
    start = max([np.full(k, 1.0 / k), *np.eye(k)], key=objective)
    return simplex_argmax(objective, start)


def _city_average(table: ImageTable, per_image_error: np.ndarray) -> float:
    """Mean over cities of ``1 - sum(per-image error) / (SST_flow + 1e-4)``."""
    scores = []
    for city in CITIES:
        mask = table.cities == city
        if table.truth_n[mask].sum() > 0:
            scores.append(1 - per_image_error[mask].sum() / (table.flow_sst(mask) + R2_EPS))
    return float(np.mean(scores))


def scale_score(table: ImageTable, scale: np.ndarray) -> float:
    """VFLOW R² (mean over cities) with true heights and angles and this scale (N,) px/m."""
    return _city_average(table, (np.asarray(scale) - table.scale_true) ** 2 * table.truth_sq)


def angle_score(table: ImageTable, angle: np.ndarray) -> float:
    """VFLOW R² (mean over cities) with true heights and scales and this angle (N,) rad."""
    miss = 1 - np.cos(np.asarray(angle) - table.angle_true)
    return _city_average(table, 2 * table.scale_true**2 * table.truth_sq * miss)


def fit_scale_weights(table: ImageTable, method: str) -> np.ndarray:
    """(K,) weights of the members' scales maximising ``scale_score``."""
    return fit_weights(lambda v: scale_score(table, np.clip(table.scale_pred @ v, 0, None)), len(table.members), method)


def fit_angle_weights(table: ImageTable, method: str) -> np.ndarray:
    """(K,) weights of the members' angles (weighted circular mean) maximising ``angle_score``."""
    return fit_weights(lambda u: angle_score(table, circular_mean(table.angle_pred, u)), len(table.members), method)
