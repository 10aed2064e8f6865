"""Ensemble fitting on streamed OOF statistics: exact scores, recovered weights, honest choices, flat memory."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from geopose_mlops.constants import CITIES
from geopose_mlops.ensemble.fit import fit_city_factors, fit_ensemble, fit_from_oof_folders
from geopose_mlops.ensemble.stats import (
    MemberOof,
    accumulate_statistics,
    circular_mean,
    ensemble_score,
    read_image_table,
)
from geopose_mlops.ensemble.weights import caruana_weights, fit_angle_weights, fit_scale_weights
from geopose_mlops.metrics import GeoposeMetric
from geopose_mlops.train.oof import OofPredictions
from geopose_mlops.train.truth import TRUTH_DIR, TruthSet

SIZE = 32


def write_members(
    root,
    height_sigmas,
    n_per_city=6,
    size=SIZE,
    k=2,
    seed=0,
    scale_taus=None,
    angle_kappas=None,
    height_gain=None,
    scale_gain=None,
    fold_height_gain=None,
    member_scale_gain=None,
    own_truth=False,
):
    """Members = truth + planted noise; one OOF folder per member and fold (``OofPredictions.save``).

    The truth goes into one truth set, ``root/truth`` (as a data run holds it), or with ``own_truth``
    into every folder's ``agl_true.npy`` (as earlier versions stored it).

    Heights get N(0, sigma^2) m noise; scales are multiplied by 1 + N(0, tau^2); angles get N(0, kappa^2) rad;
    ``height_gain``/``scale_gain`` multiply every member's heights/scales per city (a shared bias);
    ``fold_height_gain`` multiplies heights per ``(city, fold)``; ``member_scale_gain`` each member's scales.
    """
    rng = np.random.default_rng(seed)
    cities = [c for c in CITIES for _ in range(n_per_city)]
    n = len(cities)
    agl = rng.gamma(2.0, 4.0, (n, size, size))
    agl[:, :1, :2] = np.nan  # no-data pixels, left out everywhere
    scale = rng.uniform(2, 6, n)
    angle = rng.uniform(-math.pi, math.pi, n)
    ids = [f"{c}_img{i:04d}" for i, c in enumerate(cities)]
    folds = np.arange(n) % k
    height_bias = np.array([(height_gain or {}).get(c, 1.0) for c in cities])
    height_bias *= np.array([(fold_height_gain or {}).get((c, f), 1.0) for c, f in zip(cities, folds, strict=True)])
    scale_bias = np.array([(scale_gain or {}).get(c, 1.0) for c in cities])
    if not own_truth:
        TruthSet(source=root, ids=ids, agl=agl.astype(np.float16)).save(root / TRUTH_DIR)
    members = []
    for m, sigma in enumerate(height_sigmas):
        pred = (np.nan_to_num(agl) + rng.normal(0, sigma, agl.shape)) * height_bias[:, None, None]
        scale_pred = scale * scale_bias * (1 + rng.normal(0, scale_taus[m] if scale_taus is not None else 0.0, n))
        scale_pred *= member_scale_gain[m] if member_scale_gain is not None else 1.0
        angle_pred = angle + rng.normal(0, angle_kappas[m] if angle_kappas is not None else 0.0, n)
        folders = {}
        for fold in range(k):
            rows = np.flatnonzero(folds == fold)
            folders[fold] = OofPredictions(
                sample_ids=[ids[i] for i in rows],
                cities=[cities[i] for i in rows],
                gsd=np.full(len(rows), 0.5),
                scale_true=scale[rows],
                angle_true=angle[rows],
                scale_pred=scale_pred[rows],
                angle_pred=angle_pred[rows],
                agl_pred=pred[rows].astype(np.float16),
                agl_true=agl[rows].astype(np.float16),
            ).save(root / f"m{m}" / f"fold{fold}", with_truth=own_truth)
        members.append(MemberOof(name=f"member{m}", folds=folders))
    return members


def truth_of(members):
    """The truth set ``write_members`` wrote beside the members' folders (None: each folder holds its own)."""
    folder = next(iter(members[0].folds.values())).parents[1] / TRUTH_DIR
    return TruthSet.open(folder) if folder.is_dir() else None


def read_table(members):
    """``read_image_table`` with the members' truth set."""
    return read_image_table(members, truth_of(members))


def test_statistics_give_the_metric_of_the_combined_predictions_exactly(tmp_path) -> None:
    members = write_members(tmp_path, [1.0, 3.0], scale_taus=[0.1, 0.2], angle_kappas=[0.2, 0.4])
    table = read_table(members)
    w, v, u = np.array([0.3, 0.7]), np.array([0.6, 0.4]), np.array([0.2, 0.8])
    scale, angle = table.scale_pred @ v, circular_mean(table.angle_pred, u)
    stats = accumulate_statistics(table, {"mix": (scale, angle)})
    factors = {"ARG": 1.1, "OMA": 0.9}
    ours = ensemble_score(stats, "mix", w, factors)

    metric = GeoposeMetric()
    loaded = [
        [OofPredictions.load(folder, truth_of(members)) for _, folder in sorted(m.folds.items())] for m in members
    ]
    for fold_a, fold_b in zip(*loaded, strict=True):
        for row, sample_id in enumerate(fold_a.sample_ids):
            i = table.sample_ids.index(sample_id)
            height = w[0] * fold_a.agl_pred[row].astype(np.float64) + w[1] * fold_b.agl_pred[row].astype(np.float64)
            height *= factors.get(fold_a.cities[row], 1.0)
            truth = fold_a.agl_true[row].astype(np.float64)
            metric.update(
                fold_a.cities[row], height, truth, scale[i], angle[i], fold_a.scale_true[row], fold_a.angle_true[row]
            )
    expected = metric.compute()
    assert ours["final_score"] == pytest.approx(expected["final_score"], abs=1e-9)
    for city in CITIES:
        assert ours["cities"][city]["vflow_r2"] == pytest.approx(expected["cities"][city]["vflow_r2"], abs=1e-9)


def test_simplex_recovers_inverse_variance_height_weights_and_beats_equal_and_best(tmp_path) -> None:
    sigmas = np.array([1.0, 2.0, 4.0])
    table = read_table(write_members(tmp_path, sigmas))
    spec, _ = fit_ensemble(table, "simplex")
    # Independent zero-mean noise: the optimum is w_k ∝ 1/sigma_k^2 = (0.762, 0.190, 0.048).
    optimum = (1 / sigmas**2) / (1 / sigmas**2).sum()
    assert np.abs(np.array(spec.height_weights) - optimum).max() < 0.01, (spec.height_weights, optimum)
    assert spec.oof_score > spec.equal_weights_oof_score + 0.01
    assert spec.oof_score > spec.best_member_oof_score + 0.005
    # Caruana's greedy selection (20 picks of 0.05) lands within a pick of the optimum and never beats SLSQP.
    caruana, _ = fit_ensemble(table, "caruana")
    assert np.abs(np.array(caruana.height_weights) - optimum).max() <= 0.05
    assert spec.method_oof_scores["caruana"] <= spec.method_oof_scores["simplex"] + 1e-12
    assert spec.method_oof_scores["equal"] == spec.equal_weights_oof_score < spec.method_oof_scores["caruana"]


def test_scale_and_angle_weights_recover_inverse_variance(tmp_path) -> None:
    # 2,000 images of 2 x 2 pixels: many per-image scales and angles, few pixels.
    taus, kappas = np.array([0.2, 0.1, 0.05]), np.array([0.05, 0.1, 0.2])
    members = write_members(tmp_path, [0.5] * 3, n_per_city=500, size=2, scale_taus=taus, angle_kappas=kappas)
    table = read_table(members)
    # Small independent errors: the weighted error is sum_k w_k e_k, least variance at w ∝ 1/variance.
    for fitted, noise in ((fit_scale_weights(table, "simplex"), taus), (fit_angle_weights(table, "simplex"), kappas)):
        optimum = (1 / noise**2) / (1 / noise**2).sum()
        assert np.abs(fitted - optimum).max() < 0.05, (fitted, optimum)


def test_caruana_picks_with_replacement_toward_the_best_mix() -> None:
    # Objective peaked at (0.75, 0.25, 0): four picks reach it exactly.
    target = np.array([0.75, 0.25, 0.0])
    weights = caruana_weights(lambda w: -np.square(w - target).sum(), 3, rounds=4)
    np.testing.assert_allclose(weights, target)


def test_scale_weights_chosen_on_the_exact_score_when_the_proxy_misleads(tmp_path) -> None:
    # Every member's heights are half the truth; member0's scales are doubled, which puts its VFLOW
    # right. The scale fit with true heights prefers member1's exact scales; the exact score does not.
    everywhere = dict.fromkeys(CITIES, 0.5)
    members = write_members(tmp_path, [0.5, 0.5], height_gain=everywhere, member_scale_gain=[2.0, 1.0])
    spec, stats = fit_ensemble(read_table(members), "simplex")
    proxy_v = fit_scale_weights(read_table(members), "simplex")
    assert proxy_v[1] > 0.99  # the proxy picks member1's scales
    assert spec.scale_angle_weights_from == "member:member0" and spec.scale_weights == [1.0, 0.0]
    proxy_score = ensemble_score(stats, "simplex", np.array(spec.height_weights))["final_score"]
    assert spec.method_oof_scores["simplex"] > proxy_score + 0.05
    assert spec.method_oof_scores["simplex"] >= max(spec.member_oof_scores.values())
    assert spec.method_oof_scores["simplex"] >= spec.equal_weights_oof_score


def test_weighted_circular_mean_handles_the_wrap() -> None:
    angles = np.array([[math.radians(170), math.radians(-170)]])
    assert abs(math.degrees(circular_mean(angles, np.array([0.5, 0.5]))[0])) == pytest.approx(180, abs=1e-6)
    assert math.degrees(circular_mean(angles, np.array([1.0, 0.0]))[0]) == pytest.approx(170, abs=1e-6)
    # Weights pull toward the heavier angle: 3:1 between 170 and 190 degrees is the chord's mean direction,
    # 180 - atan(0.5 tan 10) = 174.96 degrees.
    expected = 180 - math.degrees(math.atan(0.5 * math.tan(math.radians(10))))
    assert math.degrees(circular_mean(angles, np.array([0.75, 0.25]))[0]) == pytest.approx(expected, abs=1e-9)


def test_city_factor_recovered_and_kept_only_where_it_helps(tmp_path) -> None:
    table = read_table(write_members(tmp_path, [0.5], n_per_city=8, height_gain={"ARG": 0.8}))
    spec, stats = fit_ensemble(table, "equal")
    factors = fit_city_factors(stats, "equal", np.array([1.0]))
    assert factors["ARG"] == pytest.approx(1 / 0.8, rel=0.02)
    assert spec.city_height_factors["ARG"] == pytest.approx(1 / 0.8, rel=0.02)
    # Cities without a planted bias: a factor fitted on the other fold cannot beat 1 by much, if kept at all.
    for city, factor in spec.city_height_factors.items():
        if city != "ARG":
            assert factor == pytest.approx(1.0, abs=0.02)
    assert spec.oof_city_scores["ARG"] > spec.method_oof_scores["equal"]


def test_city_factor_not_kept_when_the_other_folds_mislead(tmp_path) -> None:
    # ARG heights are x0.8 in fold 0 and x1.25 in fold 1: the factor fitted on one fold (1.25 or 0.8)
    # pushes the other fold the wrong way, so the nested check must drop it, though in-sample it helps.
    gain = {("ARG", 0): 0.8, ("ARG", 1): 1.25}
    table = read_table(write_members(tmp_path, [0.5], n_per_city=8, fold_height_gain=gain))
    spec, stats = fit_ensemble(table, "equal")
    assert "ARG" not in spec.city_height_factors
    in_sample = fit_city_factors(stats, "equal", np.array([1.0]))["ARG"]
    plain = ensemble_score(stats, "equal", np.array([1.0]))["cities"]["ARG"]["score"]
    fitted = ensemble_score(stats, "equal", np.array([1.0]), {"ARG": in_sample})["cities"]["ARG"]["score"]
    assert fitted >= plain  # scored on the images it was fitted on, a factor never looks worse
    assert spec.oof_city_scores["ARG"] == pytest.approx(plain, abs=1e-12)


def test_city_factor_outside_the_sane_range_is_refused_with_a_warning_naming_the_city(tmp_path) -> None:
    # Members predict a quarter of OMA's heights (a model that barely learned): the closed-form factor
    # would be x4, which the nested check alone would keep; the range refuses it and says so.
    table = read_table(write_members(tmp_path, [0.2], n_per_city=8, height_gain={"OMA": 0.25, "ARG": 0.8}))
    with pytest.warns(UserWarning, match=r"city height factor of OMA refused: x4"):
        spec, stats = fit_ensemble(table, "equal")
    assert fit_city_factors(stats, "equal", np.array([1.0]))["OMA"] == pytest.approx(4.0, rel=0.02)
    assert "OMA" not in spec.city_height_factors
    assert spec.city_height_factors["ARG"] == pytest.approx(1 / 0.8, rel=0.02)  # inside the range: kept


def test_city_factors_can_be_switched_off(tmp_path) -> None:
    table = read_table(write_members(tmp_path, [0.5], n_per_city=8, height_gain={"ARG": 0.8}))
    spec, _ = fit_ensemble(table, "equal", city_factors=False)
    assert spec.city_height_factors == {}
    assert spec.oof_score == pytest.approx(spec.method_oof_scores["equal"], abs=1e-12)  # nothing but the weights


def test_scale_model_kept_only_when_it_improves_the_nested_score(tmp_path) -> None:
    # Every member's scale is 30% low in JAX: a model of scale from city and ensemble scale fixes it.
    biased = write_members(tmp_path / "b", [0.5, 1.0], n_per_city=10, size=8, scale_gain={"JAX": 0.7})
    spec, _ = fit_ensemble(read_table(biased), "simplex", scale_model_dir=tmp_path)
    assert spec.scale_model == "scale_model.json" and (tmp_path / "scale_model.json").is_file()
    assert spec.oof_score > spec.method_oof_scores["simplex"] + 0.005
    # Exact scales: nothing to learn, and the nested predictions only add error.
    exact = write_members(tmp_path / "e", [0.5, 1.0], n_per_city=10, size=8)
    spec, _ = fit_ensemble(read_table(exact), "simplex", scale_model_dir=tmp_path / "e")
    assert spec.scale_model is None and not (tmp_path / "e" / "scale_model.json").exists()


def test_streamed_statistics_memory_does_not_grow_with_images(tmp_path) -> None:
    small = write_members(tmp_path / "n", [1.0, 2.0, 3.0], n_per_city=8)
    large = write_members(tmp_path / "2n", [1.0, 2.0, 3.0], n_per_city=16)
    fit_ensemble(read_table(small), "simplex")  # first-call allocations (lazy imports) out of the way
    peaks, sizes = [], []
    for members in (small, large):
        tracemalloc.start()
        spec, stats = fit_ensemble(read_table(members), "simplex")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sizes.append(stats.nbytes)
        assert spec.oof_score > spec.equal_weights_oof_score
    # The pixel statistics are per (city, fold) group: the same bytes for N and 2N images.
    assert sizes[0] == sizes[1]
    # Peak memory: the 32 added images bring only their index rows while the K = 3 members are aligned
    # and 2K + 9 numbers each after: bound 1.5 kB per added image (measured about 0.7 kB). Holding their
    # arrays instead would add 4 arrays x 32 x 32 px x 8 bytes = 32 kB per image (8 kB as float16).
    assert peaks[1] - peaks[0] < 32 * 1536, peaks


def test_fit_from_oof_folders_is_one_fold_per_member(tmp_path) -> None:
    members = write_members(tmp_path, [1.0, 2.0], k=1, own_truth=True)
    spec = fit_from_oof_folders([m.folds[0] for m in members])
    assert spec.members == ["member0", "member1"]
    assert spec.height_weights[0] > spec.height_weights[1]
    assert spec.city_height_factors == {} and spec.scale_model is None
