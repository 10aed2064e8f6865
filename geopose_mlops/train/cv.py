"""Cross-validation: data -> cache -> folds -> a tracked run per fold -> out-of-fold score.

``run_cross_validation`` opens (or adopts, or resumes) the parent run, trains every selected fold in its
own nested run and logs ``cv_score`` over all folds' out-of-fold files as stored. ``train_fold`` is one
fold on its own, for callers (the tuner) that drive folds themselves. Per epoch, in this order: train,
validate, write ``best.pt`` and ``oof/`` (when the score improved) and ``last.pt`` locally, call
``on_epoch_end``. In a background thread while the next epoch trains, the epochs' metrics are logged
(at most every ``metrics_interval_s``) and then the files uploaded (when ``checkpoint_interval_s`` has
passed); both always when the fold ends or stops. A run killed at any point resumes from the stored
``last.pt`` with no epoch missing from the log or logged twice: the store never holds a ``last.pt``
newer than its metrics, epochs after it are trained again without being logged again, and the
checkpoint carries its own epoch's metrics (for runs stored by earlier versions, which uploaded the
files first).
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from geopose_mlops.config import TrainConfig, load_json_config
from geopose_mlops.constants import BEST_NAME, CONFIG_JSON, DEFAULT_EXPERIMENT, FOLDS_CSV, LAST_NAME
from geopose_mlops.data.cache import SampleCache, build_cache
from geopose_mlops.data.check import usable_samples
from geopose_mlops.data.dataset import GeoposeDataset
from geopose_mlops.data.folds import make_folds, read_folds
from geopose_mlops.errors import BadFilesError, ConfigError, DataError, GeoposeError
from geopose_mlops.train import distributed, loop
from geopose_mlops.train.checkpoint import load_checkpoint, save_checkpoint
from geopose_mlops.train.oof import score_oof_folders

# on_epoch_end(fold, epoch, metrics): called after each epoch; raise to stop the run.
EpochCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class PreparedData:
    """The samples decoded into the cache and their folds (a table with columns id, city, fold).

    Attributes:
        cache: The decoded samples.
        folds_table: Columns id, city, fold.
        skipped: ``(file, reason)`` of every bad file left out (``skip_bad``); empty otherwise.
    """

    cache: SampleCache
    folds_table: pd.DataFrame
    skipped: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class FoldResult:
    """One finished fold: its run, best validation score and epoch."""

    run_id: str
    best_score: float
    best_epoch: int


@dataclass
class CvResult:
    """One finished cross-validation: parent run id, out-of-fold scores, folds."""

    run_id: str
    cv_score: float
    city_scores: dict[str, float]
    folds: dict[int, FoldResult] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def folds_table_for(samples: list, data_dir: str | Path, k: int, seed: int) -> pd.DataFrame:
    """``DATA/folds.csv`` when it covers every sample with folds 0..k-1, else seeded stratified folds."""
    path = Path(data_dir) / FOLDS_CSV
    if path.is_file():
        folds = read_folds(path)
        if {s.sample_id for s in samples} <= set(folds) and set(folds.values()) == set(range(k)):
            rows = [(s.sample_id, s.city, folds[s.sample_id]) for s in samples]
            return pd.DataFrame(rows, columns=["id", "city", "fold"])
    return pd.DataFrame(make_folds(samples, k, seed), columns=["id", "city", "fold"])


def prepare_data(
    config: TrainConfig, cache_root: str | Path | None = None, folds_table: pd.DataFrame | None = None
) -> PreparedData:
    """Check the training samples, build or reuse their cache, and assign folds (unless given).

    Every bad file is found before anything is trained: the header check (``check.usable_samples``)
    names missing, empty, mis-sized and malformed files, and the cache build names every file that
    fails to decode. With ``config.skip_bad`` the samples they belong to are left out and listed in
    ``PreparedData.skipped``; otherwise nothing is trained.

    Raises:
        BadFilesError: Bad files and ``skip_bad`` off (every file named), or no good sample left.
        ConfigError: Fewer good samples than folds.
    """
    samples, problems = usable_samples(config.data_dir, "train")
    if folds_table is not None:  # a resumed run trains on the samples it started with
        wanted = set(folds_table["id"])
        missing = wanted - {s.sample_id for s in samples}
        samples = [s for s in samples if s.sample_id in wanted]
        problems += [
            (Path(config.data_dir), f"sample {m} of the run's folds.csv is bad or gone") for m in sorted(missing)
        ]
    try:
        cache = build_cache(samples, cache_root, config.image_size) if samples else None
    except BadFilesError as err:
        problems += err.problems
        cache = None
    if problems and not config.skip_bad:
        raise BadFilesError(config.data_dir, problems)
    if cache is None:
        bad_paths = {path for path, _ in problems}
        samples = [s for s in samples if not bad_paths & {s.rgb_path, s.agl_path, s.vflow_path}]
        if not samples:
            raise BadFilesError(config.data_dir, problems or [(Path(config.data_dir), "no samples")])
        cache = build_cache(samples, cache_root, config.image_size)
    if folds_table is None:
        try:
            folds_table = folds_table_for(samples, config.data_dir, config.k, config.seed)
        except ValueError as err:
            raise ConfigError(f"k={config.k}: {err} (after leaving out {len(problems)} bad file(s))") from err
    return PreparedData(cache=cache, folds_table=folds_table, skipped=problems)


def _resume_state(tracker, run_id: str, local_dir: Path) -> dict | None:
    """The last checkpoint of a fold run: its artifact, else the local copy; None if neither exists.

    A process killed while it copied ``last.pt`` into a local artifact store can leave that copy cut
    short; the local checkpoint (written atomically) is then used instead.

    Raises:
        DataError: Checkpoints exist but none can be read (each is named).
    """
    candidates = [tracker.download_checkpoint(run_id, LAST_NAME, local_dir / "download"), local_dir / LAST_NAME]
    errors = []
    for path in candidates:
        if path is None or not Path(path).is_file():
            continue
        try:
            return load_checkpoint(path)
        except DataError as err:
            errors.append(str(err))
    if errors:
        raise DataError(local_dir, f"fold run {run_id}: no readable last checkpoint ({'; '.join(errors)})")
    return None


@dataclass
class UnsentFiles:
    """Checkpoint files written locally since the last upload (None: nothing new of that kind)."""

    best: Path | None = None
    oof: Path | None = None
    last: Path | None = None

    def take(self) -> UnsentFiles:
        """Return the pending files and forget them."""
        taken = UnsentFiles(self.best, self.oof, self.last)
        self.best = self.oof = self.last = None
        return taken


def _store_records(tracker, run_id: str, epochs: list[tuple[int, dict]], files: UnsentFiles) -> None:
    """Store epoch metrics, then ``best.pt`` and ``oof/``, then ``last.pt``.

    The store so never holds a ``last.pt`` newer than its logged metrics or its ``best.pt``: a resume
    from the stored ``last.pt`` finds every epoch up to it logged (and retrains the later ones it finds
    logged without logging them again).
    """
    if epochs:
        tracker.log_epochs(run_id, epochs)
    if files.best is not None:
        tracker.log_checkpoint(run_id, files.best)
    if files.oof is not None:
        tracker.log_oof(run_id, files.oof)
    if files.last is not None:
        tracker.log_checkpoint(run_id, files.last)


class EpochUploads:
    """Uploads one epoch's checkpoints and metrics in a background thread while the next epoch trains.

    Checkpoints of a ResNet U-Net with optimizer state are ~170 MB; copying two of them per epoch into
    the artifact store in the training thread cost more than half of a small model's epoch. One task
    runs at a time, in order; ``wait`` re-raises a failed upload so it is never silently lost, and
    after a failure nothing more is stored (a later checkpoint must not land past unlogged epochs).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geopose-upload")
        self._pending: Future | None = None
        self._failed = False

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Start ``fn(*args)`` after the previous upload has finished (nothing once one has failed)."""
        self.wait()
        if not self._failed:
            self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Block until the pending upload is done; raise its error, if any."""
        pending = self._pending
        if pending is None:
            return
        error = pending.exception()  # blocks; a signal arriving here leaves the task pending, not failed
        self._pending = None
        if error is not None:
            self._failed = True
            raise error

    def close(self) -> None:
        """Finish the pending upload (raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def train_fold(
    config: TrainConfig,
    data: PreparedData,
    fold: int,
    tracker,
    cv_run_id: str,
    work_dir: Path,
    fold_run_id: str | None = None,
    device: torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    context: distributed.DistributedContext | None = None,
) -> FoldResult:
    """Train, validate and track one fold in its own nested run (new, or resumed from ``last.pt``).

    Args:
        config: The cross-validation's configuration.
        data: Cache and folds.
        fold: Fold to validate on (trained on all the others).
        tracker: A ``tracking.CvTracker``.
        cv_run_id: The parent run.
        work_dir: Local folder for this fold's checkpoints and OOF files.
        fold_run_id: An existing fold run to resume (None: a new run).
        device: Where to train (None: CUDA if available).
        on_epoch_end: Called as ``(fold, epoch, metrics)`` after each logged epoch; may raise to stop.
        progress: Show a progress bar over epochs.
        context: This process's place in a torchrun job (None: a single process on ``device``). Each
            rank trains on its share of every optimiser step and validates its share of the images;
            rank 0 alone logs and writes checkpoints (``train/distributed.py``).

    Raises:
        GeoposeError: The fold has no training or validation images, or the loss became non-finite.
    """
    from geopose_mlops.models.factory import build_model
    from geopose_mlops.models.losses import build_loss
    from geopose_mlops.tracking.store import is_store_error

    context = context or distributed.DistributedContext(device=device or default_device())
    device = context.device
    tracker = distributed.MainRankTracker(tracker, context)
    if context.enabled and on_epoch_end is not None:
        raise ConfigError("on_epoch_end (tuning) runs in one process per trial; start more tune workers instead")
    work_dir = Path(work_dir)
    table = data.folds_table
    val_ids = table.loc[table["fold"] == fold, "id"].tolist()
    train_ids = table.loc[table["fold"] != fold, "id"].tolist()
    if len(val_ids) < context.world_size or not train_ids:
        raise GeoposeError(
            f"fold {fold}: {len(train_ids)} training and {len(val_ids)} validation images "
            f"(at least {context.world_size} needed, one per process)"
        )
    accumulation_steps = config.accumulation_steps // context.world_size
    if accumulation_steps * context.world_size != config.accumulation_steps:
        raise ConfigError(
            f"effective_batch_size={config.effective_batch_size} is not a multiple of batch_size={config.batch_size} "
            f"x {context.world_size} processes"
        )
    seed_everything(config.seed * 1000 + fold)
    model = build_model(config.model).to(device, memory_format=loop.memory_format(device))
    precision = loop.make_precision(device, config.amp)
    optimizer = loop.build_optimizer(model, config.lr, config.weight_decay)
    loss_fn = build_loss(config.loss)
    start_epoch, best_score, best_epoch = 0, -math.inf, -1
    resuming = fold_run_id is not None
    state = _resume_state(tracker, fold_run_id, work_dir) if resuming and context.is_main else None
    state = distributed.broadcast_from_main(state, context)
    if fold_run_id is None:
        fold_run_id = tracker.start_fold_run(cv_run_id, fold, config, data.cache.fingerprint, precision.name)
        fold_run_id = distributed.broadcast_from_main(fold_run_id, context)
    else:
        tracker.reopen(fold_run_id)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        precision.scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        if context.is_main and state["epoch"] not in tracker.logged_epochs(fold_run_id):
            tracker.log_epoch(fold_run_id, state["epoch"], state["metrics"])
    train_model = distributed.wrap_model(model, context)  # DDP across ranks; ``model`` itself otherwise

    augmentation = None
    if config.augment:
        from geopose_mlops.data.augment import build_train_augmentation

        augmentation = build_train_augmentation(crop_size=config.crop_size)
    train_set = GeoposeDataset(data.cache, data.cache.rows(train_ids), augmentation)
    sampler = distributed.ShardedEpochSampler(len(train_set), config.seed * 1000 + fold, context, config.batch_size)
    train_loader = loop.make_loader(train_set, config.batch_size, config.num_workers, sampler)
    val_rows = data.cache.rows(val_ids)[distributed.shard_indices(len(val_ids), context)]
    val_loader = loop.make_loader(GeoposeDataset(data.cache, val_rows), config.batch_size, config.num_workers)
    steps_per_epoch = math.ceil(len(train_loader) / accumulation_steps)
    total_steps = steps_per_epoch * config.epochs

    def lr_at_step(step: int) -> float:
        return loop.learning_rate(step, total_steps, config.lr)

    status = "FAILED"
    uploads = EpochUploads()
    unsent = UnsentFiles()
    # On resume from an older last.pt, epochs after it were logged by the interrupted run: they are
    # trained again (same seeds) but not logged twice.
    logged = set(tracker.logged_epochs(fold_run_id)) if resuming and context.is_main else set()
    unlogged: list[tuple[int, dict]] = []  # (epoch, metrics) not yet handed to the store
    last_upload = last_metrics = time.monotonic()
    try:
        epochs = range(start_epoch, config.epochs)
        for epoch in tqdm(epochs, desc=f"fold {fold}", disable=not progress, unit="epoch"):
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            try:
                result = loop.train_one_epoch(
                    train_model,
                    train_loader,
                    optimizer,
                    loss_fn,
                    precision,
                    accumulation_steps,
                    lr_at_step,
                    first_step=epoch * steps_per_epoch,
                    epoch=epoch,
                )
            except GeoposeError as err:
                kept = f"epoch {epoch - 1}" if epoch > 0 else "none yet"
                raise GeoposeError(f"fold {fold} (run {fold_run_id}): {err} Last good checkpoint: {kept}.") from err
            oof = distributed.gather_oof(loop.predict_validation(model, val_loader, precision), context)
            metrics = loop.validation_metrics(oof.score()) if context.is_main else None
            metrics = distributed.broadcast_from_main(metrics, context)  # every rank takes the same decisions
            loss_sum, images = distributed.reduce_sum([result.train_loss * len(sampler), len(sampler)], context)
            metrics.update(train_loss=loss_sum / images, lr=result.lr)
            improved = best_epoch < 0 or metrics["val_score"] > best_score
            if improved:
                best_score, best_epoch = metrics["val_score"], epoch
            metrics["epoch_seconds"] = time.perf_counter() - start
            if context.is_main:  # the other ranks hold the same weights and no predictions to store
                uploads.wait()  # the files below are rewritten: the last epoch's upload must be done
                progress_state = (config, fold, epoch, best_score, best_epoch)
                if improved:
                    # best.pt serves predictions and ensembles: weights only, a third of last.pt's size
                    # (AdamW keeps two moments per weight). Resume reads last.pt.
                    unsent.best = save_checkpoint(work_dir / BEST_NAME, model, None, None, *progress_state)
                    unsent.oof = oof.save(work_dir / "oof")
                unsent.last = save_checkpoint(
                    work_dir / LAST_NAME, model, optimizer, precision.scaler, *progress_state, metrics
                )
                if epoch not in logged:
                    unlogged.append((epoch, metrics))
                # Checkpoints are large (a ResNet U-Net with AdamW state: ~170 MB): upload them every
                # checkpoint_interval_s and after the last epoch, not after every short epoch. Metrics
                # go at most every metrics_interval_s, and always with the checkpoints.
                now = time.monotonic()
                files_due = epoch == config.epochs - 1 or now - last_upload >= config.checkpoint_interval_s
                if files_due or now - last_metrics >= config.metrics_interval_s:
                    files = unsent.take() if files_due else UnsentFiles()
                    uploads.submit(_store_records, tracker, fold_run_id, unlogged, files)
                    unlogged, last_metrics = [], now
                    if files_due:
                        last_upload = now
            status = "KILLED"  # an exception from the callback is the caller's decision to stop
            if on_epoch_end is not None:
                uploads.wait()  # the callback (tuning) logs too: one writer at a time
                on_epoch_end(fold, epoch, metrics)
            status = "FAILED"
        uploads.wait()
        tracker.log_fold_summary(fold_run_id, best_score, best_epoch)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        if is_store_error(err):
            status = ""  # the store is down: the run stays RUNNING until it is resumed
        raise
    finally:
        try:
            if status != "FINISHED" and status and (unlogged or unsent.last is not None):
                # stopped early (error, signal, pruning): keep the epochs and the last good checkpoint
                uploads.submit(_store_records, tracker, fold_run_id, unlogged, unsent.take())
            uploads.close()
        finally:
            if status:
                tracker.end_run(fold_run_id, status)
    return FoldResult(run_id=fold_run_id, best_score=best_score, best_epoch=best_epoch)


def run_cross_validation(
    config: TrainConfig,
    experiment: str = DEFAULT_EXPERIMENT,
    resume_run_id: str | None = None,
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
        work_dir: Local folder for checkpoints and OOF files (None: a temporary folder, removed after).
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

    if not resume_run_id:
        validate_model_config(config.model)  # an unknown encoder fails before any run exists
    context = distributed.init_distributed(str(device) if device is not None else None)
    try:
        if context.is_main:
            check_tracking_store()
        return _run_cross_validation(
            config, experiment, resume_run_id, parent_run_id, run_id, tags, on_epoch_end, cache_root, work_dir,
            progress and context.is_main, context, CvTracker(experiment) if context.is_main else None,
        )  # fmt: skip
    finally:
        distributed.cleanup_distributed(context)


def _run_cross_validation(
    config: TrainConfig,
    experiment: str,
    resume_run_id: str | None,
    parent_run_id: str | None,
    run_id: str | None,
    tags: dict[str, str] | None,
    on_epoch_end: EpochCallback | None,
    cache_root: str | Path | None,
    work_dir: str | Path | None,
    progress: bool,
    context: distributed.DistributedContext,
    tracker,
) -> CvResult:
    from geopose_mlops.tracking.store import is_store_error, store_error

    tracker = distributed.MainRankTracker(tracker, context)
    folds_table = None
    existing: dict = {}
    if resume_run_id:
        if context.is_main:
            run_id, _ = tracker.resume_target(resume_run_id)
            config = load_json_config(TrainConfig, tracker.download_artifact(run_id, CONFIG_JSON))
            folds_table = pd.read_csv(tracker.download_artifact(run_id, FOLDS_CSV))
            existing = tracker.fold_runs(run_id)
        run_id, config, folds_table, existing = distributed.broadcast_from_main(
            (run_id, config, folds_table, existing), context
        )
    if not context.is_main:
        distributed.barrier(context)  # rank 0 builds the cache first; the others then open it
    data = prepare_data(config, cache_root, folds_table)
    if context.is_main:
        distributed.barrier(context)
    missing = sorted(set(config.fold_list()) - set(data.folds_table["fold"]))
    if missing:
        raise ConfigError(f"folds {missing} have no images in the folds table (k={config.k})")
    cv_run_id = tracker.start_cv_run(config, data.cache.fingerprint, parent_run_id, run_id, tags)
    cv_run_id = distributed.broadcast_from_main(cv_run_id, context)
    if not resume_run_id:
        tracker.log_config(cv_run_id, config)
        tracker.log_data(cv_run_id, data.folds_table, config.data_dir, data.cache.fingerprint)
        if data.skipped:
            tracker.log_skipped_files(cv_run_id, data.skipped)
    with tempfile.TemporaryDirectory(prefix="geopose-cv-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        results: dict[int, FoldResult] = {}
        try:
            for fold in config.fold_list():
                run = existing.get(fold)
                if run is not None and run.info.status == "FINISHED":
                    results[fold] = FoldResult(
                        run.info.run_id, run.data.metrics["best_val_score"], int(run.data.metrics["best_epoch"])
                    )
                    continue
                results[fold] = train_fold(
                    config,
                    data,
                    fold,
                    tracker,
                    cv_run_id,
                    root / cv_run_id / f"fold_{fold}",
                    fold_run_id=run.info.run_id if run is not None else None,
                    on_epoch_end=on_epoch_end,
                    progress=progress,
                    context=context,
                )
            scores = None
            if context.is_main:
                oof_dirs = [tracker.download_oof(r.run_id, Path(tmp) / "oof" / f"fold_{f}") for f, r in results.items()]
                scores = score_oof_folders(oof_dirs)
                tracker.log_cv_scores(cv_run_id, scores)
            scores = distributed.broadcast_from_main(scores, context)
        except BaseException as err:
            if is_store_error(err):  # the store is down: closing the run would fail (after retries) too
                kept = (
                    f"local checkpoints are in {root / cv_run_id}"
                    if work_dir is not None
                    else ("no local copy was kept (use --work-dir)")
                )
                raise store_error(
                    err,
                    f"cv run {cv_run_id} is left open; {kept}. Once the store is back: "
                    f"geopose-ml train --data-dir {config.data_dir} --resume {cv_run_id}",
                ) from err
            tracker.end_run(cv_run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
    tracker.end_run(cv_run_id, "FINISHED")
    city_scores = {city: values["score"] for city, values in scores["cities"].items()}
    return CvResult(cv_run_id, scores["final_score"], city_scores, results)
