"""Two ``geopose-ml tune`` workers share one study on PostgreSQL and the tracking server; one is killed.

Worker A (one trial) and worker B (five trials) start together on a fresh Optuna database, so they race
to create its tables and the study, then train at the same time. Once A's trial has reported its first
epoch, A is killed with SIGKILL and its heartbeat stops. B is then held (SIGSTOP) for longer than
``grace_period`` so that, however fast the machine, A's trial is stale when B starts its next trial: B
marks it FAILED and closes its MLflow run, and runs its five trials to the end. Six trials, numbers 0-5,
six trial runs under one study run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from tiny_cv import write_study_file

from geopose_mlops.constants import KIND_TAG
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.tracking.studies import DEAD_WORKER_TAG, TRIAL_NUMBER_TAG, TRIAL_STATE_TAG

pytest_plugins = ["conftest_pg"]

REPO = Path(__file__).resolve().parents[1]
STUDY = "pg_workers"
EXPERIMENT = "tune-postgres"
EPOCHS = 2  # A is killed after its first epoch, so the trial is certainly mid-training
HEARTBEAT_S, GRACE_S = 2, 6  # heartbeat_interval and grace_period of the study file
TrialState = optuna.trial.TrialState


def write_study(folder: Path, data_dir: Path) -> Path:
    """A tiny fold-0 study: MobileNetV3 (weights off), 64 px, 2 epochs, fast heartbeat, no retries."""
    heartbeat = f"heartbeat_interval: {HEARTBEAT_S}\ngrace_period: {GRACE_S}\nmax_retry: 0\n"
    return write_study_file(
        folder, data_dir, STUDY, EXPERIMENT, epochs=EPOCHS,
        batch_space="{low: 1, high: 4, scale: pow2, max_micro_batch: 2}", extra=heartbeat,
    )  # fmt: skip


def start_worker(study_file: Path, storage: str, n_trials: int, tracking_uri: str, log: Path) -> subprocess.Popen:
    """``geopose-ml tune`` in its own process group (so SIGKILL reaches all of it), output to ``log``."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    command = [sys.executable, "-m", "geopose_mlops.cli", "tune", str(study_file), "--storage", storage]
    with log.open("w") as out:
        return subprocess.Popen(
            [*command, "--n-trials", str(n_trials)], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def load_study(storage: str) -> optuna.Study | None:
    """The study as the workers see it; None until a worker has created its tables and the study."""
    try:
        rdb = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        return optuna.load_study(study_name=STUDY, storage=rdb)
    except (KeyError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return None  # no tables yet, or no study in them yet


def wait_for_running_epoch(storage: str, worker: subprocess.Popen, log: Path, timeout_s: float) -> int:
    """The number of ``worker``'s trial once it is RUNNING and has reported an epoch."""
    deadline = time.monotonic() + timeout_s
    study = None
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"worker exited early ({worker.returncode}):\n{log.read_text()[-3000:]}"
        study = study or load_study(storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else []:
            if trial.user_attrs.get("worker", "").endswith(f":{worker.pid}") and trial.intermediate_values:
                return trial.number
        time.sleep(0.2)
    raise AssertionError(f"no RUNNING trial of worker {worker.pid} in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_on_postgres_and_a_killed_one_leaves_a_failed_trial(tracking_stack, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    data = tmp_path / "data"
    make_synthetic_dataset(data, images_per_city=2, size=64, seed=0, cities=("JAX", "OMA"), rgb_format="tif")
    study_file = write_study(tmp_path, data)
    storage = tracking_stack.optuna_storage("optuna_tune_workers")
    client = MlflowClient(tracking_stack.tracking_uri)  # both workers start at once and create the experiment

    logs = tmp_path / "a.log", tmp_path / "b.log"
    victim = start_worker(study_file, storage, 1, tracking_stack.tracking_uri, logs[0])
    survivor = start_worker(study_file, storage, 5, tracking_stack.tracking_uri, logs[1])
    try:
        killed = wait_for_running_epoch(storage, victim, logs[0], timeout_s=120)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        started = [t for t in load_study(storage).trials if t.user_attrs.get("worker", "").endswith(f":{survivor.pid}")]
        assert len(started) < 5, "B must still have a trial to start after A's trial goes stale"
        os.killpg(survivor.pid, signal.SIGSTOP)
        time.sleep(GRACE_S + 1)
        os.killpg(survivor.pid, signal.SIGCONT)
        survivor.wait(timeout=240)
    finally:
        for worker in (victim, survivor):
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    assert victim.returncode == -signal.SIGKILL
    assert survivor.returncode == 0, logs[1].read_text()[-3000:]

    study = load_study(storage)
    assert study is not None
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(6))
    states = {t.number: t.state for t in trials}
    assert states[killed] == TrialState.FAIL, "the heartbeat marks the dead worker's trial FAILED"
    assert len(trials[killed].intermediate_values) < EPOCHS
    assert all(state == TrialState.COMPLETE for n, state in states.items() if n != killed)
    survivor_tag = f":{survivor.pid}"
    assert all(t.user_attrs["worker"].endswith(survivor_tag) for t in trials if t.number != killed)

    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    studies = client.search_runs([experiment_id], f"tags.`{KIND_TAG}` = 'study'")
    assert len(studies) == 1, "both workers use one study run"
    study_run = studies[0]
    assert study_run.info.status == "FINISHED"
    assert study_run.data.metrics["n_trials_complete"] == 5 and study_run.data.metrics["n_trials_fail"] == 1
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
    assert sorted(int(r.data.tags[TRIAL_NUMBER_TAG]) for r in runs) == list(range(6))
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs}
    by_number = {int(r.data.tags[TRIAL_NUMBER_TAG]): r for r in runs}
    dead = by_number[killed]
    assert dead.info.status == "FAILED" and dead.data.tags[TRIAL_STATE_TAG] == "FAILED"
    assert dead.data.tags[DEAD_WORKER_TAG].endswith(f":{victim.pid}")
    for number, run in by_number.items():
        if number != killed:
            assert run.info.status == "FINISHED" and run.data.tags[TRIAL_STATE_TAG] == "COMPLETE"
            assert run.data.metrics["trial_value"] == pytest.approx(trials[number].value)
