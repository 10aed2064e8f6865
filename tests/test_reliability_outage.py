"""A tracking-store outage loses nothing that was trained: the unsent records wait in the user cache for --resume.

Without ``--work-dir`` a fold keeps its checkpoints, OOF files and an ``unsent_epochs.jsonl`` in
``$XDG_CACHE_HOME/geopose-mlops/runs/<cv run>/fold_<F>`` (here the test's own, ``conftest.user_cache``).
Two outages: a real ``mlflow server`` stopped after the first of 4 epochs and started again once the
process has exited, and a store that fails at the last epoch's upload, after all training. In both the
resume logs epochs 0..3 once each, trains none of the kept epochs again, stores the best epoch's
``best.pt``, and removes the local copy once the store holds it all.
"""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from reliability_helpers import FAST_FAILURE, TINY_TRAIN, cli_command, cli_env

from geopose_mlops.cli import main
from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import BEST_NAME, CHECKPOINT_DIR, KIND_FOLD, KIND_TAG, LAST_NAME
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.errors import TrackingStoreError
from geopose_mlops.tracking.runs import CvTracker
from geopose_mlops.tracking.server import MlflowServer
from geopose_mlops.train import loop
from geopose_mlops.train.checkpoint import load_checkpoint
from geopose_mlops.train.cv import run_cross_validation
from geopose_mlops.train.recorder import UNSENT_EPOCHS

EPOCHS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outage") / "data"
    make_synthetic_dataset(root, images_per_city=2, size=64, seed=0, cities=["ARG", "ATL"])
    return root


@pytest.fixture
def trained_epochs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The epochs trained in this process, in order (``loop.train_one_epoch`` is counted)."""
    epochs: list[int] = []
    original = loop.train_one_epoch

    def counted(*args, **kwargs):
        epochs.append(kwargs["epoch"])
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", counted)
    return epochs


def _val_scores_logged(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("select count(*) from metrics where key = 'val_score'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _check_every_epoch_once_and_the_best_stored(experiment: str, tmp_path: Path) -> None:
    """Both folds FINISHED, each epoch's metrics logged once, and ``best.pt`` the best epoch's."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    folds = client.search_runs([experiment_id], f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    assert len(folds) == 2 and {f.info.status for f in folds} == {"FINISHED"}
    for fold in folds:
        run_id = fold.info.run_id
        for key in ("val_score", "train_loss", "lr"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(EPOCHS)), key
        history = sorted(client.get_metric_history(run_id, "val_score"), key=lambda m: m.step)
        best_epoch = int(np.argmax([m.value for m in history]))  # the first of equal scores, as training
        assert fold.data.metrics["best_epoch"] == best_epoch
        best = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{BEST_NAME}", str(tmp_path / run_id))
        assert load_checkpoint(best)["epoch"] == best_epoch
        last = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{LAST_NAME}", str(tmp_path / run_id))
        assert load_checkpoint(last)["epoch"] == EPOCHS - 1


@pytest.mark.slow
def test_server_stopped_mid_run_keeps_the_unsent_records_and_resume_logs_each_epoch_once(
    data_dir, tmp_path, monkeypatch, user_cache, trained_epochs
) -> None:
    torch.set_num_threads(1)
    db = tmp_path / "server.db"
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts", workers=1).start()
    args = ["train", "--data-dir", str(data_dir), "--epochs", str(EPOCHS), "--experiment", "outage", *TINY_TRAIN]
    args += ["--cache-dir", str(tmp_path / "cache")]  # no --work-dir
    process = subprocess.Popen(
        cli_command(*args), env=cli_env(server.url, **FAST_FAILURE), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while _val_scores_logged(db) == 0:  # epoch 0 of fold 0 is in the store
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.1)
        server.stop()
        _, stderr = process.communicate(timeout=120)
    finally:
        server.stop()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr[-2000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"Error: tracking store {server.url} failed"), message
    cv_run_id = message.split("--resume ")[1].split()[0]
    kept = user_cache / "geopose-mlops" / "runs" / cv_run_id
    assert f"(fold_0) are kept in {kept}." in message, message
    assert (kept / "fold_0" / UNSENT_EPOCHS).is_file()
    kept_epoch = load_checkpoint(kept / "fold_0" / LAST_NAME)["epoch"]  # trained, not stored

    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts", port=server.port, workers=1).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        command = shlex.split(message.split("Once the store is back: geopose-ml ")[1])
        result = CliRunner().invoke(main, command)  # the command the message gave
        assert result.exit_code == 0, (result.output, result.exception)
        # fold 0 goes on after its kept last.pt; fold 1 had not started
        assert trained_epochs == [*range(kept_epoch + 1, EPOCHS), *range(EPOCHS)]
        assert MlflowClient().get_run(cv_run_id).info.status == "FINISHED"
        _check_every_epoch_once_and_the_best_stored("outage", tmp_path / "downloads")
    finally:
        server.stop()
    assert not kept.exists()  # the store holds it all: the local copy is gone


def test_store_failing_at_the_last_upload_keeps_every_epoch_and_resume_trains_none_again(
    data_dir, tmp_path, monkeypatch, user_cache, trained_epochs
) -> None:
    torch.set_num_threads(1)
    config = TrainConfig(
        data_dir=str(data_dir), model=ModelConfig(encoder="resnet18", encoder_weights="none"), epochs=EPOCHS,
        lr=1e-3, batch_size=2, image_size=64, amp=False, k=2, augment=False,
        checkpoint_interval_s=1e6, metrics_interval_s=1e6,  # everything goes with the last epoch's upload
    )  # fmt: skip

    def store_down(self, run_id, epochs):
        raise MlflowException("store down")

    with monkeypatch.context() as outage:
        outage.setattr(CvTracker, "log_epochs", store_down)
        with pytest.raises(TrackingStoreError, match="store down") as failed:
            run_cross_validation(config, "end", cache_root=tmp_path / "cache", device="cpu", progress=False)
    assert trained_epochs == list(range(EPOCHS))  # fold 0 trained to its end; its upload failed
    message = str(failed.value)
    cv_run_id = message.split("--resume ")[1].split()[0]
    kept = user_cache / "geopose-mlops" / "runs" / cv_run_id / "fold_0"
    assert f"are kept in {kept.parent}." in message
    (fold_run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("end").experiment_id],
                                             f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")  # fmt: skip
    assert fold_run.info.status == "RUNNING"  # left open, as the cv run

    trained_epochs.clear()
    resumed = run_cross_validation(
        config, resume_run_id=cv_run_id, cache_root=tmp_path / "cache", device="cpu", progress=False
    )
    assert trained_epochs == list(range(EPOCHS))  # fold 1 only: fold 0's 4 epochs were all kept
    assert resumed.run_id == cv_run_id and np.isfinite(resumed.cv_score)
    _check_every_epoch_once_and_the_best_stored("end", tmp_path / "downloads")
    assert not kept.parent.exists()
