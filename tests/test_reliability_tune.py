"""Interruptions of `tune`: SIGKILL and SIGTERM of a worker mid-trial, and a study whose last worker died.

- SIGKILL: the trial stays RUNNING until its heartbeat is stale; the next `tune` fails it, closes its
  MLflow run and runs its point again, so no trial is lost and none is left RUNNING.
- A study with no trial left to run: `run_study(n_trials=0)` (and every `tune`, when it starts and when
  it ends) reaps the dead trial all the same: FAILED, its run FAILED and tagged with the dead worker,
  its point queued.
- SIGTERM: the worker stops at once (exit 130): the trial FAILED, its run FAILED, its point queued
  again, and the next `tune` runs it first.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from reliability_helpers import cli_command, cli_env, signal_after_first_epoch

from geopose_mlops.cli import main
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.tracking.studies import DEAD_WORKER_TAG, TRIAL_STATE_TAG
from geopose_mlops.tune.study import run_study
from geopose_mlops.tune.study_file import load_study_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training images (ARG, ATL), 64 px: two folds of two."""
    root = tmp_path_factory.mktemp("tune-interrupt") / "data"
    make_synthetic_dataset(root, images_per_city=2, size=64, seed=0, cities=["ARG", "ATL"])
    return root


def _study_file(tmp_path: Path, data_dir: Path, name: str, epochs: int = 3) -> Path:
    """A 2-trial random-search study of resnet18 on fold 0, heartbeat 1 s, grace period 2 s, one retry."""
    train = dict(
        data_dir=str(data_dir), epochs=epochs, image_size=64, k=2, amp=False, augment=False,
        model={"encoder": "resnet18", "encoder_weights": "none"},
    )  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            dict(
                study_name=name, experiment="tune-kill", n_trials=2, heartbeat_interval=1, grace_period=2,
                max_retry=1, sampler={"name": "random", "seed": 0}, pruner={"name": "none"},
                search_space={"lr": {"low": 1e-4, "high": 1e-3},
                              "effective_batch_size": {"low": 2, "high": 2, "max_micro_batch": 2}},
                train=train,
            )
        )
    )  # fmt: skip
    return path


def _trial_runs() -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tune-kill").experiment_id
    return client.search_runs([experiment], "tags.`geopose.kind` = 'trial'")


def _killed_worker(tmp_path: Path, data_dir: Path, name: str, sig: int, tracking_uri: str) -> tuple[Path, str]:
    """A `tune` worker sent ``sig`` after its first epoch; (study file, storage URL)."""
    torch.set_num_threads(1)
    path = _study_file(tmp_path, data_dir, name)
    code = signal_after_first_epoch(cli_command("tune", str(path)), cli_env(tracking_uri), tmp_path / "mlflow.db", sig)
    assert code == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    return path, f"sqlite:///{tmp_path / f'{name}.db'}"


def test_killed_study_resumes_with_no_trial_lost_and_none_running(data_dir, tmp_path, tracking_uri) -> None:
    study_file, storage = _killed_worker(tmp_path, data_dir, "killed", signal.SIGKILL, tracking_uri)
    (dead,) = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert dead.state == optuna.trial.TrialState.RUNNING
    time.sleep(3)  # past the grace period: the dead trial's heartbeat is stale

    result = CliRunner().invoke(main, ["tune", str(study_file), "--n-trials", "2"])
    assert result.exit_code == 0, (result.output, result.exception)

    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert states.count("RUNNING") == 0 and states.count("COMPLETE") == 2 and states.count("FAIL") == 1
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state.name == "COMPLETE" and retry.params == dead.params  # the killed point was run again
    assert sorted(r.info.status for r in _trial_runs()) == ["FAILED", "FINISHED", "FINISHED"]  # none RUNNING


def test_a_study_whose_last_worker_died_is_reaped_even_with_no_trial_left_to_run(
    data_dir, tmp_path, tracking_uri
) -> None:
    study_file, storage = _killed_worker(tmp_path, data_dir, "orphaned", signal.SIGKILL, tracking_uri)
    (dead,) = optuna.load_study(study_name="orphaned", storage=storage).get_trials()
    time.sleep(3)  # past the grace period

    run_study(load_study_config(study_file), n_trials=0, progress=False)  # no trial runs: only the reaping

    trials = optuna.load_study(study_name="orphaned", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # failed, and its point queued again
    assert trials[1].system_attrs.get("failed_trial") == dead.number and trials[1].params == dead.params
    (run,) = _trial_runs()
    assert run.info.run_id == dead.user_attrs["mlflow_run_id"]
    assert run.info.status == "FAILED" and run.data.tags[TRIAL_STATE_TAG] == "FAILED"
    assert run.data.tags[DEAD_WORKER_TAG] == dead.user_attrs["worker"]
    client = MlflowClient()
    (study_run,) = client.search_runs(
        [client.get_experiment_by_name("tune-kill").experiment_id], "tags.`geopose.kind` = 'study'"
    )
    assert study_run.info.status == "FINISHED" and study_run.data.metrics["n_trials_fail"] == 1


def test_sigterm_fails_the_trial_queues_its_point_and_the_next_tune_runs_it_first(
    data_dir, tmp_path, tracking_uri
) -> None:
    study_file, storage = _killed_worker(tmp_path, data_dir, "stopped", signal.SIGTERM, tracking_uri)
    trials = optuna.load_study(study_name="stopped", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    stopped, queued = trials
    assert queued.system_attrs["fixed_params"] == stopped.params and queued.user_attrs["retry_of"] == stopped.number
    (run,) = _trial_runs()
    assert run.info.run_id == stopped.user_attrs["mlflow_run_id"] and run.info.status == "FAILED"

    mlflow.set_tracking_uri(tracking_uri)
    result = CliRunner().invoke(main, ["tune", str(study_file), "--n-trials", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    trials = optuna.load_study(study_name="stopped", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == stopped.params  # the queued point ran first
    assert sorted(r.info.status for r in _trial_runs()) == ["FAILED", "FINISHED"]
