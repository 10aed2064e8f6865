"""One fold of a cross-validation, trained, validated and tracked in its own nested run.

:func:`train_fold` reads as the template: build the fold (model, precision, optimiser, loss), open its
run (new, or resumed from ``last.pt``), build the loaders, run the epochs, close. Per epoch, in this
order: train, validate, write ``best.pt`` and ``oof/`` (when the score improved) and ``last.pt`` locally,
hand them to the :class:`~geopose_mlops.train.recorder.FoldRecorder` (which stores them in the
background), call ``on_epoch_end``. A run killed at any point resumes from the newer of the stored and the
local ``last.pt`` (``train/local_copy.py``) with no epoch missing from the log or logged twice: the epochs
and files kept locally that the store lacks are stored first, the store never holds a ``last.pt`` newer
than its metrics, epochs after it are trained again without being logged again, and the checkpoint
carries its own epoch's metrics (for runs stored by earlier versions, which uploaded the files first).

Validated and stored as ``best.pt``: the weights' moving average with ``ema``, else the weights. With
``keep_top`` K the average of the K best epochs is validated after the last epoch; ``best.pt`` is the
better of it and the best epoch, as the last epoch's ``best_is_top_k_average`` (0/1) and
``top_k_val_score`` say (``train/averaging.py``). A fold with no checkpoint of its own starts from the
parent stage's ``best.pt`` with ``init_from`` (``train/staged.py``); loss ``r2`` uses the city means of
the fold's training rows, logged as params.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from geopose_mlops.config import TrainConfig
from geopose_mlops.constants import BEST_NAME, LAST_NAME
from geopose_mlops.data.dataset import GeoposeDataset
from geopose_mlops.errors import ConfigError, GeoposeError
from geopose_mlops.models.losses import CityMeans
from geopose_mlops.train import distributed, loop, staged
from geopose_mlops.train.averaging import WeightAverages
from geopose_mlops.train.checkpoint import save_checkpoint
from geopose_mlops.train.data import PreparedData
from geopose_mlops.train.local_copy import kept_records, send_kept_records
from geopose_mlops.train.oof import OofPredictions
from geopose_mlops.train.recorder import FoldRecorder
from geopose_mlops.train.seeds import fold_seed, seed_epoch, seed_everything
from geopose_mlops.train.tracker import Tracker

# on_epoch_end(fold, epoch, metrics): called after each epoch; raise to stop the run.
EpochCallback = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True, kw_only=True)
class FoldRequest:
    """One fold to train.

    Attributes:
        config: The cross-validation's configuration.
        data: Cache and folds.
        fold: Fold to validate on (trained on all the others).
        cv_run_id: The parent run.
        work_dir: Local folder for this fold's checkpoints and OOF files.
        fold_run_id: An existing fold run to resume (None: a new run).
        on_epoch_end: Called as ``(fold, epoch, metrics)`` after each logged epoch; may raise to stop.
        progress: Show a progress bar over epochs.
    """

    config: TrainConfig
    data: PreparedData
    fold: int
    cv_run_id: str
    work_dir: Path
    fold_run_id: str | None = None
    on_epoch_end: EpochCallback | None = None
    progress: bool = True


@dataclass
class FoldResult:
    """One finished fold: its run, the score of its ``best.pt`` and the best single epoch.

    With ``keep_top`` the score may be that of the top-K average (then above the best epoch's).
    """

    run_id: str
    best_score: float
    best_epoch: int


@dataclass
class FoldModel:
    """What a fold trains: the model, its precision, optimiser and loss."""

    model: nn.Module  # the plain module: validation and checkpoints
    precision: loop.Precision
    optimizer: torch.optim.Optimizer
    loss_fn: loop.LossFn
    train_model: nn.Module  # what trains: ``model`` in DDP across ranks (once the run is open), else itself
    city_means: CityMeans | None = None  # the ``r2`` loss's, from the fold's training rows
    averages: WeightAverages = field(default_factory=WeightAverages)  # ``ema``, ``keep_top``: once the run is open

    @property
    def scored(self) -> nn.Module:
        """What is validated and stored as ``best.pt``: the moving average when on, else ``model``."""
        return self.averages.scored(self.model)


@dataclass(frozen=True)
class FoldLoaders:
    """What a fold trains and validates on, on this rank."""

    sampler: distributed.ShardedEpochSampler  # this rank's share of each epoch's seeded order
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader  # this rank's share of the validation images
    accumulation_steps: int  # micro-batches per optimiser step on each rank
    steps_per_epoch: int  # optimiser steps


@dataclass
class FoldProgress:
    """Where a fold stands: its run, the next epoch to train and the best so far."""

    run_id: str
    start_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    logged: set[int] = field(default_factory=set)  # epochs the store holds (on rank 0 of a resume)


def train_fold(
    request: FoldRequest, tracker: Tracker, context: distributed.DistributedContext | None = None
) -> FoldResult:
    """Train, validate and track one fold in its own nested run (new, or resumed from ``last.pt``).

    Args:
        request: The fold, its data and where its files go.
        tracker: A ``tracking.CvTracker``.
        context: This process's place in a torchrun job (None: a single process on CUDA if available).
            Each rank trains on its share of every optimiser step and validates its share of the
            images; rank 0 alone logs and writes checkpoints (``train/distributed.py``).

    Raises:
        GeoposeError: The fold has no training or validation images, or the loss became non-finite.
        ConfigError: A callback under torchrun, or an effective batch that does not split over the processes.
    """
    context = context or distributed.DistributedContext(device=distributed.default_device())
    tracker = distributed.main_rank_tracker(tracker, context)
    if context.enabled and request.on_epoch_end is not None:
        raise ConfigError("on_epoch_end (tuning) runs in one process per trial; start more tune workers instead")
    train_ids, val_ids, accumulation_steps = _split_fold(request, context)
    seed_everything(fold_seed(request.config.seed, request.fold))
    parts = _build_model(request, train_ids, context.device)
    progress = _open_fold_run(request, tracker, parts, context, train_ids)
    loaders = _build_loaders(request, train_ids, val_ids, accumulation_steps, context)
    config, fold = request.config, request.fold
    with FoldRecorder(tracker, progress.run_id, config, progress.logged) as recorder:
        epochs = range(progress.start_epoch, config.epochs)
        for epoch in tqdm(epochs, desc=f"fold {fold}", disable=not request.progress, unit="epoch"):
            metrics = _run_epoch(
                request, epoch, parts=parts, loaders=loaders, progress=progress, recorder=recorder, context=context
            )
            if request.on_epoch_end is not None:
                with recorder.stopping_means_killed():
                    recorder.wait()  # the callback (tuning) logs too: one writer at a time
                    request.on_epoch_end(fold, epoch, metrics)
        recorder.finish(progress.best_score, progress.best_epoch)
    return FoldResult(run_id=progress.run_id, best_score=progress.best_score, best_epoch=progress.best_epoch)


def _split_fold(request: FoldRequest, context: distributed.DistributedContext) -> tuple[list, list, int]:
    """``(training ids, validation ids, micro-batches per step on each rank)`` of the fold.

    Raises:
        GeoposeError: No training images, or fewer validation images than processes.
        ConfigError: The effective batch does not split evenly over the processes.
    """
    config, table = request.config, request.data.folds_table
    val_ids = table.loc[table["fold"] == request.fold, "id"].tolist()
    train_ids = table.loc[table["fold"] != request.fold, "id"].tolist()
    if len(val_ids) < context.world_size or not train_ids:
        raise GeoposeError(
            f"fold {request.fold}: {len(train_ids)} training and {len(val_ids)} validation images "
            f"(at least {context.world_size} needed, one per process)"
        )
    accumulation_steps = config.accumulation_steps // context.world_size
    if accumulation_steps * context.world_size != config.accumulation_steps:
        raise ConfigError(
            f"effective_batch_size={config.effective_batch_size} is not a multiple of batch_size={config.batch_size} "
            f"x {context.world_size} processes"
        )
    return train_ids, val_ids, accumulation_steps


def _build_model(request: FoldRequest, train_ids: list, device: torch.device) -> FoldModel:
    """The fold's model (on ``device``), precision, optimiser and loss (``r2``: the training rows' city means)."""
    from geopose_mlops.models import losses
    from geopose_mlops.models.factory import build_model

    config, cache = request.config, request.data.cache
    model = build_model(config.model).to(device, memory_format=loop.memory_format(device))
    precision = loop.make_precision(device, config.amp)
    optimizer = loop.build_optimizer(model, config.lr, config.weight_decay)
    means = None
    if config.loss == "r2":  # the training rows only: nothing of the validation fold leaks into the loss
        means = losses.city_means_from(cache.agl, cache.scale, cache.city_index, rows=cache.rows(train_ids))
    loss_fn = losses.build_loss(config.loss, city_means=means)
    return FoldModel(model, precision, optimizer, loss_fn, train_model=model, city_means=means)


def _open_fold_run(
    request: FoldRequest,
    tracker: Tracker,
    parts: FoldModel,
    context: distributed.DistributedContext,
    train_ids: list,
) -> FoldProgress:
    """Create the fold run, or reopen it and load its last checkpoint into ``parts``; where the fold stands.

    A fold without a checkpoint starts from the parent stage's ``best.pt`` (``init_from``, on rank 0), or
    else sets its outputs' units from its training rows (a checkpoint or a parent brings its own). Then
    ``parts.train_model`` is wrapped for DDP (which broadcasts rank 0's weights) and the weight averages
    start: from the checkpoint's, else from those weights.
    """
    resuming = request.fold_run_id is not None
    kept = kept_records(tracker, request.fold_run_id, request.work_dir) if resuming and context.is_main else None
    state = distributed.broadcast_from_main(kept.state if kept is not None else None, context)
    parent: dict[str, object] = {}
    if state is None and request.config.init_from and context.is_main:
        # Before the run's params: the parent's weights bring the output units they were trained with.
        weights, source = staged.parent_weights(tracker, request.config, request.fold, request.work_dir / "init")
        parts.model.load_state_dict(weights)
        parent = {"init_from_fold_run": source}
    elif state is None and not request.config.init_from:
        _set_output_units(parts.model, request.data.cache, train_ids)
    if request.fold_run_id is None:
        fingerprint, precision = request.data.cache.fingerprint, parts.precision.name
        height_unit, magnitude_unit = parts.model.pixel_head.unit.tolist()
        params = {"output_unit_agl_m": round(height_unit, 4), "output_unit_mag_px": round(magnitude_unit, 4)}
        params |= parts.city_means.as_params() if parts.city_means is not None else {}
        run_id = tracker.start_fold_run(
            request.cv_run_id, request.fold, request.config, fingerprint, precision, params={**params, **parent}
        )
        progress = FoldProgress(distributed.broadcast_from_main(run_id, context))
    else:
        progress = FoldProgress(request.fold_run_id)
        tracker.reopen(progress.run_id)
        if parent:  # a resumed fold that had no checkpoint of its own yet
            tracker.log_params(progress.run_id, parent)
    if kept is not None:  # the epochs and files kept locally that the store lacks (it failed mid-run)
        send_kept_records(tracker, progress.run_id, kept, request.work_dir)
    if state is not None:
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.precision.scaler.load_state_dict(state["scaler"])
        progress.start_epoch, progress.best_score = state["epoch"] + 1, state["best_score"]
        progress.best_epoch = state["best_epoch"]
    parts.train_model = distributed.wrap_model(parts.model, context)
    parts.averages = WeightAverages.start(parts.model, request.config.ema, request.config.keep_top, state)
    # On resume from an older last.pt, epochs after it were logged by the interrupted run: they are
    # trained again (same seeds) but not logged twice.
    if resuming and context.is_main:
        progress.logged = set(tracker.logged_epochs(progress.run_id))
    return progress


def _set_output_units(model: nn.Module, cache, train_ids: list) -> None:
    """Outputs in units of the training rows' spread: their RMS height (m) and magnitude (px)."""
    from geopose_mlops.models import losses

    model.pixel_head.set_units(*losses.output_units_from(cache.agl, cache.scale, rows=cache.rows(train_ids)))


def _build_loaders(
    request: FoldRequest,
    train_ids: list,
    val_ids: list,
    accumulation_steps: int,
    context: distributed.DistributedContext,
) -> FoldLoaders:
    """The training loader (this rank's share of every step) and validation loader (its share of the images)."""
    config, cache = request.config, request.data.cache
    augmentation = None
    if config.augment:
        from geopose_mlops.data.augment import build_train_augmentation

        augmentation = build_train_augmentation(crop_size=config.crop_size, height_warp_p=config.height_warp_p)
    train_set = GeoposeDataset(cache, cache.rows(train_ids), augmentation)
    seed = fold_seed(config.seed, request.fold)
    sampler = distributed.ShardedEpochSampler(len(train_set), seed, context, config.batch_size)
    train_loader = loop.make_loader(train_set, config.batch_size, config.num_workers, sampler)
    val_rows = cache.rows(val_ids)[distributed.shard_indices(len(val_ids), context)]
    val_loader = loop.make_loader(GeoposeDataset(cache, val_rows), config.batch_size, config.num_workers)
    steps_per_epoch = math.ceil(len(train_loader) / accumulation_steps)
    return FoldLoaders(sampler, train_loader, val_loader, accumulation_steps, steps_per_epoch)


@dataclass
class BestWeights:
    """New weights for ``best.pt`` and their validation predictions (None on ranks other than 0)."""

    module: nn.Module
    oof: OofPredictions | None


def _run_epoch(
    request: FoldRequest,
    epoch: int,
    *,
    parts: FoldModel,
    loaders: FoldLoaders,
    progress: FoldProgress,
    recorder: FoldRecorder,
    context: distributed.DistributedContext,
) -> dict[str, float]:
    """Train and validate one epoch (after the last, the top-K average too), write its checkpoints; its metrics."""
    start = time.perf_counter()
    loaders.sampler.set_epoch(epoch)
    seed_epoch(loaders.sampler.seed, epoch)
    result = _train_epoch(request, epoch, parts, loaders, progress)
    oof, metrics = _validate(parts.scored, loaders, parts.precision, context)
    mine = len(loaders.sampler)  # this rank's training images
    loss_sum, images = distributed.reduce_sum([result.train_loss * mine, mine], context)
    metrics.update(train_loss=loss_sum / images, lr=result.lr)
    best = None
    if progress.best_epoch < 0 or metrics["val_score"] > progress.best_score:
        progress.best_score, progress.best_epoch = metrics["val_score"], epoch
        best = BestWeights(parts.scored, oof)
    if parts.averages.top_k is not None:
        parts.averages.top_k.offer(epoch, metrics["val_score"], parts.scored.state_dict())
        if epoch == request.config.epochs - 1:
            best = _top_k_average(parts, loaders, progress, metrics, context) or best
    metrics["epoch_seconds"] = time.perf_counter() - start
    if context.is_main:  # the other ranks hold the same weights and no predictions to store
        recorder.wait()  # the files below are rewritten: the last epoch's upload must be done
        _write_checkpoints(request, epoch, metrics, parts=parts, progress=progress, recorder=recorder, best=best)
    return metrics


def _train_epoch(
    request: FoldRequest, epoch: int, parts: FoldModel, loaders: FoldLoaders, progress: FoldProgress
) -> loop.EpochResult:
    """One pass over this rank's training images; the moving average follows every optimiser step."""
    config = request.config
    total_steps = loaders.steps_per_epoch * config.epochs

    def lr_at_step(step: int) -> float:
        return loop.learning_rate(step, total_steps, config.lr)

    try:
        return loop.train_one_epoch(  # through the module: bench/bench_tracking.py wraps it
            parts.train_model,
            loaders.train,
            parts.optimizer,
            parts.loss_fn,
            parts.precision,
            loaders.accumulation_steps,
            lr_at_step,
            first_step=epoch * loaders.steps_per_epoch,
            epoch=epoch,
            on_step=parts.averages.on_step(parts.model),
        )
    except GeoposeError as err:
        kept = f"epoch {epoch - 1}" if epoch > 0 else "none yet"
        raise GeoposeError(f"fold {request.fold} (run {progress.run_id}): {err} Last good checkpoint: {kept}.") from err


def _validate(
    model: nn.Module, loaders: FoldLoaders, precision: loop.Precision, context: distributed.DistributedContext
) -> tuple[OofPredictions | None, dict[str, float]]:
    """Validate ``model`` on this rank's share: the predictions gathered on rank 0, the metrics on every rank."""
    oof = distributed.gather_oof(loop.predict_validation(model, loaders.val, precision), context)
    metrics = loop.validation_metrics(oof.score()) if context.is_main else None
    return oof, distributed.broadcast_from_main(metrics, context)  # every rank takes the same decisions


def _top_k_average(
    parts: FoldModel,
    loaders: FoldLoaders,
    progress: FoldProgress,
    metrics: dict[str, float],
    context: distributed.DistributedContext,
) -> BestWeights | None:
    """Validate the kept epochs' average weights (its score goes into ``metrics``); it, if it beats the best epoch."""
    averaged = parts.averages.top_k.average_model(parts.scored)
    oof, scores = _validate(averaged, loaders, parts.precision, context)
    wins = scores["val_score"] > progress.best_score
    metrics.update(top_k_val_score=scores["val_score"], best_is_top_k_average=float(wins))
    if not wins:
        return None
    progress.best_score = scores["val_score"]  # progress.best_epoch stays the best single epoch
    return BestWeights(averaged, oof)


def _write_checkpoints(
    request: FoldRequest,
    epoch: int,
    metrics: dict[str, float],
    *,
    parts: FoldModel,
    progress: FoldProgress,
    recorder: FoldRecorder,
    best: BestWeights | None,
) -> None:
    """Write ``last.pt`` (and ``best.pt`` and ``oof/`` from ``best``) and hand them to ``recorder``."""
    work_dir = request.work_dir
    progress_state = (request.config, request.fold, epoch, progress.best_score, progress.best_epoch)
    best_path = oof_dir = None
    if best is not None:
        # best.pt serves predictions and ensembles: weights only, a third of last.pt's size
        # (AdamW keeps two moments per weight). Resume reads last.pt.
        best_path = save_checkpoint(work_dir / BEST_NAME, best.module, None, None, *progress_state)
        oof_dir = best.oof.save(work_dir / "oof")
    extra = parts.averages.checkpoint_entries()  # resume continues the averages
    last = save_checkpoint(
        work_dir / LAST_NAME, parts.model, parts.optimizer, parts.precision.scaler, *progress_state, metrics, extra
    )
    recorder.record_epoch(epoch, metrics, last, best_path, oof_dir, summary=(progress.best_score, progress.best_epoch))
