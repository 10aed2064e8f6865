"""Tracking store faults: a server down at start fails at once; one going down mid-run fails the run visibly.

The mid-run case runs a real ``mlflow server`` (``server.MlflowServer``, SQLite backend), stops it after
the first epoch is logged, checks that training stops with a one-line error naming the server and the
run to resume while the local checkpoint stays, then starts the server again and resumes.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from reliability_helpers import FAST_FAILURE, TINY_TRAIN, cli_command, cli_env

from geopose_mlops.cli import main
from geopose_mlops.constants import KIND_CV, KIND_FOLD, KIND_TAG, LAST_NAME
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.tracking.server import MlflowServer, free_port
from geopose_mlops.train.checkpoint import load_checkpoint

EPOCHS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracking") / "data"
    make_synthetic_dataset(root, images_per_city=2, size=64, seed=0, cities=["ARG", "ATL"])
    return root


def test_server_down_at_start_fails_at_once_before_any_training(data_dir, tmp_path, monkeypatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    start = time.monotonic()
    args = ["train", "--data-dir", str(data_dir), "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN]
    result = CliRunner().invoke(main, args)
    assert time.monotonic() - start < 15
    assert result.exit_code == 1, (result.output, result.exception)
    (message,) = result.stderr.strip().splitlines()
    assert f"tracking server {uri} is not reachable" in message and "Nothing was trained" in message
    assert not (tmp_path / "cache").exists()  # failed before the data were even decoded


def _val_scores_logged(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("select count(*) from metrics where key = 'val_score'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_server_down_mid_run_fails_visibly_keeps_the_checkpoint_and_resumes(data_dir, tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    db = tmp_path / "server.db"
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts", workers=1).start()
    work = tmp_path / "work"
    args = ["train", "--data-dir", str(data_dir), "--epochs", str(EPOCHS), "--experiment", "down", *TINY_TRAIN]
    args += ["--cache-dir", str(tmp_path / "cache"), "--work-dir", str(work)]
    process = subprocess.Popen(
        cli_command(*args), env=cli_env(server.url, **FAST_FAILURE), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while _val_scores_logged(db) == 0:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.1)
        server.stop()
        stopped = time.monotonic()
        _, stderr = process.communicate(timeout=120)
    finally:
        server.stop()
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - stopped < 90  # failed, did not hang
    assert process.returncode == 1
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"Error: tracking store {server.url} failed") and "--resume" in message, message
    cv_run_id = message.split("--resume ")[1].split()[0]
    (last,) = work.glob(f"{cv_run_id}/fold_*/{LAST_NAME}")  # the local checkpoint is kept
    assert load_checkpoint(last)["epoch"] >= 0

    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts", port=server.port, workers=1).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        result = CliRunner().invoke(main, [*args, "--resume", cv_run_id])
        assert result.exit_code == 0, (result.output, result.exception)
        client = MlflowClient()
        assert client.get_run(cv_run_id).info.status == "FINISHED"
        experiment = client.get_experiment_by_name("down").experiment_id
        folds = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
        assert len(folds) == 2 and {f.info.status for f in folds} == {"FINISHED"}
        for fold in folds:
            steps = sorted(m.step for m in client.get_metric_history(fold.info.run_id, "val_score"))
            assert steps == list(range(EPOCHS))
        assert len(client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_CV}'")) == 1
    finally:
        server.stop()
