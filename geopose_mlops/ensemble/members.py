"""``ensemble fit`` on tracked runs: which finished cross-validations become members, and the fit driver.

The candidates are read, their OOF folders downloaded and the ensemble run logged by
``tracking.ensembles``, and the members' true heights found by ``tracking.truth`` (the truth set of
their data fingerprint: the cache where it is here, else the data run's artifact); this module decides
and fits, and never calls MLflow itself.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

from geopose_mlops.constants import DEFAULT_EXPERIMENT, ENSEMBLE_JSON, FINGERPRINT_PARAM, KIND_CV, KIND_TAG
from geopose_mlops.ensemble.fit import EnsembleSpec, fit_ensemble
from geopose_mlops.ensemble.stats import MemberOof, read_image_table
from geopose_mlops.errors import ConfigError
from geopose_mlops.tracking.ensembles import (
    TrackedRun,
    download_oof,
    get_runs,
    log_ensemble_run,
    member_fold_runs,
    search_finished_cv_runs,
)
from geopose_mlops.tracking.truth import stored_truth
from geopose_mlops.train.oof import has_truth_file
from geopose_mlops.train.truth import TRUTH_DIR


def select_cv_runs(
    experiment: str = DEFAULT_EXPERIMENT,
    filter_string: str = "",
    run_ids: list[str] | None = None,
    max_members: int | None = None,
) -> list[TrackedRun]:
    """Finished top-level cv runs on the same data (best ``cv_score`` first), the candidates.

    A search keeps the runs with the best run's ``data_fingerprint`` and warns of those it leaves out;
    named runs must all share it (the sample ids are checked again when their OOF folders are aligned).

    Args:
        experiment: Experiment searched when no ``run_ids`` are named.
        filter_string: Extra MLflow filter of the search.
        run_ids: The cv runs to ensemble, instead of a search.
        max_members: Keep at most this many (the best).

    Raises:
        ConfigError: A named run is not a finished cv run or was trained on other data, or no candidate
            remains.
    """
    if run_ids:
        runs = get_runs(run_ids)
        bad = [r.info.run_id for r in runs if r.data.tags.get(KIND_TAG) != KIND_CV or r.info.status != "FINISHED"]
        if bad:
            raise ConfigError(f"--run-ids {bad}: not finished cross-validation runs (tag {KIND_TAG}={KIND_CV})")
    else:
        runs = search_finished_cv_runs(experiment, filter_string)
    runs = [r for r in runs if "cv_score" in r.data.metrics and math.isfinite(r.data.metrics["cv_score"])]
    if not runs:
        raise ConfigError(f"no finished cv run with a cv_score in experiment {experiment!r} to ensemble")
    runs.sort(key=lambda r: -r.data.metrics["cv_score"])
    data = runs[0].data.params.get(FINGERPRINT_PARAM)
    other = [r.info.run_id for r in runs if r.data.params.get(FINGERPRINT_PARAM) != data]
    if run_ids and other:
        raise ConfigError(
            f"--run-ids {other}: trained on other data ({FINGERPRINT_PARAM} differs from {runs[0].info.run_id}'s "
            f"{data!r}); an ensemble needs members whose folds cover the same images"
        )
    if other:
        warnings.warn(
            f"{len(other)} finished cv run(s) left out, trained on other data than the best run "
            f"{runs[0].info.run_id} ({FINGERPRINT_PARAM} {data!r}): {other[:10]}"
            + (f" and {len(other) - 10} more" if len(other) > 10 else "")
            + "; name the runs (--run-ids) or narrow the search (--filter) to choose",
            stacklevel=2,
        )
    runs = [r for r in runs if r.data.params.get(FINGERPRINT_PARAM) == data]
    return runs[:max_members] if max_members else runs


def fit_tracked_ensemble(
    experiment: str = DEFAULT_EXPERIMENT,
    filter_string: str = "",
    run_ids: list[str] | None = None,
    max_members: int | None = None,
    method: str = "simplex",
    *,
    city_factors: bool = True,
    scale_model: bool = True,
) -> tuple[str, EnsembleSpec]:
    """Fit an ensemble on the candidates' OOF predictions and log it as an ``ensemble`` run.

    Args:
        experiment: Experiment of the candidates (see ``select_cv_runs``).
        filter_string: Extra MLflow filter of the search.
        run_ids: The cv runs to ensemble, instead of a search.
        max_members: Keep at most this many (the best).
        method: Height weighting: ``simplex``, ``caruana`` or ``equal``.
        city_factors: Also fit per-city height factors (kept where the nested check and range allow).
        scale_model: Also fit the XGBoost scale model (kept where its nested predictions help).

    Returns:
        (ensemble run id, the fitted spec).
    """
    runs = select_cv_runs(experiment, filter_string, run_ids, max_members)
    with tempfile.TemporaryDirectory(prefix="geopose-ensemble-") as tmp:
        tmp = Path(tmp)
        members, member_folds = [], {}
        for run in runs:
            folds = member_fold_runs(run)
            member_folds[run.info.run_id] = {str(f): r for f, r in sorted(folds.items())}
            folders = {f: download_oof(r, tmp / run.info.run_id / str(f)) for f, r in folds.items()}
            members.append(MemberOof(run.info.run_id, folders))
        # Fold runs of earlier versions hold their own truth; the others are read with the data's truth set.
        own_truth = all(has_truth_file(folder) for folder in members[0].folds.values())
        truth = None if own_truth else stored_truth(runs[0].data.params[FINGERPRINT_PARAM], tmp / TRUTH_DIR)
        table = read_image_table(members, truth)
        out = tmp / "ensemble"
        out.mkdir()
        spec, _ = fit_ensemble(table, method, scale_model_dir=out if scale_model else None, city_factors=city_factors)
        spec.member_folds = member_folds
        spec.image_size = int(runs[0].data.params["image_size"])
        spec.save(out / ENSEMBLE_JSON)
        run_id = log_ensemble_run(runs[0].info.experiment_id, method, spec, out)
    return run_id, spec
