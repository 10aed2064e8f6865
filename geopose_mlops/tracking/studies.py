"""Every MLflow call of tuning: the study run, its trial runs, pruning marks and the study summary.

SPEC §4: one run tagged ``geopose.kind=study`` per Optuna study, found again by its tag
``optuna.study_name`` so that every ``tune`` invocation (and every parallel worker) adds its trials
under the same run. Each trial is a cross-validation run (created here, then filled by ``train.cv``)
tagged ``geopose.kind=trial``, nested under the study run, cross-referenced with Optuna by the tag
``optuna.trial_number`` (and, on the Optuna side, the trial's user attribute ``mlflow_run_id``).
When ``train.cv`` adopts the trial run it tags it ``geopose.cv_group`` as its fold runs
(``tracking.runs.cv_group``), so the UI's *Group by* that tag charts each trial with its folds; with the
``fold0`` objective the trial's curve is its one fold's.
A pruned trial's run is tagged ``optuna.state=PRUNED`` and ends with status ``KILLED``. The run of a
trial whose worker died (found by the heartbeat) is closed by the worker that finds it: status
``FAILED``, tags ``optuna.state=FAILED`` and ``optuna.dead_worker`` (the dead worker's ``host:pid``).

Runs are addressed by id through ``MlflowClient`` (as in ``tracking.runs``), never through the fluent
API's active-run stack; values go in chunked batches (``tracking.batches``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from geopose_mlops.constants import CODE_VERSION_TAG, KIND_STUDY, KIND_TAG, KIND_TRIAL
from geopose_mlops.tracking import batches
from geopose_mlops.tracking.experiments import experiment_id
from geopose_mlops.tracking.runs import code_version

STUDY_NAME_TAG = "optuna.study_name"
STORAGE_TAG = "optuna.storage"
TRIAL_NUMBER_TAG = "optuna.trial_number"
TRIAL_STATE_TAG = "optuna.state"
PRUNED_STEP_TAG = "optuna.pruned_at_step"
DEAD_WORKER_TAG = "optuna.dead_worker"
STUDY_RUN_TAG = "geopose.study_run_id"  # on an ``mlflow run`` launch run that is not the study run


class StudyTracker:
    """Finds or creates the study run and fills it and its trial runs.

    Args:
        experiment: Experiment name (created if missing).
    """

    def __init__(self, experiment: str) -> None:
        self.client = MlflowClient()
        self.experiment_name = experiment
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        """The experiment's id (created on first use)."""
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.experiment_name, create=True)
        return self._experiment_id

    def _study_runs(self, study_name: str) -> list:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = '{KIND_STUDY}' and tags.`{STUDY_NAME_TAG}` = '{study_name}'",
        )
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def study_run(self, study_name: str, storage_label: str) -> str:
        """The run of a study: the existing one, else a new one (adopting ``mlflow run``'s if any).

        Two workers starting at once may both create a run; each then keeps the oldest one and the
        younger duplicate is deleted, so a study has exactly one run.

        Args:
            study_name: The Optuna study name.
            storage_label: Where the study lives, with any password removed (a tag, for people).
        """
        launched = os.environ.get("MLFLOW_RUN_ID")
        runs = self._study_runs(study_name)
        if runs:
            study_run_id = runs[0].info.run_id
            self.client.update_run(study_run_id, status="RUNNING")
        else:
            study_run_id = self._create_study_run(study_name, storage_label, launched)
        if launched and launched != study_run_id:
            self.client.set_tag(launched, STUDY_RUN_TAG, study_run_id)
        return study_run_id

    def _create_study_run(self, study_name: str, storage_label: str, launched: str | None) -> str:
        tags = {
            KIND_TAG: KIND_STUDY,
            STUDY_NAME_TAG: study_name,
            STORAGE_TAG: storage_label,
            CODE_VERSION_TAG: code_version(),
        }
        adopt = launched and self.client.get_run(launched).info.experiment_id == self.experiment_id
        if adopt:
            mine = launched
            for key, value in tags.items():
                self.client.set_tag(mine, key, value)
        else:
            mine = self.client.create_run(self.experiment_id, tags=tags, run_name=f"study-{study_name}").info.run_id
        oldest = self._study_runs(study_name)[0].info.run_id
        if oldest != mine:  # another worker created the study run first: keep only that one
            if adopt:  # a run made by ``mlflow run`` is not ours to delete
                self.client.set_tag(mine, KIND_TAG, "study-duplicate")
            else:
                self.client.delete_run(mine)
            self.client.update_run(oldest, status="RUNNING")
        return oldest

    def log_study_params(self, run_id: str, params: dict[str, str]) -> None:
        """Study name, sampler, pruner, search space: params already logged keep their first value."""
        logged = self.client.get_run(run_id).data.params
        batches.log_values(self.client, run_id, params={k: v for k, v in params.items() if k not in logged})

    def start_trial_run(self, study_run_id: str, trial_number: int, params: dict[str, object]) -> str:
        """Create a trial run nested under the study run, tagged with the Optuna trial number."""
        tags = {
            KIND_TAG: KIND_TRIAL,
            MLFLOW_PARENT_RUN_ID: study_run_id,
            TRIAL_NUMBER_TAG: str(trial_number),
            CODE_VERSION_TAG: code_version(),
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"trial-{trial_number}")
        batches.log_values(self.client, run.info.run_id, params=params)
        return run.info.run_id

    @staticmethod
    def trial_tags(trial_number: int) -> dict[str, str]:
        """Tags that keep a trial run a trial run when ``train.cv`` adopts it."""
        return {KIND_TAG: KIND_TRIAL, TRIAL_NUMBER_TAG: str(trial_number)}

    def log_trial_epoch(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics on the trial run (``step`` = epoch, counted across folds for ``cv``)."""
        batches.log_epochs(self.client, run_id, [(step, metrics)])

    def end_trial(self, run_id: str, state: str, value: float | None = None, step: int | None = None) -> None:
        """Close a trial run: ``COMPLETE`` (with ``trial_value``), ``PRUNED`` (KILLED) or ``FAILED``."""
        tags = {TRIAL_STATE_TAG: state, **({PRUNED_STEP_TAG: step} if step is not None else {})}
        metrics = {"trial_value": value} if value is not None else {}
        batches.log_values(self.client, run_id, metrics=metrics, tags=tags)
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run_id, status=status)

    def end_dead_trial(self, run_id: str, worker: str) -> None:
        """Close the run of a trial whose worker died (``worker``: its ``host:pid``) as FAILED.

        Called by another worker while it starts a trial, so a tracking error here is only a warning:
        it must not stop that worker.
        """
        try:
            self.client.set_tag(run_id, DEAD_WORKER_TAG, worker)
            self.end_trial(run_id, "FAILED")
        except MlflowException as err:
            warnings.warn(f"trial run {run_id} of dead worker {worker}: cannot close it ({err})", stacklevel=2)

    def log_study_summary(
        self,
        run_id: str,
        metrics: dict[str, float],
        best_tags: dict[str, str],
        trials: pd.DataFrame,
        figures: dict[str, object],
        step: int,
    ) -> None:
        """Best value and params (as metrics, which may change as the study grows), tables and plots.

        Args:
            run_id: The study run.
            metrics: ``best_value``, ``best_lr``, ... (absent until a trial completes) and trial counts.
            best_tags: Tags such as the best trial's number and run id.
            trials: ``study.trials_dataframe()``, written as ``study/trials.csv`` and ``.json``.
            figures: Matplotlib figures by file stem, written under ``plots/``.
            step: Number of finished trials (the x of ``best_value``'s history).
        """
        batches.log_values(self.client, run_id, metrics=metrics, step=step, tags=best_tags)
        with tempfile.TemporaryDirectory(prefix="geopose-study-") as tmp:
            folder = Path(tmp) / "study"
            folder.mkdir()
            trials.to_csv(folder / "trials.csv", index=False)
            (folder / "trials.json").write_text(trials.to_json(orient="records", date_format="iso", indent=1))
            (folder / "best.json").write_text(json.dumps({"metrics": metrics, "tags": best_tags}, indent=2))
            self.client.log_artifacts(run_id, str(folder), "study")
            if figures:
                plots = Path(tmp) / "plots"
                plots.mkdir()
                for stem, figure in figures.items():
                    figure.savefig(plots / f"{stem}.png", dpi=100, bbox_inches="tight")
                self.client.log_artifacts(run_id, str(plots), "plots")

    def end_study_run(self, run_id: str) -> None:
        """Mark the study run finished (a later invocation reopens it)."""
        self.client.set_terminated(run_id, status="FINISHED")
