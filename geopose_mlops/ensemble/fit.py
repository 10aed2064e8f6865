"""Fit an ensemble on out-of-fold statistics: weights, city height factors, a scale model; honest scores.

Order of the fit (``fit_ensemble``):

1. per method (simplex, caruana, equal), scale and angle weights on the per-image table
   (``weights.fit_scale_weights``/``fit_angle_weights``: the VFLOW score with true heights; an
   approximation, since the flow score is not separable in them, see ``stats``); each member alone
   is a variant too;
2. per candidate variant of the chosen method (``candidate_variants``), an XGBoost model of the log
   ratio true / ensemble scale from gsd, city and that variant's scale, predicted for each image by a
   model fitted on the other folds;
3. one streamed pass over the pixels (``stats.accumulate_statistics``) for every scale/angle variant;
4. per method and candidate variant, height weights maximising the exact competition score (SLSQP on
   the simplex, Caruana's greedy selection with replacement, or equal); the variant with the best
   exact score is kept, so simplex never scores below equal weights or the best single member;
5. per-city height factors (closed form), kept for a city only where factors fitted on the other folds
   raise that city's score on the held-out fold and the factor lies in ``CITY_FACTOR_RANGE``; then the
   scale model, kept only if its nested predictions raise the score. Either can be switched off
   (``city_factors=False``, ``scale_model_dir=None``: ``ensemble fit --no-city-factors/--no-scale-model``).

The reported ``oof_score`` uses the in-sample height weights (K - 1 free numbers over every pixel) and
the factors and scale model as fitted without each image's own fold. OOF weights are fitted on
single-fold predictions, while at test time each member is the mean of its fold models.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from geopose_mlops.constants import CITIES, R2_EPS
from geopose_mlops.ensemble.stats import (
    ImageTable,
    MemberOof,
    PixelStatistics,
    accumulate_statistics,
    circular_mean,
    ensemble_score,
    read_image_table,
)
from geopose_mlops.ensemble.weights import METHODS, fit_angle_weights, fit_scale_weights, fit_weights
from geopose_mlops.errors import ConfigError

SCALE_MODEL_FILE = "scale_model.json"
SCALE_MODEL_VARIANT = "scale_model"
CITY_FACTOR_RANGE = (0.5, 2.0)  # a height factor outside this is refused: the members, not the city, are off


@dataclass
class EnsembleSpec:
    """What ``ensemble.json`` holds: enough, with the members' checkpoints, to predict.

    Attributes:
        members: Member cv run ids.
        method: ``simplex``, ``caruana`` or ``equal``.
        height_weights, scale_weights, angle_weights: Per member, each summing to 1.
        scale_angle_weights_from: Which fit gave the scale and angle weights: the method's own proxy fit,
            ``equal``, or ``member:<run id>`` (``candidate_variants``).
        city_height_factors: Height multiplier per city (only cities where it helped).
        scale_model: File name of the XGBoost scale model beside ensemble.json, or None.
        oof_score: Out-of-fold score of the whole ensemble.
        oof_city_scores: Its score per city.
        equal_weights_oof_score: The score of equal weights, for comparison.
        member_oof_scores: Each member's own out-of-fold score.
        method_oof_scores: Each method's weights alone (no factors, no scale model), in-sample.
        member_folds: Per member, ``{fold: fold run id}`` (filled in by the caller).
        image_size: Training side of the members, px (filled in by the caller).
    """

    members: list[str]
    method: str
    height_weights: list[float]
    scale_weights: list[float]
    angle_weights: list[float]
    scale_angle_weights_from: str = ""
    city_height_factors: dict[str, float] = field(default_factory=dict)
    scale_model: str | None = None
    oof_score: float = float("nan")
    oof_city_scores: dict[str, float] = field(default_factory=dict)
    equal_weights_oof_score: float = float("nan")
    member_oof_scores: dict[str, float] = field(default_factory=dict)
    method_oof_scores: dict[str, float] = field(default_factory=dict)
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
        """Read ``ensemble.json``.

        Raises:
            ConfigError: The file is not an ensemble spec (unknown or missing keys are named).
        """
        data = json.loads(Path(path).read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{path}: unknown ensemble.json keys {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"{path}: not a complete ensemble.json ({err})") from err


def fit_city_factors(
    stats: PixelStatistics, variant: str, w: np.ndarray, groups: np.ndarray | None = None
) -> dict[str, float]:
    """Per-city height factor maximising the city's score over ``groups``, in closed form.

    For a city, both SSEs are ``f^2 A - 2 f B + C`` in the factor f and the totals do not depend on f, so
    ``1 - (SSE_agl / SST_agl + SSE_flow / SST_flow) / 2`` peaks at
    ``f = (B / SST_agl + B' / SST_flow) / (A / SST_agl + A' / SST_flow)``.
    """
    j = stats.variants.index(variant)
    chosen = np.ones(len(stats.groups), bool) if groups is None else np.asarray(groups, bool)
    cities = stats.group_cities
    factors = {}
    for city in CITIES:
        mask = chosen & (cities == city)
        n = stats.n[mask].sum()
        if n == 0:
            continue
        sst_agl = stats.sum_y2[mask].sum() - stats.sum_y[mask].sum() ** 2 / n + R2_EPS
        sst_flow = stats.flow_sq[mask].sum() - stats.flow_sum[mask].sum() ** 2 / (2 * n) + R2_EPS
        a = np.einsum("k,gkl,l->", w, stats.gram[mask], w)
        a_flow = np.einsum("k,gkl,l->", w, stats.flow_gram[j][mask], w)
        b, b_flow = (stats.cross[mask] @ w).sum(), (stats.flow_cross[j][mask] @ w).sum()
        denominator = a / sst_agl + a_flow / sst_flow
        if denominator > 0:
            factors[city] = float((b / sst_agl + b_flow / sst_flow) / denominator)
    return factors


def nested_city_factors(stats: PixelStatistics, variant: str, w: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Each group's city factor fitted on the other folds, and per city the score change it brings.

    Returns:
        ``({city: nested score - score without factors}, (G,) factors)``; ``({}, ones)`` with one fold.
    """
    folds = stats.group_folds
    factors = np.ones(len(stats.groups))
    if len(np.unique(folds)) < 2:
        return {}, factors
    cities = stats.group_cities
    for fold in np.unique(folds):
        fitted = fit_city_factors(stats, variant, w, groups=folds != fold)
        held_out = folds == fold
        factors[held_out] = [fitted.get(c, 1.0) for c in cities[held_out]]
    plain = ensemble_score(stats, variant, w)["cities"]
    nested = ensemble_score(stats, variant, w, factors)["cities"]
    return {city: nested[city]["score"] - plain[city]["score"] for city in plain}, factors


def ensemble_scale(scales: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted members' scales (N, K) @ (K,), clipped at 0 px/m as at prediction time."""
    return np.clip(np.asarray(scales, np.float64) @ np.asarray(weights, np.float64), 0, None)


def scale_model_features(gsd: np.ndarray, ensemble_scale: np.ndarray, cities: Sequence[str]) -> np.ndarray:
    """Features of the scale model: gsd (m/px, NaN allowed), ensemble scale (px/m), city one-hot."""
    one_hot = np.array([[c == city for city in CITIES] for c in cities], dtype=np.float64).reshape(-1, len(CITIES))
    return np.column_stack([np.asarray(gsd, np.float64), np.asarray(ensemble_scale, np.float64), one_hot])


def _xgb(seed: int = 0):
    from xgboost import XGBRegressor

    return XGBRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.9, random_state=seed, n_jobs=1)


def fit_scale_model(gsd: np.ndarray, ensemble_scale: np.ndarray, cities: Sequence[str], scale_true: np.ndarray):
    """An XGBoost model of the log ratio true / ensemble scale from ``scale_model_features``.

    A multiplicative correction learns a per-city or gsd-dependent bias from few images, and predicts
    about no change where there is none.
    """
    features = scale_model_features(gsd, ensemble_scale, cities)
    ratio = np.log(np.asarray(scale_true, np.float64) / np.clip(ensemble_scale, 1e-6, None))
    return _xgb().fit(features, ratio)


def apply_scale_model(model, gsd: np.ndarray, ensemble_scale: np.ndarray, cities: Sequence[str]) -> np.ndarray:
    """The scale model's corrected scale, px/m: ``ensemble_scale * exp(model(features))``."""
    correction = model.predict(scale_model_features(gsd, ensemble_scale, cities))
    return np.asarray(ensemble_scale, np.float64) * np.exp(correction.astype(np.float64))


def nested_scale_model_predictions(table: ImageTable, ensemble_scale: np.ndarray) -> np.ndarray | None:
    """Scale per image (px/m) from scale models fitted on the other folds (None with one fold)."""
    folds = np.unique(table.folds)
    if len(folds) < 2:
        return None
    cities = np.asarray(table.cities)
    predicted = np.empty(len(table))
    for fold in folds:
        train, held_out = table.folds != fold, table.folds == fold
        model = fit_scale_model(table.gsd[train], ensemble_scale[train], list(cities[train]), table.scale_true[train])
        predicted[held_out] = apply_scale_model(
            model, table.gsd[held_out], ensemble_scale[held_out], list(cities[held_out])
        )
    return predicted


def _height_objective(stats: PixelStatistics, variant: str):
    return lambda w: ensemble_score(stats, variant, w)["final_score"]


def _scale_model_variant(variant: str) -> str:
    return f"{SCALE_MODEL_VARIANT}:{variant}"


def candidate_variants(method: str, members: Sequence[str]) -> list[str]:
    """The scale/angle variants a method may pair its height weights with.

    Scale and angle weights are fitted on a proxy (true heights, see ``weights``); with poor heights the
    proxy's choice can score below equal weights or a single member. So simplex and Caruana also try
    equal scale/angle weights and each member's own, and keep the variant whose exact score is best.
    """
    if method == "equal":
        return ["equal"]
    return [method, "equal", *(f"member:{m}" for m in members)]


def _scale_angle_variants(table: ImageTable) -> tuple[dict, dict]:
    """(scale, angle) weights of every variant (each method's proxy fit, each member alone) and their values."""
    k = len(table.members)
    weights = {name: (fit_scale_weights(table, name), fit_angle_weights(table, name)) for name in METHODS}
    weights |= {f"member:{m}": (np.eye(k)[i], np.eye(k)[i]) for i, m in enumerate(table.members)}
    variants = {
        name: (ensemble_scale(table.scale_pred, v), circular_mean(table.angle_pred, u))
        for name, (v, u) in weights.items()
    }
    return weights, variants


def _fit_height_weights(stats: PixelStatistics, members: Sequence[str]) -> tuple[dict, dict, dict]:
    """Per method, the best (variant, height weights) on the exact score, and each method's score."""
    k = len(members)
    heights, chosen = {}, {}
    for name in METHODS:
        fits = {v: fit_weights(_height_objective(stats, v), k, name) for v in candidate_variants(name, members)}
        chosen[name] = max(fits, key=lambda v: ensemble_score(stats, v, fits[v])["final_score"])
        heights[name] = fits[chosen[name]]
    scores = {name: ensemble_score(stats, chosen[name], heights[name])["final_score"] for name in METHODS}
    return heights, chosen, scores


def kept_city_factors(stats: PixelStatistics, variant: str, w: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """The city height factors that pass the nested fold check and the sane range, and honest group factors.

    A city keeps its factor (fitted on every fold) only where factors fitted on the other folds raise
    its held-out score, and only inside ``CITY_FACTOR_RANGE``: a factor outside it (a member that barely
    learned heights, e.g. after one epoch, can ask for x10) is refused with a warning naming the city.

    Returns:
        (``{city: factor}`` kept, (G,) per-group factors fitted without the group's fold, 1 elsewhere).
    """
    gains, nested = nested_city_factors(stats, variant, w)
    fitted = fit_city_factors(stats, variant, w)
    low, high = CITY_FACTOR_RANGE
    factors = {}
    for city in sorted(city for city, gain in gains.items() if gain > 0 and city in fitted):
        if low <= fitted[city] <= high:
            factors[city] = fitted[city]
        else:
            warnings.warn(
                f"city height factor of {city} refused: x{fitted[city]:.3g} is outside [{low}, {high}] "
                "(the members' heights are far off there; train longer rather than rescale)",
                stacklevel=3,
            )
    honest = np.where([c in factors for c in stats.group_cities], nested, 1.0)
    return factors, honest


def _kept_scale_model(
    table: ImageTable,
    stats: PixelStatistics,
    variants: dict,
    variant: str,
    w: np.ndarray,
    honest: np.ndarray | None,
    scale_model_dir: str | Path | None,
) -> tuple[str, str | None]:
    """The variant to score and the scale model's file: kept (and saved) only if its nested predictions help."""
    if _scale_model_variant(variant) not in stats.variants:
        return variant, None
    with_model = ensemble_score(stats, _scale_model_variant(variant), w, honest)["final_score"]
    if with_model <= ensemble_score(stats, variant, w, honest)["final_score"]:
        return variant, None
    model = fit_scale_model(table.gsd, variants[variant][0], list(table.cities), table.scale_true)
    model.save_model(str(Path(scale_model_dir) / SCALE_MODEL_FILE))
    return _scale_model_variant(variant), SCALE_MODEL_FILE


def fit_ensemble(
    table: ImageTable,
    method: str = "simplex",
    scale_model_dir: str | Path | None = None,
    *,
    city_factors: bool = True,
) -> tuple[EnsembleSpec, PixelStatistics]:
    """Fit the whole ensemble on the members' OOF files and score every choice honestly.

    Args:
        table: The aligned members (``stats.read_image_table``).
        method: ``simplex``, ``caruana`` or ``equal`` height, scale and angle weights; the other two are
            fitted too, for comparison. Every method also fits city factors and a scale model unless
            they are switched off.
        scale_model_dir: Where to save the XGBoost scale model if it is kept (None: never fit one).
        city_factors: Fit per-city height factors (kept where the nested check and the range allow).

    Returns:
        (the spec, the pixel statistics it was fitted on).

    Raises:
        ConfigError: Unknown method.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")
    k = len(table.members)
    weights, variants = _scale_angle_variants(table)
    if scale_model_dir is not None:
        for name in candidate_variants(method, table.members):
            nested_scale = nested_scale_model_predictions(table, variants[name][0])
            if nested_scale is not None:
                variants[_scale_model_variant(name)] = (nested_scale, variants[name][1])
    stats = accumulate_statistics(table, variants)
    heights, chosen, method_scores = _fit_height_weights(stats, table.members)
    member_scores = {
        m: ensemble_score(stats, f"member:{m}", np.eye(k)[i])["final_score"] for i, m in enumerate(table.members)
    }
    w, variant = heights[method], chosen[method]
    factors, honest = kept_city_factors(stats, variant, w) if city_factors else ({}, None)
    scored_variant, scale_model = _kept_scale_model(table, stats, variants, variant, w, honest, scale_model_dir)
    final = ensemble_score(stats, scored_variant, w, honest)
    v, u = weights[variant]
    spec = EnsembleSpec(
        members=list(table.members),
        method=method,
        height_weights=w.tolist(),
        scale_weights=v.tolist(),
        angle_weights=u.tolist(),
        scale_angle_weights_from=variant,
        city_height_factors=factors,
        scale_model=scale_model,
        oof_score=final["final_score"],
        oof_city_scores={c: s["score"] for c, s in final["cities"].items()},
        equal_weights_oof_score=method_scores["equal"],
        member_oof_scores=member_scores,
        method_oof_scores=method_scores,
    )
    return spec, stats


def fit_from_oof_folders(
    folders: Sequence[str | Path], method: str = "simplex", scale_model_dir: str | Path | None = None
) -> EnsembleSpec:
    """Fit an ensemble of one ``oof/`` folder per member (members named ``member0``, ``member1``, ...).

    Each folder is taken as one fold, so no nested check can keep city factors or a scale model.
    """
    members = [MemberOof(f"member{i}", {0: Path(folder)}) for i, folder in enumerate(folders)]
    return fit_ensemble(read_image_table(members), method, scale_model_dir)[0]
