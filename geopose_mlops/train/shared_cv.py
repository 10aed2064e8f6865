"""One cross-validation shared by several machines: each worker trains some folds under one cv run.

1. ``geopose-ml cv start --data-dir DATA [train options]`` creates the cv run (params, ``config.json``,
   ``folds.csv``) on the shared tracking server, leaves it RUNNING and prints its id.
2. On each machine: ``geopose-ml train --data-dir DATA --parent-run-id RUN --folds F``. The worker takes
   the configuration and the fold assignment from the run (so every machine trains the same
   cross-validation; only ``--data-dir``, the cache, ``--work-dir``, the device and how the machine
   loads and stores (``--num-workers``, ``--checkpoint-interval``, ``--metrics-interval``) are local;
   any other training option given must equal the run's), and trains fold ``F`` in its own nested fold
   run. A fold whose run FAILED or was KILLED is resumed from its ``last.pt``.
3. The worker that finishes the last fold computes the parent's ``cv_score`` from every fold's ``oof/``
   artifacts and closes the cv run (automatic). Each worker closes its own fold run *before* it looks
   at the others, so of two workers finishing together at least one sees every fold finished; if both
   do, both log the same value. ``geopose-ml cv finalize RUN`` does the same by hand (for instance
   after a fold was re-run) and names the folds still missing.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import DEFAULT_EXPERIMENT, FOLDS_FILE_TAG, INIT_FROM_TAG
from geopose_mlops.errors import ConfigError, DataError, GeoposeError
from geopose_mlops.train.cv import CvResult, finished_fold, load_cv_run, run_folds, score_cv
from geopose_mlops.train.data import check_data_dir, prepare_data
from geopose_mlops.train.distributed import DistributedContext, default_device
from geopose_mlops.train.fold import FoldResult
from geopose_mlops.train.local_copy import local_folder
from geopose_mlops.train.recorder import RunOutcome
from geopose_mlops.train.staged import check_init_from
from geopose_mlops.train.tracker import Tracker

SHARED_TAG = "geopose.shared_cv"  # "true" on a cv run whose folds are trained by separate workers
# TrainConfig fields a worker may set for itself: how this machine loads data and stores records, not
# what is trained.
LOCAL_OPTIONS = ("num_workers", "checkpoint_interval_s", "metrics_interval_s")
MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(ModelConfig))


@dataclass
class WorkerResult:
    """What one fold worker did: the folds it trained (or found finished) and, if it was the last, the cv."""

    cv_run_id: str
    folds: dict[int, FoldResult] = field(default_factory=dict)
    cv: CvResult | None = None


def start_shared_cv(
    config: TrainConfig, experiment: str = DEFAULT_EXPERIMENT, cache_root: str | Path | None = None
) -> str:
    """Create the cv run that fold workers join; returns its id (the run stays RUNNING).

    Args:
        config: The cross-validation to run (``folds`` says which folds make it complete).
        experiment: MLflow experiment name.
        cache_root: Preprocessing cache folder (None: ``DATA/.geopose_cache``).
    """
    from geopose_mlops.tracking.runs import CvTracker
    from geopose_mlops.tracking.truth import store_truth

    check_data_dir(config.data_dir)
    tracker = CvTracker(experiment)
    data = prepare_data(config, cache_root)
    tags = {SHARED_TAG: "true", FOLDS_FILE_TAG: data.folds_source}
    if config.init_from:  # a parent stage it cannot start from: before any run
        check_init_from(tracker, config, data.folds_table, DistributedContext())
        tags[INIT_FROM_TAG] = config.init_from
    run_id = tracker.start_cv_run(config, data.cache.fingerprint, tags=tags)
    tracker.log_config(run_id, config)
    tracker.log_data(run_id, data.folds_table, config.data_dir, data.cache.fingerprint)
    store_truth(run_id, data.cache)  # the true heights the folds are scored against, once per data
    return run_id


def _load_shared(tracker: Tracker, cv_run_id: str) -> tuple[TrainConfig, pd.DataFrame]:
    """The cv run's configuration and folds table (``load_cv_run``), refusing the id of a fold run."""
    target, fold = tracker.resume_target(cv_run_id)
    if fold is not None:
        raise ConfigError(f"--parent-run-id {cv_run_id} is the run of fold {fold}; give its cv run {target}")
    return load_cv_run(tracker, cv_run_id)


def option_value(config: TrainConfig, name: str) -> object:
    """The value of training option ``name`` (a ``TrainConfig`` or ``ModelConfig`` field) in ``config``."""
    return getattr(config.model if name in MODEL_OPTIONS else config, name)


def worker_config(config: TrainConfig, cv_run_id: str, options: Mapping[str, object]) -> TrainConfig:
    """The cv run's configuration with this worker's local options (``LOCAL_OPTIONS``) applied.

    Args:
        config: The cv run's own configuration.
        cv_run_id: The cv run (for the message).
        options: Training options given to this worker, by ``TrainConfig`` (or ``ModelConfig``) field name.

    Raises:
        ConfigError: A given option that decides what is trained differs from the run's (all are named):
            every fold of one cross-validation trains the same way.
    """
    differing = []
    for name, value in options.items():
        if name in LOCAL_OPTIONS:
            continue
        stored = option_value(config, name)
        if value != stored:
            differing.append(f"{name} {value!r} (the run's: {stored!r})")
    if differing:
        raise ConfigError(
            f"cv run {cv_run_id} trains every fold with its own configuration; given here: {', '.join(differing)}. "
            "Drop these options, or start another cv run (geopose-ml cv start) to train differently"
        )
    return dataclasses.replace(config, **{k: v for k, v in options.items() if k in LOCAL_OPTIONS})


def run_fold_worker(
    cv_run_id: str,
    folds: list[int],
    data_dir: str | Path | None = None,
    cache_root: str | Path | None = None,
    work_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    options: Mapping[str, object] | None = None,
) -> WorkerResult:
    """Train ``folds`` of an existing cv run on this machine; the last worker scores the cv.

    Args:
        cv_run_id: The cv run made by :func:`start_shared_cv` (on the tracking server all workers use).
        folds: The folds this worker trains.
        data_dir: This machine's copy of the data set (None: the path stored in the run's config).
        cache_root: Preprocessing cache folder (None: ``DATA/.geopose_cache``).
        work_dir: Local folder for checkpoints and OOF files, kept (None: a folder under the user cache,
            removed once the store holds everything in it: ``train/local_copy.py``).
        device: ``cuda``/``cpu`` (None: CUDA if available).
        progress: Show progress bars.
        options: Training options given to this worker (see :func:`worker_config`): local ones are
            applied, the others must equal the run's.

    Raises:
        ConfigError: The run is not a cv run, a fold is outside the run's folds, another worker's run of
            that fold is still RUNNING, or a given option differs from the run's.
        DataError: The local data set lacks images listed in the run's ``folds.csv``.
    """
    import torch

    from geopose_mlops.tracking.runs import CvTracker

    if data_dir is not None:
        check_data_dir(data_dir)
    tracker = CvTracker()
    config, folds_table = _load_shared(tracker, cv_run_id)
    config = worker_config(config, cv_run_id, options or {})
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=str(data_dir))
    outside = sorted(set(folds) - set(config.fold_list()))
    if outside:
        raise ConfigError(f"folds {outside} are not part of cv run {cv_run_id} (its folds: {config.fold_list()})")
    existing = tracker.fold_runs(cv_run_id)
    busy = {f: existing[f].info.run_id for f in folds if f in existing and existing[f].info.status == "RUNNING"}
    if busy:
        raise ConfigError(
            f"fold(s) {sorted(busy)} of cv run {cv_run_id} are being trained by run(s) {sorted(busy.values())}; "
            "if that worker died, resume its fold with `geopose-ml train --resume RUN_ID`"
        )
    data = prepare_data(config, cache_root, folds_table)
    absent = sorted(set(folds_table["id"]) - set(data.cache.ids))
    if absent:
        raise DataError(config.data_dir, f"{len(absent)} image(s) of cv run {cv_run_id} not found here: {absent[:5]}")
    context = DistributedContext(device=torch.device(device) if device else default_device())
    trained = run_folds(
        tracker, context, config=config, data=data, folds=folds, cv_run_id=cv_run_id, local=local_folder(work_dir),
        existing=existing, progress=progress,
    )  # fmt: skip
    return WorkerResult(cv_run_id, trained, finalize_cv(cv_run_id, require_complete=False))


def finalize_cv(cv_run_id: str, require_complete: bool = True) -> CvResult | None:
    """Log the cv run's ``cv_score`` over every fold's OOF artifacts and close it, once all folds finished.

    Args:
        cv_run_id: The cv run.
        require_complete: Raise when a fold is missing (else return None and leave the run open).

    Returns:
        The cv's scores, or None when folds are still missing and ``require_complete`` is False.

    Raises:
        GeoposeError: ``require_complete`` and some folds have no FINISHED run (they are named).
    """
    from geopose_mlops.tracking.runs import CvTracker

    tracker = CvTracker()
    config, _ = _load_shared(tracker, cv_run_id)
    runs = tracker.fold_runs(cv_run_id)
    missing = {f: runs[f].info.status if f in runs else "no run" for f in config.fold_list()}
    missing = {f: status for f, status in missing.items() if status != "FINISHED"}
    if missing:
        if require_complete:
            listed = ", ".join(f"fold {f}: {status}" for f, status in sorted(missing.items()))
            raise GeoposeError(f"cv run {cv_run_id} is not complete ({listed})")
        return None
    folds = {f: finished_fold(runs[f]) for f in config.fold_list()}
    with tempfile.TemporaryDirectory(prefix="geopose-oof-") as tmp:
        result = score_cv(tracker, cv_run_id, folds, Path(tmp))
    tracker.end_run(cv_run_id, RunOutcome.FINISHED.value)
    return result
