"""Staged training: a cross-validation whose folds start from another tracked cv run's fold ``best.pt``.

``train --init-from CV_RUN_ID`` (``TrainConfig.init_from``) trains the next stage of a recipe (the 1st
place's 896 px crops, then 1792 px crops at a lower learning rate; the 4th place's training with, then
without augmentation) with its own learning rate, crop and augmentation options. Before any run is made,
:func:`check_init_from` refuses (``ConfigError``, naming what differs) a parent whose folds table differs
from this run's or whose model (encoder, decoder, use_metadata) differs, or that lacks a FINISHED fold run
for a fold to train. Each new fold run then loads that fold's ``best.pt`` from the parent
(:func:`parent_weights`); the cv run is tagged ``geopose.init_from`` with the parent's id.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import BEST_NAME
from geopose_mlops.errors import ConfigError, DataError
from geopose_mlops.train import distributed
from geopose_mlops.train.averaging import StateDict
from geopose_mlops.train.checkpoint import config_from_checkpoint, load_checkpoint
from geopose_mlops.train.tracker import Tracker

MODEL_FIELDS = ("encoder", "decoder", "use_metadata")  # what must agree for the weights to load
SHOWN_DIFFERENCES = 5  # images named in a folds-table difference


def model_differences(parent: ModelConfig, child: ModelConfig) -> list[str]:
    """``"encoder resnet34 (parent) != resnet18"`` for each of ``MODEL_FIELDS`` that differs."""
    differences = []
    for name in MODEL_FIELDS:
        theirs, ours = getattr(parent, name), getattr(child, name)
        if (theirs.lower() != ours.lower()) if isinstance(theirs, str) else theirs != ours:
            differences.append(f"{name} {theirs} (parent) != {ours}")
    return differences


def folds_differences(parent: pd.DataFrame, child: pd.DataFrame) -> list[str]:
    """What differs between two folds tables (columns id, fold): images missing from either, or moved."""
    theirs = dict(zip(parent["id"].astype(str), parent["fold"].astype(int), strict=True))
    ours = dict(zip(child["id"].astype(str), child["fold"].astype(int), strict=True))
    differences = []
    only_theirs, only_ours = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    moved = sorted(i for i in set(theirs) & set(ours) if theirs[i] != ours[i])
    if only_theirs:
        differences.append(f"{len(only_theirs)} image(s) only in the parent's (e.g. {only_theirs[:SHOWN_DIFFERENCES]})")
    if only_ours:
        differences.append(f"{len(only_ours)} image(s) only in this run's (e.g. {only_ours[:SHOWN_DIFFERENCES]})")
    if moved:
        shown = [f"{i}: fold {theirs[i]} (parent) != {ours[i]}" for i in moved[:SHOWN_DIFFERENCES]]
        differences.append(f"{len(moved)} image(s) in another fold ({'; '.join(shown)})")
    return differences


def _check(tracker: Tracker, config: TrainConfig, folds_table: pd.DataFrame) -> None:
    """:func:`check_init_from` on the rank that reads the store."""
    from geopose_mlops.train.cv import load_cv_run

    parent = config.init_from
    try:
        parent_config, parent_folds = load_cv_run(tracker, parent)
    except ConfigError as err:
        raise ConfigError(f"--init-from {parent}: not a cv run with config.json and folds.csv ({err})") from err
    problems = model_differences(parent_config.model, config.model)
    problems += [f"folds table: {d}" for d in folds_differences(parent_folds, folds_table)]
    if problems:
        raise ConfigError(f"--init-from {parent}: the parent's model or folds differ: {'; '.join(problems)}")
    runs = tracker.fold_runs(parent)
    missing = [f for f in config.fold_list() if f not in runs or runs[f].info.status != "FINISHED"]
    if missing:
        raise ConfigError(
            f"--init-from {parent}: no FINISHED fold run for fold(s) {missing} in this experiment "
            f"(found {sorted(runs)}); stages of one chain share an experiment"
        )


def check_init_from(
    tracker: Tracker, config: TrainConfig, folds_table: pd.DataFrame, context: distributed.DistributedContext
) -> None:
    """Refuse a parent run this cross-validation cannot start from; called before any run is created.

    Rank 0 reads the parent's ``config.json``, ``folds.csv`` and fold runs; every rank raises the same error.

    Args:
        tracker: The cv run's tracker.
        config: This cross-validation (``config.init_from`` is the parent cv run's id).
        folds_table: This run's folds (columns id, city, fold).
        context: This process's place in a torchrun job.

    Raises:
        ConfigError: The parent is not a cv run, its model (encoder, decoder, use_metadata) or folds
            table differ (each difference named), or a fold to train has no FINISHED fold run there.
    """
    problem = None
    if context.is_main:
        try:
            _check(tracker, config, folds_table)
        except ConfigError as err:
            problem = str(err)
    problem = distributed.broadcast_from_main(problem, context)
    if problem:
        raise ConfigError(problem)


def parent_weights(tracker: Tracker, config: TrainConfig, fold: int, dest: Path) -> tuple[StateDict, str]:
    """``(weights, fold run id)`` of the parent's ``best.pt`` of ``fold`` (``config.init_from``).

    Raises:
        ConfigError: The parent has no fold run for ``fold``.
        DataError: Its ``best.pt`` is missing or unreadable, or holds another fold or model.
    """
    run = tracker.fold_runs(config.init_from).get(fold)
    if run is None:
        raise ConfigError(f"--init-from {config.init_from}: no fold run for fold {fold}")
    run_id = run.info.run_id
    path = tracker.download_checkpoint(run_id, BEST_NAME, dest)
    if path is None:
        raise DataError(dest, f"--init-from {config.init_from}: fold run {run_id} has no checkpoints/{BEST_NAME}")
    state = load_checkpoint(path)
    stored = config_from_checkpoint(state, path)
    problems = model_differences(stored.model, config.model)
    if int(state["fold"]) != fold:
        problems.append(f"fold {state['fold']} (parent) != {fold}")
    if problems:
        raise DataError(path, f"--init-from {config.init_from}: {'; '.join(problems)}")
    return state["model"], run_id
