"""Cross-validation: data -> cache -> folds -> a tracked run per fold -> out-of-fold score.

``run_cross_validation`` opens (or adopts, or resumes) the parent run, trains every selected fold in its
own nested run (``train/fold.py``) and logs ``cv_score`` over all folds' out-of-fold files as stored. Its
steps are the ones the cross-validation shared by several workers (``train/shared_cv.py``) takes too:
:func:`load_cv_run` reads a run's configuration and folds, :func:`run_folds` keeps the FINISHED folds and
trains the others, :func:`score_cv` scores the stored out-of-fold files and logs ``cv_score``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from geopose_mlops.config import TrainConfig, load_json_config
from geopose_mlops.constants import CONFIG_JSON, DEFAULT_EXPERIMENT, FOLDS_CSV, FOLDS_FILE_TAG, INIT_FROM_TAG
from geopose_mlops.data.cache import SampleCache
from geopose_mlops.errors import ConfigError
from geopose_mlops.train import distributed, staged
from geopose_mlops.train.data import PreparedData, check_data_dir, prepare_data
from geopose_mlops.train.fold import EpochCallback, FoldRequest, FoldResult, train_fold
from geopose_mlops.train.local_copy import LocalFolder, local_folder
from geopose_mlops.train.oof import score_oof_folders
from geopose_mlops.train.recorder import EpochUploads as EpochUploads  # re-exported: tests/test_tracking.py
from geopose_mlops.train.recorder import RunOutcome
from geopose_mlops.train.tracker import NullTracker, Tracker


@dataclass
class CvResult:
    """One finished cross-validation: parent run id, out-of-fold scores, folds."""

    run_id: str
    cv_score: float
    city_scores: dict[str, float]
    folds: dict[int, FoldResult] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CvRequest:
    """One cross-validation to run: the arguments of :func:`run_cross_validation` but the experiment and device."""

    config: TrainConfig
    resume_run_id: str | None = None
    parent_run_id: str | None = None
    run_id: str | None = None
    tags: dict[str, str] | None = None
    on_epoch_end: EpochCallback | None = None
    cache_root: str | Path | None = None
    work_dir: str | Path | None = None
    progress: bool = True


def run_cross_validation(
    config: TrainConfig,
    experiment: str = DEFAULT_EXPERIMENT,
    resume_run_id: str | None = None,
    *,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_epoch_end: EpochCallback | None = None,
    cache_root: str | Path | None = None,
    work_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> CvResult:
    """Train and track one cross-validation (SPEC §3 ``train``, §4 runs).

    Args:
        config: What to train. On resume the run's own ``config.json`` is used instead.
        experiment: MLflow experiment name for a new run.
        resume_run_id: A cv run or one of its fold runs: finished folds are kept, unfinished ones
            continue from their ``last.pt``, missing ones start, all in the same runs.
        parent_run_id: Nest the cv run under this run (e.g. an Optuna study run).
        run_id: Use this existing run as the parent (default: ``MLFLOW_RUN_ID`` from ``mlflow run``,
            else a new run).
        tags: Extra tags of the parent run (e.g. ``{"geopose.kind": "trial"}``).
        on_epoch_end: ``(fold, epoch, metrics) -> None`` after each epoch; raising stops the run (the
            fold run is marked KILLED, the cv run FAILED) and the exception propagates.
        cache_root: Preprocessing cache folder (None: ``DATA/.geopose_cache``).
        work_dir: Local folder for checkpoints and OOF files, kept (None: a folder under the user cache,
            removed once the store holds everything in it; kept after a store failure for the resume:
            ``train/local_copy.py``).
        device: Where to train (None: CUDA if available, else CPU).
        progress: Show progress bars.

    Under ``torchrun --nproc-per-node N`` every rank calls this: the ranks train each fold together
    with DistributedDataParallel and rank 0 alone writes to MLflow (``train/distributed.py``).

    Returns:
        The parent run id, ``cv_score``, per-city scores and the folds' results.
    """
    from geopose_mlops.models.factory import validate_model_config
    from geopose_mlops.tracking.runs import CvTracker
    from geopose_mlops.tracking.store import check_tracking_store

    if not resume_run_id:  # bad arguments fail before any run exists
        check_data_dir(config.data_dir)
        validate_model_config(config.model)
    context = distributed.init_distributed(str(device) if device is not None else None)
    try:
        if context.is_main:
            check_tracking_store()
        request = CvRequest(
            config=config, resume_run_id=resume_run_id, parent_run_id=parent_run_id, run_id=run_id, tags=tags,
            on_epoch_end=on_epoch_end, cache_root=cache_root, work_dir=work_dir, progress=progress and context.is_main,
        )  # fmt: skip
        return _run_cross_validation(request, CvTracker(experiment) if context.is_main else NullTracker(), context)
    finally:
        distributed.cleanup_distributed(context)


def _run_cross_validation(request: CvRequest, tracker: Tracker, context: distributed.DistributedContext) -> CvResult:
    """Open the cv run, train its folds, score them and close it (on every rank; rank 0 tracks)."""
    from geopose_mlops.tracking.store import is_store_error, store_error

    tracker = distributed.main_rank_tracker(tracker, context)
    config, data, cv_run_id, existing = _open_cv_run(request, tracker, context)
    local = local_folder(request.work_dir)
    try:
        folds = run_folds(
            tracker, context, config=config, data=data, folds=config.fold_list(), cv_run_id=cv_run_id,
            local=local, existing=existing, on_epoch_end=request.on_epoch_end, progress=request.progress,
        )  # fmt: skip
        result = None
        if context.is_main:
            with tempfile.TemporaryDirectory(prefix="geopose-cv-") as tmp:
                result = score_cv(tracker, cv_run_id, folds, Path(tmp), data.cache)
        result = distributed.broadcast_from_main(result, context)
    except BaseException as err:
        if is_store_error(err):  # the store is down: closing the run would fail (after retries) too
            raise store_error(err, _left_open_message(request, config, cv_run_id, local)) from err
        outcome = RunOutcome.KILLED if isinstance(err, KeyboardInterrupt) else RunOutcome.FAILED
        tracker.end_run(cv_run_id, outcome.value)
        raise
    tracker.end_run(cv_run_id, RunOutcome.FINISHED.value)
    return result


def _left_open_message(request: CvRequest, config: TrainConfig, cv_run_id: str, local: LocalFolder) -> str:
    """What a store failure left: the open run, the folder of what the store lacks, and the resume command."""
    unsent = local.unsent_folds(cv_run_id)
    kept = (
        f"the checkpoints, metrics and OOF files the store lacks ({', '.join(unsent)}) are kept in "
        f"{local.root / cv_run_id}"
        if unsent
        else "the store holds every fold's records"
    )
    command = f"geopose-ml train --data-dir {config.data_dir} --resume {cv_run_id}"
    if request.work_dir is not None:
        command += f" --work-dir {request.work_dir}"
    if request.cache_root is not None:
        command += f" --cache-dir {request.cache_root}"
    return f"cv run {cv_run_id} is left open; {kept}. Once the store is back: {command}"


def _open_cv_run(
    request: CvRequest, tracker: Tracker, context: distributed.DistributedContext
) -> tuple[TrainConfig, PreparedData, str, dict[int, Any]]:
    """``(config, data, cv run id, fold runs by fold)``: a new or adopted cv run, or the one resumed.

    A new run is tagged with where its folds came from (``FOLDS_FILE_TAG``: the ``folds.csv`` used, or
    ``seeded k=K seed=S``).

    Raises:
        ConfigError: A selected fold has no images in the folds table, or ``DATA/folds.csv`` disagrees.
    """
    config, folds_table, existing, run_id = request.config, None, {}, request.run_id
    if request.resume_run_id:
        if context.is_main:
            run_id, _ = tracker.resume_target(request.resume_run_id)
            config, folds_table = load_cv_run(tracker, run_id)
            existing = tracker.fold_runs(run_id)
        run_id, config, folds_table, existing = distributed.broadcast_from_main(
            (run_id, config, folds_table, existing), context
        )
    if not context.is_main:
        distributed.barrier(context)  # rank 0 builds the cache first; the others then open it
    data = prepare_data(config, request.cache_root, folds_table)
    if context.is_main:
        distributed.barrier(context)
    missing = sorted(set(config.fold_list()) - set(data.folds_table["fold"]))
    if missing:
        raise ConfigError(f"folds {missing} have no images in the folds table (k={config.k})")
    tags = request.tags if request.resume_run_id else {**(request.tags or {}), FOLDS_FILE_TAG: data.folds_source}
    if config.init_from and not request.resume_run_id:  # a parent stage it cannot start from: before any run
        staged.check_init_from(tracker, config, data.folds_table, context)
        tags[INIT_FROM_TAG] = config.init_from
    cv_run_id = tracker.start_cv_run(config, data.cache.fingerprint, request.parent_run_id, run_id, tags)
    cv_run_id = distributed.broadcast_from_main(cv_run_id, context)
    if context.is_main:  # the data's true heights, stored once for every architecture (tracking/truth.py)
        from geopose_mlops.tracking.truth import store_truth

        store_truth(cv_run_id, data.cache)
    if not request.resume_run_id:
        tracker.log_config(cv_run_id, config)
        tracker.log_data(cv_run_id, data.folds_table, config.data_dir, data.cache.fingerprint)
        if data.skipped:
            tracker.log_skipped_files(cv_run_id, data.skipped)
    return config, data, cv_run_id, existing


def load_cv_run(tracker: Tracker, run_id: str) -> tuple[TrainConfig, pd.DataFrame]:
    """The configuration (``config.json``) and folds table (``folds.csv``) a cv run was started with.

    Raises:
        ConfigError: The run lacks one of them.
    """
    with tempfile.TemporaryDirectory(prefix="geopose-run-") as tmp:
        config = load_json_config(TrainConfig, tracker.download_artifact(run_id, CONFIG_JSON, Path(tmp)))
        folds_table = pd.read_csv(tracker.download_artifact(run_id, FOLDS_CSV, Path(tmp)))
    return config, folds_table


def finished_fold(run: Any) -> FoldResult:
    """The result of a FINISHED fold run (an ``mlflow.entities.Run``), from its logged summary."""
    metrics = run.data.metrics
    return FoldResult(run.info.run_id, metrics["best_val_score"], int(metrics["best_epoch"]))


def run_folds(
    tracker: Tracker,
    context: distributed.DistributedContext,
    *,
    config: TrainConfig,
    data: PreparedData,
    folds: Sequence[int],
    cv_run_id: str,
    local: LocalFolder,
    existing: Mapping[int, Any],
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> dict[int, FoldResult]:
    """Train ``folds`` of a cv run one after another: a FINISHED fold run is kept, any other resumed.

    After each fold, finished or not, its local folder is removed when it is the package's own and holds
    nothing the store lacks (``train/local_copy.py``); after a store failure it is kept for the resume.

    Args:
        tracker: The cv run's tracker.
        context: This process's place in a torchrun job.
        config: The cross-validation's configuration.
        data: Cache and folds.
        folds: The folds to train, in order.
        cv_run_id: The cv run.
        local: Where fold ``F``'s files go (``LocalFolder.fold_dir``), and whether they are removed.
        existing: The cv run's fold runs by fold (``Tracker.fold_runs``): FINISHED ones are kept, the
            others continue from their ``last.pt``; folds with none start a new run.
        on_epoch_end: ``(fold, epoch, metrics) -> None`` after each epoch; raising stops the run.
        progress: Show progress bars.

    Returns:
        Each fold's result, in the order of ``folds``.
    """
    results: dict[int, FoldResult] = {}
    for fold in folds:
        run = existing.get(fold)
        if run is not None and run.info.status == "FINISHED":
            results[fold] = finished_fold(run)
            continue
        request = FoldRequest(
            config=config, data=data, fold=fold, cv_run_id=cv_run_id, work_dir=local.fold_dir(cv_run_id, fold),
            fold_run_id=run.info.run_id if run is not None else None, on_epoch_end=on_epoch_end, progress=progress,
        )  # fmt: skip
        try:
            results[fold] = train_fold(request, tracker, context)
        finally:
            if context.is_main:  # the one rank that writes the files (and may still be storing them)
                local.remove_if_stored(cv_run_id, fold)
    return results


def score_cv(
    tracker: Tracker, cv_run_id: str, folds: Mapping[int, FoldResult], dest: Path, cache: SampleCache | None = None
) -> CvResult:
    """Score the folds' stored out-of-fold files together and log ``cv_score`` on the cv run.

    Args:
        tracker: The cv run's tracker (rank 0's).
        cv_run_id: The cv run.
        folds: Every fold's result, in fold order (their runs hold the ``oof/`` files).
        dest: Local folder the ``oof/`` files (and the truth set, where it is downloaded) go into.
        cache: The cache trained on here: the true heights are read from it when it holds the run's
            data, else from the data's truth set in the store (``tracking.truth.scoring_truth``).

    Returns:
        The cv run id, ``cv_score``, per-city scores and ``folds``.
    """
    oof_dirs = [tracker.download_oof(result.run_id, dest / f"fold_{fold}") for fold, result in folds.items()]
    from geopose_mlops.tracking.truth import scoring_truth

    scores = score_oof_folders(oof_dirs, scoring_truth(cv_run_id, oof_dirs, dest / "truth", cache))
    tracker.log_cv_scores(cv_run_id, scores)
    city_scores = {city: values["score"] for city, values in scores["cities"].items()}
    return CvResult(cv_run_id, scores["final_score"], city_scores, dict(folds))
