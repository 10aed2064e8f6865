"""Interruptions: SIGTERM and SIGKILL during `train` and `tune`, and a kill during the cache build.

Training: the killed run resumes with every epoch logged exactly once; SIGTERM closes the runs as
KILLED, SIGKILL leaves them RUNNING and `--resume` still works. Tuning: a study killed mid-trial
resumes with no trial lost and none left RUNNING. Cache: a build killed half way leaves no entry that
would be reused, and the rebuild equals a clean build.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from reliability_helpers import TINY_TRAIN, cli_command, cli_env

from geopose_mlops.cli import main
from geopose_mlops.constants import KIND_CV, KIND_FOLD, KIND_TAG
from geopose_mlops.data.cache import build_cache
from geopose_mlops.data.layout import find_samples
from geopose_mlops.data.synth import make_synthetic_dataset

EPOCHS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training images (ARG, ATL), 64 px: two folds of two."""
    root = tmp_path_factory.mktemp("interrupt") / "data"
    make_synthetic_dataset(root, images_per_city=2, size=64, seed=0, cities=["ARG", "ATL"])
    return root


def _count_metric(db: Path, key: str) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("select count(*) from metrics where key = ?", (key,)).fetchone()[0]
    except sqlite3.OperationalError:  # the store or its tables are not created yet
        return 0


def _kill_after_first_epoch(command: list[str], env: dict, db: Path, sig: int, key: str = "val_score") -> int:
    """Run ``command``, send ``sig`` once the first ``key`` metric is in the store; its exit code."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while _count_metric(db, key) == 0:
            assert process.poll() is None, f"ended before its first epoch: {process.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no epoch within 120 s"
            time.sleep(0.1)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    if sig == signal.SIGTERM:
        assert "interrupted" in stderr.splitlines()[-1], stderr[-2000:]
    return process.returncode


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "local_copy"),
    [(signal.SIGTERM, True), (signal.SIGKILL, True), (signal.SIGKILL, False)],
    ids=["sigterm", "sigkill", "sigkill-nothing-stored"],
)
def test_killed_training_resumes_with_every_epoch_logged_once(
    data_dir, tmp_path, monkeypatch, sig, local_copy
) -> None:
    """Without a local copy, a SIGKILL before the first checkpoint upload (checkpoint_interval_s) leaves
    nothing to resume from: the fold trains again from epoch 0 and does not log epoch 0 a second time."""
    torch.set_num_threads(1)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    args = ["train", "--data-dir", str(data_dir), "--epochs", str(EPOCHS), "--experiment", "kill", *TINY_TRAIN]
    args += ["--cache-dir", str(tmp_path / "cache")]
    if local_copy:
        args += ["--work-dir", str(tmp_path / "work")]
    code = _kill_after_first_epoch(cli_command(*args), cli_env(uri), db, sig)
    assert code == (130 if sig == signal.SIGTERM else -signal.SIGKILL)

    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kill").experiment_id
    (cv,) = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_CV}'")
    folds = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    expected = "KILLED" if sig == signal.SIGTERM else "RUNNING"  # SIGKILL cannot be caught
    assert cv.info.status == expected and {f.info.status for f in folds} == {expected}

    result = CliRunner().invoke(main, [*args, "--resume", cv.info.run_id])
    assert result.exit_code == 0, (result.output, result.exception)
    cv = client.get_run(cv.info.run_id)
    folds = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    assert cv.info.status == "FINISHED" and "cv_score" in cv.data.metrics
    assert len(folds) == 2 and {f.info.status for f in folds} == {"FINISHED"}
    for fold in folds:
        for key in ("val_score", "train_loss", "lr"):
            steps = [m.step for m in client.get_metric_history(fold.info.run_id, key)]
            assert sorted(steps) == list(range(EPOCHS)), (fold.data.tags, key, steps)


@pytest.mark.slow
def test_killed_study_resumes_with_no_trial_lost_and_none_running(data_dir, tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    study_file = tmp_path / "study.yaml"
    train = dict(
        data_dir=str(data_dir), epochs=3, image_size=64, k=2, amp=False, augment=False,
        model={"encoder": "resnet18", "encoder_weights": "none"},
    )  # fmt: skip
    study_file.write_text(
        yaml.safe_dump(
            dict(
                study_name="killed", experiment="tune-kill", n_trials=2, heartbeat_interval=1, grace_period=2,
                max_retry=1, sampler={"name": "random", "seed": 0}, pruner={"name": "none"},
                search_space={"lr": {"low": 1e-4, "high": 1e-3},
                              "effective_batch_size": {"low": 2, "high": 2, "max_micro_batch": 2}},
                train=train,
            )
        )
    )  # fmt: skip
    code = _kill_after_first_epoch(cli_command("tune", str(study_file)), cli_env(uri), db, signal.SIGKILL)
    assert code == -signal.SIGKILL
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    (dead,) = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert dead.state == optuna.trial.TrialState.RUNNING
    time.sleep(3)  # past the grace period: the dead trial's heartbeat is stale

    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(main, ["tune", str(study_file), "--n-trials", "2"])
    assert result.exit_code == 0, (result.output, result.exception)

    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert states.count("RUNNING") == 0 and states.count("COMPLETE") == 2 and states.count("FAIL") == 1
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state.name == "COMPLETE" and retry.params == dead.params  # the killed point was run again
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tune-kill").experiment_id
    runs = client.search_runs([experiment], "tags.`geopose.kind` = 'trial'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]  # none left RUNNING


_BUILD = """
import sys
from geopose_mlops.data.cache import build_cache
from geopose_mlops.data.layout import find_samples
build_cache(find_samples(sys.argv[1]), sys.argv[2], int(sys.argv[3]), progress=False)
"""


@pytest.mark.slow
def test_cache_build_killed_half_way_is_never_reused(tmp_path) -> None:
    data = tmp_path / "data"
    make_synthetic_dataset(data, images_per_city=6, size=256, seed=1)
    cache_root = tmp_path / "cache"
    process = subprocess.Popen(cli_command()[:1] + ["-c", _BUILD, str(data), str(cache_root), "256"], env=cli_env(""))
    deadline = time.monotonic() + 60
    while not list(cache_root.glob(".tmp-*/rgb.npy")):  # the entry is being written
        assert process.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert [p.name for p in cache_root.iterdir() if not p.name.startswith(".tmp-")] == []  # no entry to reuse

    samples = find_samples(data)
    rebuilt = build_cache(samples, cache_root, 256, progress=False)
    clean = build_cache(samples, tmp_path / "clean", 256, progress=False)
    assert rebuilt.fingerprint == clean.fingerprint and rebuilt.ids == clean.ids
    for name in ("rgb", "agl", "scale", "angle", "gsd", "city_index"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(clean, name))
    assert not list(cache_root.glob(".tmp-*"))  # the dead build's folder was cleared
