"""What training asks of the tracking store: the ``Tracker`` protocol, and the null tracker of other ranks.

``tracking.runs.CvTracker`` is the implementation (every MLflow call lives under ``tracking/``); this
module names exactly the methods ``train/`` calls on it, so the training code is typed without importing
MLflow. Under torchrun only rank 0 talks to the store (an SQLite store opened by several processes at
once would even race on its schema); the other ranks hold a :class:`NullTracker`, whose methods do
nothing, and get what they need from rank 0 by ``distributed.broadcast_from_main``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pandas as pd

from geopose_mlops.config import TrainConfig


@runtime_checkable
class Tracker(Protocol):
    """The runs of one cross-validation, as training writes and reads them (``tracking.runs.CvTracker``)."""

    def start_cv_run(
        self,
        config: TrainConfig,
        data_fingerprint: str,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Open the parent run (an existing ``run_id``, the ``mlflow run`` one, or a new run); its id."""
        ...

    def resume_target(self, run_id: str) -> tuple[str, int | None]:
        """``(cv run id, fold or None)`` for the id of a cv run or of one of its fold runs."""
        ...

    def fold_runs(self, cv_run_id: str) -> dict[int, Any]:
        """The existing fold runs (``mlflow.entities.Run``) under a cv run, by fold."""
        ...

    def start_fold_run(
        self,
        cv_run_id: str,
        fold: int,
        config: TrainConfig,
        data_fingerprint: str,
        precision: str | None = None,
        params: dict[str, object] | None = None,
    ) -> str:
        """Create the nested run of one fold (with ``params`` beside the cv run's); its id."""
        ...

    def reopen(self, run_id: str) -> None:
        """Mark a resumed run as running again."""
        ...

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        ...

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """Log one epoch's metrics at ``step = epoch``."""
        ...

    def log_epochs(self, run_id: str, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
        """Log several epochs' metrics (``step = epoch``)."""
        ...

    def logged_epochs(self, run_id: str, key: str = "val_score") -> list[int]:
        """The epochs at which ``key`` was logged, sorted."""
        ...

    def log_fold_summary(self, run_id: str, best_score: float, best_epoch: int) -> None:
        """``best_val_score`` and ``best_epoch`` of a finished fold."""
        ...

    def log_params(self, run_id: str, params: dict[str, object]) -> None:
        """More params of a run (e.g. a fold's ``r2`` city means, the parent fold run it started from)."""
        ...

    def log_cv_scores(self, cv_run_id: str, scores: dict) -> None:
        """``cv_score`` and ``cv_score_{CITY}`` from a ``GeoposeMetric.compute()`` over all OOF files."""
        ...

    def log_data(self, cv_run_id: str, folds_table: pd.DataFrame, data_dir: str, data_fingerprint: str) -> None:
        """``folds.csv`` and the data set as the run's input."""
        ...

    def log_skipped_files(self, run_id: str, problems: Sequence[tuple[Path, str]]) -> None:
        """``skipped_files.csv``: the bad files left out of training."""
        ...

    def log_config(self, cv_run_id: str, config: TrainConfig) -> None:
        """``config.json``: the TrainConfig that rebuilds this cross-validation."""
        ...

    def download_artifact(self, run_id: str, name: str, dest: Path) -> Path:
        """Download one artifact of a run (``config.json``, ``folds.csv``) into folder ``dest``; the local file."""
        ...

    def log_checkpoint(self, run_id: str, path: Path) -> None:
        """Store a checkpoint file under ``checkpoints/``."""
        ...

    def log_oof(self, run_id: str, folder: Path) -> None:
        """Store the files of an ``oof/`` folder under ``oof/``."""
        ...

    def download_checkpoint(self, run_id: str, name: str, dest: Path) -> Path | None:
        """Download ``checkpoints/<name>`` of a run into ``dest``; None if the run has none."""
        ...

    def download_oof(self, run_id: str, dest: Path) -> Path:
        """Download a fold run's ``oof/`` folder into ``dest``; the local ``oof`` folder."""
        ...


class NullTracker:
    """A :class:`Tracker` that stores nothing: what ranks other than 0 hold under torchrun.

    Every write does nothing; every read answers "nothing stored" (no runs, no epochs, no checkpoint).
    The two downloads of files that must exist (``download_artifact``, ``download_oof``) have no such
    answer and raise: the other ranks never read them, rank 0 broadcasts what it read.
    """

    def start_cv_run(
        self,
        config: TrainConfig,
        data_fingerprint: str,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """No run is made: an empty id (rank 0 broadcasts the real one)."""
        return ""

    def resume_target(self, run_id: str) -> tuple[str, int | None]:
        """The id itself, as a cv run."""
        return run_id, None

    def fold_runs(self, cv_run_id: str) -> dict[int, Any]:
        """No fold runs."""
        return {}

    def start_fold_run(
        self,
        cv_run_id: str,
        fold: int,
        config: TrainConfig,
        data_fingerprint: str,
        precision: str | None = None,
        params: dict[str, object] | None = None,
    ) -> str:
        """No run is made: an empty id (rank 0 broadcasts the real one)."""
        return ""

    def reopen(self, run_id: str) -> None:
        """Nothing."""

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Nothing."""

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """Nothing."""

    def log_epochs(self, run_id: str, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
        """Nothing."""

    def logged_epochs(self, run_id: str, key: str = "val_score") -> list[int]:
        """No epochs."""
        return []

    def log_fold_summary(self, run_id: str, best_score: float, best_epoch: int) -> None:
        """Nothing."""

    def log_params(self, run_id: str, params: dict[str, object]) -> None:
        """Nothing."""

    def log_cv_scores(self, cv_run_id: str, scores: dict) -> None:
        """Nothing."""

    def log_data(self, cv_run_id: str, folds_table: pd.DataFrame, data_dir: str, data_fingerprint: str) -> None:
        """Nothing."""

    def log_skipped_files(self, run_id: str, problems: Sequence[tuple[Path, str]]) -> None:
        """Nothing."""

    def log_config(self, cv_run_id: str, config: TrainConfig) -> None:
        """Nothing."""

    def download_artifact(self, run_id: str, name: str, dest: Path | None = None) -> Path:
        """Raises: this rank reads no store (rank 0 broadcasts the run's files' contents)."""
        raise RuntimeError(f"artifact {name!r} of run {run_id}: only rank 0 reads the tracking store")

    def log_checkpoint(self, run_id: str, path: Path) -> None:
        """Nothing."""

    def log_oof(self, run_id: str, folder: Path) -> None:
        """Nothing."""

    def download_checkpoint(self, run_id: str, name: str, dest: Path) -> Path | None:
        """No checkpoint."""
        return None

    def download_oof(self, run_id: str, dest: Path) -> Path:
        """Raises: this rank reads no store (rank 0 scores the out-of-fold files)."""
        raise RuntimeError(f"oof/ of run {run_id}: only rank 0 reads the tracking store")
