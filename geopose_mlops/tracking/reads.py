"""Reading tracked runs: plain views of an experiment's finished runs, and the ``report`` run.

``geopose-ml report`` (``report.py``) works on these views and never calls MLflow itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from geopose_mlops.constants import (
    DEFAULT_EXPERIMENT,
    ENSEMBLE_JSON,
    KIND_CV,
    KIND_ENSEMBLE,
    KIND_FOLD,
    KIND_REPORT,
    KIND_TAG,
)
from geopose_mlops.tracking.experiments import experiment_id


@dataclass(frozen=True)
class FoldRun:
    """One fold (child) run.

    Attributes:
        run_id: MLflow run id.
        name: Run name as shown in the UI.
        history: Metric name -> ``[(step, value), ...]`` sorted by step (step = epoch).
        params: The run's params (the parent's plus ``fold`` and ``precision``).
    """

    run_id: str
    name: str
    history: dict[str, list[tuple[int, float]]]
    params: dict[str, str] = field(default_factory=dict)

    def values(self, key: str) -> list[float]:
        """Every logged value of metric ``key``, in step order (empty if never logged)."""
        return [value for _, value in self.history.get(key, [])]


@dataclass(frozen=True)
class CvRun:
    """One cross-validation (parent) run and its finished fold runs.

    Attributes:
        run_id: MLflow run id.
        name: Run name.
        params: The run's params (SPEC §4: encoder, decoder, lr, ...).
        metrics: Latest value of each metric (``cv_score``, ``cv_score_{CITY}``).
        folds: The finished fold runs, ordered by name.
    """

    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    folds: list[FoldRun] = field(default_factory=list)

    def param(self, key: str) -> str:
        """Param ``key``, also found as ``model.key`` or ``*.key`` (flattened configs); ``""`` if absent."""
        if key in self.params:
            return self.params[key]
        for name, value in sorted(self.params.items()):
            if name.endswith(f".{key}"):
                return value
        return ""


@dataclass(frozen=True)
class EnsembleRun:
    """One ensemble run: its out-of-fold score and its members.

    Attributes:
        run_id: MLflow run id.
        name: Run name.
        oof_score: The ensemble's out-of-fold score (NaN if not logged).
        member_ids: Run ids of its members (cv runs), from the ``members`` param or ``ensemble.json``.
    """

    run_id: str
    name: str
    oof_score: float
    member_ids: list[str]


def _finished_runs(client: MlflowClient, experiment_id: str, kind: str) -> list[Run]:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{kind}' and attributes.status = 'FINISHED'",
        run_view_type=ViewType.ACTIVE_ONLY, max_results=10000,
    )


def _history(client: MlflowClient, run: Run) -> dict[str, list[tuple[int, float]]]:
    history = {}
    for key in run.data.metrics:
        points = client.get_metric_history(run.info.run_id, key)
        history[key] = sorted((p.step, p.value) for p in points)
    return history


def _member_ids(run: Run) -> list[str]:
    raw = run.data.params.get("members", "")
    try:
        parsed = json.loads(raw)
        if isinstance(parsed, list):
            return [str(m) for m in parsed]
    except json.JSONDecodeError:
        pass
    if raw:
        return [m.strip() for m in raw.replace(";", ",").split(",") if m.strip()]
    # Params are capped in length: fall back to the ensemble.json artifact.
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{ENSEMBLE_JSON}")
    except (MlflowException, OSError):  # no such artifact: the members are unknown
        return []
    members = json.loads(text).get("members", [])
    return [m["run_id"] if isinstance(m, dict) else str(m) for m in members]


def read_tracked_runs(experiment: str = DEFAULT_EXPERIMENT) -> tuple[list[CvRun], list[EnsembleRun]]:
    """Read the finished cv runs (with their finished fold runs) and ensemble runs of ``experiment``.

    Deleted runs and runs that failed, were killed or are still running are left out.

    Raises:
        ConfigError: No active experiment has that name.
    """
    client = MlflowClient()
    found_in = experiment_id(experiment)
    folds_by_parent: dict[str, list[FoldRun]] = {}
    for run in _finished_runs(client, found_in, KIND_FOLD):
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID, "")
        fold = FoldRun(
            run.info.run_id, run.info.run_name or run.info.run_id, _history(client, run), dict(run.data.params)
        )
        folds_by_parent.setdefault(parent, []).append(fold)
    cv_runs = [
        CvRun(run.info.run_id, run.info.run_name or run.info.run_id, dict(run.data.params), dict(run.data.metrics),
              sorted(folds_by_parent.get(run.info.run_id, []), key=lambda f: f.name))
        for run in _finished_runs(client, found_in, KIND_CV)
    ]
    ensembles = [
        EnsembleRun(run.info.run_id, run.info.run_name or run.info.run_id,
                    run.data.metrics.get("oof_score", math.nan), _member_ids(run))
        for run in _finished_runs(client, found_in, KIND_ENSEMBLE)
    ]
    return cv_runs, ensembles


def log_report_run(experiment: str, paths: Sequence[Path], params: dict[str, object]) -> str:
    """Log a run tagged ``geopose.kind=report`` in ``experiment`` holding ``paths`` as artifacts.

    Returns:
        The report run's id.
    """
    # A client, not the fluent API, so that a report made inside another active run stays separate.
    client = MlflowClient()
    run = client.create_run(experiment_id(experiment), tags={KIND_TAG: KIND_REPORT}, run_name="report")
    try:
        for key, value in params.items():
            client.log_param(run.info.run_id, key, str(value))
        for path in paths:
            client.log_artifact(run.info.run_id, str(path))
    except Exception:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id
