"""Every MLflow call of ``ensemble fit``: the candidate cv runs, their fold runs' OOF folders, the ensemble run.

Which candidates become members, and the fit itself, are decided in ``ensemble.members``, which calls
these functions (and ``tracking.truth.stored_truth`` for the members' true heights) and never MLflow.
Packaging, registering and serving an ensemble is ``registry.py``.

SPEC §4: an ensemble run (``geopose.kind=ensemble``, in the experiment of its best member) holds the
out-of-fold scores of the ensemble, of its best member and of each weighting method, the members and
method as params, and ``ensemble.json`` plus the scale model as artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import Metric, Param, Run
from mlflow.tracking import MlflowClient

from geopose_mlops.constants import CODE_VERSION_TAG, KIND_CV, KIND_ENSEMBLE, KIND_TAG
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.tracking import artifacts
from geopose_mlops.tracking.experiments import experiment_id
from geopose_mlops.tracking.runs import code_version, fold_runs

TrackedRun = Run  # an MLflow run: .info (run_id, status, experiment_id) and .data (params, metrics, tags)


def get_runs(run_ids: list[str]) -> list[TrackedRun]:
    """The runs with these ids, in that order."""
    client = MlflowClient()
    return [client.get_run(r) for r in run_ids]


def search_finished_cv_runs(experiment: str, filter_string: str = "") -> list[TrackedRun]:
    """The FINISHED runs tagged ``geopose.kind=cv`` of ``experiment``, best ``cv_score`` first.

    Args:
        experiment: Experiment name.
        filter_string: An extra MLflow filter (``params.encoder = 'resnet34'``), joined with ``and``.

    Raises:
        ConfigError: No active experiment has that name.
    """
    query = f"tags.`{KIND_TAG}` = '{KIND_CV}' and attributes.status = 'FINISHED'"
    return MlflowClient().search_runs(
        [experiment_id(experiment)],
        f"{query} and {filter_string}" if filter_string else query,
        order_by=["metrics.cv_score DESC"],
    )


def member_fold_runs(cv_run: TrackedRun) -> dict[int, str]:
    """The fold run ids of a cv run (looked up in its own experiment), by fold."""
    runs = fold_runs(MlflowClient(), cv_run.info.experiment_id, cv_run.info.run_id)
    return {fold: run.info.run_id for fold, run in runs.items()}


def download_oof(fold_run_id: str, dest: Path) -> Path:
    """Download a fold run's ``oof/`` folder into folder ``dest``; returns the local ``oof`` folder."""
    return artifacts.download_oof(MlflowClient(), fold_run_id, dest)


def log_ensemble_run(experiment: str, method: str, spec: EnsembleSpec, folder: Path) -> str:
    """Log a finished ensemble run holding the spec's scores and params and the files of ``folder``.

    Args:
        experiment: Experiment id of the run (that of the best member).
        method: The weighting method fitted (``simplex``, ``caruana``, ``equal``).
        spec: The fitted ensemble.
        folder: ``ensemble.json`` and the scale model, stored at the artifact root.

    Returns:
        The ensemble run's id.
    """
    client = MlflowClient()
    run_id = client.create_run(
        experiment,
        run_name=f"ensemble-{method}-{len(spec.members)}",
        tags={KIND_TAG: KIND_ENSEMBLE, CODE_VERSION_TAG: code_version()},
    ).info.run_id
    metrics = {
        "oof_score": spec.oof_score,
        "best_member_oof_score": spec.best_member_oof_score,
        "equal_weights_oof_score": spec.equal_weights_oof_score,
        **{f"{m}_weights_oof_score": v for m, v in spec.method_oof_scores.items()},
        **{f"oof_score_{c}": v for c, v in spec.oof_city_scores.items()},
    }
    params = {
        "members": json.dumps(spec.members),
        "method": method,
        "n_members": str(len(spec.members)),
        "city_height_factors": json.dumps(spec.city_height_factors),
        "scale_model": str(spec.scale_model is not None),
        "scale_angle_weights_from": spec.scale_angle_weights_from,
    }
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    client.log_artifacts(run_id, str(folder))
    client.set_terminated(run_id)
    return run_id
