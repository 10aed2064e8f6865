"""Optuna studies over the learning rate and effective batch size (SPEC §3 ``tune``, §4 study/trial runs).

A study is a YAML file under ``studies/`` (see ``studies/lr_batch.yaml``) loaded into a frozen
``StudyConfig`` (``study_config``). Running the same file again resumes the study (``load_if_exists``): new trials join
the old ones in the Optuna storage and, in MLflow, under the same ``study`` run.

Each trial is one cross-validation (``train.cv.run_cross_validation``) whose top run is a ``trial`` run
nested under the study run. Every epoch the trial reports the fold's ``val_score`` to Optuna and asks
whether to stop (``trial.report`` + ``should_prune``); a pruned trial's run is tagged as such.

Storage and parallel workers: the storage is an ``RDBStorage`` with a heartbeat, so a worker killed
mid-trial leaves its trial RUNNING only until ``grace_period`` seconds pass without a heartbeat; the next
worker to start a trial then marks it FAILED, closes its MLflow trial run as FAILED, and
``RetryHeartbeatStaleTrialCallback`` queues a copy of it (up to ``max_retry`` times; when the copy starts
it closes the dead run too, in case it was left RUNNING). Each trial records the worker that runs it
(user attribute ``worker``, ``host:pid``). A trial stopped by SIGTERM or Ctrl-C fails and its point is
queued again, so the next ``tune`` runs it first.
SQLite (the default, a file beside the study YAML) is meant for one process at a time: it locks the
whole database file on every write, so concurrent workers wait on each other (the busy timeout below
makes them wait instead of failing) and a network file system can corrupt it. For real parallel use,
point every worker at one PostgreSQL database::

    geopose-ml tune studies/lr_batch.yaml --storage postgresql://user:password@host:5432/optuna

Every MLflow call lives in ``tracking/studies.py`` (``StudyTracker``); this module only talks to Optuna.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna

from geopose_mlops.config import TrainConfig, flatten
from geopose_mlops.errors import ConfigError, GeoposeError
from geopose_mlops.tracking.studies import StudyTracker
from geopose_mlops.tune.storage import build_storage, redact
from geopose_mlops.tune.study_file import PrunerConfig, SamplerConfig, SearchSpace, StudyConfig, load_study_config

__all__ = [
    "StudyConfig",
    "build_pruner",
    "build_sampler",
    "describe_study",
    "load_study_config",
    "micro_batch_size",
    "run_study",
    "suggest_hyperparameters",
    "trial_train_config",
]


def micro_batch_size(effective_batch_size: int, max_micro_batch: int) -> int:
    """The largest divisor of ``effective_batch_size`` that is <= ``max_micro_batch``.

    The micro-batch is what goes through the model at once; ``effective / micro`` micro-batches are
    accumulated per optimiser step, so the effective batch is reached exactly.
    """
    if effective_batch_size < 1 or max_micro_batch < 1:
        raise ConfigError(f"batch sizes must be >= 1, got {effective_batch_size} and {max_micro_batch}")
    return max(d for d in range(1, min(effective_batch_size, max_micro_batch) + 1) if effective_batch_size % d == 0)


def suggest_hyperparameters(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Sample one point of the search space (every ``suggest_*`` call of a study lives here).

    Returns:
        ``{"lr": float, "effective_batch_size": int, "batch_size": int, "accumulation_steps": int}``.
    """
    lr = trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log)
    batch = space.effective_batch_size
    if batch.scale == "pow2":
        exponent = trial.suggest_int("log2_effective_batch_size", int(math.log2(batch.low)), int(math.log2(batch.high)))
        effective = 2**exponent
    else:
        effective = trial.suggest_int("effective_batch_size", batch.low, batch.high, log=True)
    micro = micro_batch_size(effective, batch.max_micro_batch)
    return {"lr": lr, "effective_batch_size": effective, "batch_size": micro, "accumulation_steps": effective // micro}


def trial_train_config(config: StudyConfig, params: dict[str, Any]) -> TrainConfig:
    """The training configuration of one trial: the study's fixed one with the sampled values."""
    folds = (0,) if config.objective == "fold0" else config.train.folds
    return replace(
        config.train,
        lr=params["lr"],
        batch_size=params["batch_size"],
        effective_batch_size=params["effective_batch_size"],
        folds=folds,
    )


def build_sampler(config: SamplerConfig) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded."""
    if config.name == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.n_startup_trials)


def build_pruner(config: PrunerConfig, max_resource: int) -> optuna.pruners.BasePruner:
    """The configured pruner; ``max_resource`` is the number of reported steps of a full trial."""
    if config.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=config.n_startup_trials, n_warmup_steps=config.n_warmup_steps
        )
    if config.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=config.min_resource, max_resource=max_resource, reduction_factor=config.reduction_factor
        )
    return optuna.pruners.NopPruner()


def study_params(config: StudyConfig) -> dict[str, str]:
    """The study run's params (SPEC §4): name, sampler, pruner, objective, search space, fixed config."""
    lr, batch = config.search_space.lr, config.search_space.effective_batch_size
    params = {
        "study_name": config.study_name,
        "direction": config.direction,
        "objective": config.objective,
        "sampler": config.sampler.name,
        "sampler_seed": str(config.sampler.seed),
        "pruner": config.pruner.name,
        "search_space.lr": f"{'log' if lr.log else 'uniform'}[{lr.low:g}, {lr.high:g}]",
        "search_space.effective_batch_size": f"{batch.scale}[{batch.low}, {batch.high}]",
        "search_space.max_micro_batch": str(batch.max_micro_batch),
    }
    searched = {"train.lr", "train.batch_size", "train.effective_batch_size", "train.folds"}
    params.update({k: v for k, v in flatten(config.train, "train.").items() if k not in searched})
    return params


def make_objective(
    config: StudyConfig, tracker: StudyTracker, study_run_id: str, **train_kwargs: Any
) -> Callable[[optuna.Trial], float]:
    """The Optuna objective: one tracked cross-validation per trial, pruned between epochs.

    Args:
        config: The study.
        tracker: Creates and closes the trial runs.
        study_run_id: The study run the trial runs nest under.
        **train_kwargs: Passed to ``run_cross_validation`` (``cache_root``, ``device``, ``progress``).

    Returns:
        ``objective(trial) -> value``: the best validation score of fold 0 (``fold0``) or the mean of
        the folds' best validation scores (``cv``).
    """
    from geopose_mlops.train.cv import run_cross_validation

    def objective(trial: optuna.Trial) -> float:
        train, run_id = _start_trial(trial, config, tracker, study_run_id)
        on_epoch_end, reported = _epoch_reporter(trial, tracker, run_id, train)
        try:
            result = run_cross_validation(
                train,
                experiment=config.experiment,
                parent_run_id=study_run_id,
                run_id=run_id,
                tags=tracker.trial_tags(trial.number),
                on_epoch_end=on_epoch_end,
                **train_kwargs,
            )
        except optuna.TrialPruned:
            tracker.end_trial(run_id, "PRUNED", step=reported[-1])
            raise
        except KeyboardInterrupt:
            # Stopped from outside (Ctrl-C, SIGTERM): the trial fails, and the same point is queued so
            # that the next `tune` runs it first; no sampled point is lost.
            tracker.end_trial(run_id, "FAILED")
            trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            raise
        except BaseException:
            tracker.end_trial(run_id, "FAILED")
            raise
        value = sum(f.best_score for f in result.folds.values()) / len(result.folds)
        tracker.end_trial(run_id, "COMPLETE", value)
        return value

    return objective


def _start_trial(
    trial: optuna.Trial, config: StudyConfig, tracker: StudyTracker, study_run_id: str
) -> tuple[TrainConfig, str]:
    """Sample the trial's point, record it on the trial and open its MLflow run: (its config, its run id)."""
    dead_run_id = trial.user_attrs.get("mlflow_run_id")
    if dead_run_id:  # a heartbeat retry copies the dead trial's attributes: close the run it left RUNNING
        tracker.end_trial(dead_run_id, "FAILED")
    params = suggest_hyperparameters(trial, config.search_space)
    for key, value in params.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    run_id = tracker.start_trial_run(study_run_id, trial.number, params)
    trial.set_user_attr("mlflow_run_id", run_id)
    return trial_train_config(config, params), run_id


def _epoch_reporter(
    trial: optuna.Trial, tracker: StudyTracker, run_id: str, train: TrainConfig
) -> tuple[Callable[[int, int, dict[str, float]], None], list[int]]:
    """The per-epoch callback: log the epoch on the trial run, report it to Optuna, prune when told.

    Returns:
        (``on_epoch_end(fold, epoch, metrics)``, the steps reported so far, filled in as it runs).
    """
    position = {fold: i for i, fold in enumerate(train.fold_list())}
    reported: list[int] = []

    def on_epoch_end(fold: int, epoch: int, metrics: dict[str, float]) -> None:
        step = position[fold] * train.epochs + epoch  # folds run one after another
        tracker.log_trial_epoch(run_id, step, metrics)
        trial.report(metrics["val_score"], step)
        reported.append(step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"trial {trial.number}: val_score {metrics['val_score']:.4f} at step {step}")

    return on_epoch_end, reported


def study_figures(study: optuna.Study) -> dict[str, Any]:
    """Optimization history (>= 1 completed trial) and parameter importances (>= 2), as figures."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    figures: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if complete:
            figures["optimization_history"] = plots.plot_optimization_history(study).figure
        # Importances need two completed trials whose parameters and values differ.
        if len(complete) >= 2 and len({t.value for t in complete}) >= 2:
            try:
                figures["param_importances"] = plots.plot_param_importances(study).figure
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                warnings.warn(f"study {study.study_name}: no parameter-importance plot ({err})", stacklevel=2)
    return figures


def summarize_study(study: optuna.Study, tracker: StudyTracker, study_run_id: str) -> None:
    """Log the best trial, trial counts, the trials table and the plots on the study run."""
    import matplotlib.pyplot as plt

    states = [t.state for t in study.get_trials(deepcopy=False)]
    state = optuna.trial.TrialState
    metrics: dict[str, float] = {
        f"n_trials_{s.name.lower()}": states.count(s) for s in (state.COMPLETE, state.PRUNED, state.FAIL)
    }
    tags: dict[str, str] = {}
    if state.COMPLETE in states:
        best = study.best_trial
        metrics["best_value"] = best.value
        metrics["best_trial_number"] = best.number
        metrics.update({f"best_{k}": best.user_attrs[k] for k in ("lr", "effective_batch_size", "batch_size")})
        tags = {"best_trial.number": str(best.number), "best_trial.mlflow_run_id": best.user_attrs["mlflow_run_id"]}
    figures = study_figures(study)
    try:
        tracker.log_study_summary(study_run_id, metrics, tags, study.trials_dataframe(), figures, step=len(states))
    finally:
        for figure in figures.values():
            plt.close(figure)


def run_study(
    config: StudyConfig,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    **train_kwargs: Any,
) -> optuna.Study:
    """Create or resume a study, run trials, and log the summary on its MLflow study run.

    Args:
        config: The study.
        n_trials: Trials this invocation runs (None: ``config.n_trials``; 0: none, only reap dead trials
            and summarize); other workers add theirs.
        timeout: Start no new trial after this many seconds (None: no limit).
        storage: Storage URL overriding the study file's (e.g. ``postgresql://user:pw@host/db``).
        **train_kwargs: Passed to ``run_cross_validation`` (``cache_root``, ``device``, ``progress``).

    Returns:
        The study, with the trials of every invocation and worker so far.
    """
    url = storage or config.storage
    full_trial = trial_train_config(config, {"lr": 1e-4, "batch_size": 1, "effective_batch_size": 1})
    tracker = StudyTracker(config.experiment)

    def close_dead_trial_run(_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "mlflow_run_id" in trial.user_attrs:  # its worker died after creating the run
            tracker.end_dead_trial(trial.user_attrs["mlflow_run_id"], trial.user_attrs.get("worker", "?"))

    study = optuna.create_study(
        storage=build_storage(config, url, on_stale=close_dead_trial_run),
        sampler=build_sampler(config.sampler),
        pruner=build_pruner(config.pruner, max_resource=trial_steps(full_trial)),
        study_name=config.study_name,
        direction=config.direction,
        load_if_exists=True,
    )
    study_run_id = tracker.study_run(config.study_name, redact(url))
    study.set_user_attr("mlflow_run_id", study_run_id)
    tracker.log_study_params(study_run_id, study_params(config))
    objective = make_objective(config, tracker, study_run_id, **train_kwargs)
    reap_dead_trials(study)  # before this worker runs anything: a retry of a dead trial is queued first
    try:
        trials = config.n_trials if n_trials is None else n_trials
        if trials:  # 0: no new trial, only the reaping and the summary
            # A diverging trial (non-finite loss) fails on its own; the study goes on.
            study.optimize(objective, n_trials=trials, timeout=timeout, catch=(GeoposeError,))
    finally:
        reap_dead_trials(study)  # a worker that died while this one ran leaves nothing RUNNING behind
        summarize_study(study, tracker, study_run_id)
        tracker.end_study_run(study_run_id)
    return study


def reap_dead_trials(study: optuna.Study) -> None:
    """Fail every trial whose worker stopped sending heartbeats ``grace_period`` seconds ago.

    Optuna itself checks only when a worker starts a trial, so a study whose last worker died (or that
    has no trial left to run) would keep the dead trial, and its MLflow run, RUNNING forever. Each
    trial failed here goes through the storage's stale-trial callback: its MLflow run is closed as
    FAILED (tagged with the dead worker) and its point is queued again (``max_retry``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def describe_study(study: optuna.Study) -> str:
    """One line per fact: trial counts by state, and the best trial with its parameters."""
    counts = Counter(trial.state.name.lower() for trial in study.get_trials(deepcopy=False))
    by_state = ", ".join(f"{n} {state}" for state, n in counts.items())
    lines = [f"study {study.study_name}: {sum(counts.values())} trials ({by_state})"]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        params = ", ".join(f"{k}={best.user_attrs[k]:g}" for k in ("lr", "effective_batch_size", "batch_size"))
        lines.append(f"best value {best.value:.6f} (trial {best.number}: {params})")
    return "\n".join(lines)


def trial_steps(train: TrainConfig) -> int:
    """Steps one full trial reports: epochs per fold times folds."""
    return train.epochs * len(train.fold_list())
