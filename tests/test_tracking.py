"""Tracked cross-validation: `mlflow run .` into a temporary SQLite store, and kill-and-resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import KIND_CV, KIND_FOLD, KIND_TAG
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.tracking.runs import CvTracker
from geopose_mlops.tracking.truth import stored_truth
from geopose_mlops.train.checkpoint import load_checkpoint
from geopose_mlops.train.cv import run_cross_validation
from geopose_mlops.train.oof import score_oof_folders

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    make_synthetic_dataset(root, images_per_city=2, size=64, seed=0)
    return root


def _runs(client, kind):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`{KIND_TAG}` = '{kind}'")


@pytest.mark.slow
def test_mlflow_run_tracks_a_cross_validation(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": "geopose",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    params = dict(
        data_dir=data_dir,
        encoder="resnet18",
        epochs=2,
        image_size=64,
        k=2,
        batch_size=2,
        effective_batch_size=4,
        num_workers=0,
        amp="no-amp",
        lr=0.001,
    )
    command = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "--env-manager", "local"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    (cv,) = _runs(client, KIND_CV)
    folds = _runs(client, KIND_FOLD)
    assert len(folds) == 2 and {f.data.tags["mlflow.parentRunId"] for f in folds} == {cv.info.run_id}
    assert cv.data.params["encoder"] == "resnet18" and cv.data.params["effective_batch_size"] == "4"
    assert {"folds.csv", "config.json"} <= {a.path for a in client.list_artifacts(cv.info.run_id)}
    assert cv.inputs.dataset_inputs[0].dataset.digest == cv.data.params["data_fingerprint"][:36]
    oof_dirs = []
    for fold in folds:
        run_id = fold.info.run_id
        assert fold.data.params["fold"] in ("0", "1")
        assert fold.data.params["precision"] == "fp32"  # --no-amp
        assert [m.step for m in client.get_metric_history(run_id, "val_score")] == [0, 1]
        for key in ("train_loss", "val_agl_r2", "val_vflow_r2", "lr", "epoch_seconds", "best_val_score"):
            assert key in fold.data.metrics, key
        assert any(k.startswith("val_score_") for k in fold.data.metrics)
        names = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
        assert names == {"checkpoints/best.pt", "checkpoints/last.pt"}
        assert load_checkpoint(client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path)))["epoch"] == 1
        best = load_checkpoint(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path / "best")))
        assert best["optimizer"] is None and best["model"]  # weights only: best.pt serves predictions
        oof_dirs.append(client.download_artifacts(run_id, "oof", str(tmp_path / run_id)))
        assert {p.name for p in Path(oof_dirs[-1]).iterdir()} == {"index.csv", "agl_pred.npy"}  # truth: once
    recomputed = score_oof_folders(oof_dirs, stored_truth(cv.data.params["data_fingerprint"], tmp_path / "truth"))
    assert cv.data.metrics["cv_score"] == pytest.approx(recomputed["final_score"], abs=1e-12)
    for city, values in recomputed["cities"].items():
        assert cv.data.metrics[f"cv_score_{city}"] == pytest.approx(values["score"], abs=1e-12)


class Killed(Exception):
    """Stands in for a kill after an epoch was stored."""


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", ["after_epoch", "while_logging_metrics", "while_uploading_checkpoint"])
def test_killed_and_resumed_fold_logs_every_epoch_once(data_dir, tmp_path, monkeypatch, kill_point):
    """3 epochs of fold 0, stopped around epoch 1, resumed: epochs 0, 1, 2 each logged exactly once.

    ``after_epoch``: the per-epoch callback raises at epoch 1 (the stop stores what is pending).
    The other two let the process die as under SIGKILL (from that call on nothing reaches the store)
    ``while_logging_metrics`` as epoch 1's metrics are written (with sub-second epochs those of all
    three go in one request with the final checkpoints, which must not be stored without them);
    ``while_uploading_checkpoint``, uploading every epoch, after epoch 1's metrics as its ``last.pt``
    is uploaded (the store holds epochs 0 and 1 and epoch 0's ``last.pt``: the resume retrains epoch 1
    without logging it again).
    """
    torch.set_num_threads(1)
    config = TrainConfig(
        data_dir=str(data_dir),
        model=ModelConfig(encoder="resnet18"),
        epochs=3,
        lr=1e-3,
        batch_size=4,
        image_size=64,
        k=2,
        folds=(0,),
        amp=False,
        augment=False,
        checkpoint_interval_s=0 if kill_point == "while_uploading_checkpoint" else 120,
    )
    callback = None
    if kill_point == "after_epoch":

        def callback(fold, epoch, metrics):
            if epoch == 1:
                raise Killed

    else:
        logged, dead = [], []

        def dies_at(name, original):
            def call(self, run_id, *args, **kwargs):
                if name == "log_epochs" and kill_point == "while_logging_metrics":
                    dead.extend(epoch for epoch, _ in args[0] if epoch == 1)
                if name == "log_checkpoint" and kill_point == "while_uploading_checkpoint" and 1 in logged:
                    dead.append(name)
                if dead:
                    raise Killed
                result = original(self, run_id, *args, **kwargs)
                if name == "log_epochs":
                    logged.extend(epoch for epoch, _ in args[0])
                return result

            return call

        for name in ("log_epochs", "log_epoch", "log_checkpoint", "log_oof", "log_fold_summary", "end_run"):
            monkeypatch.setattr(CvTracker, name, dies_at(name, getattr(CvTracker, name)))
    with pytest.raises(Killed):
        run_cross_validation(
            config, experiment="resume", on_epoch_end=callback, progress=False, cache_root=tmp_path / "cache"
        )
    if kill_point == "while_logging_metrics":
        assert logged in ([], [0])
    elif kill_point == "while_uploading_checkpoint":
        assert logged == [0, 1]
    monkeypatch.undo()
    client = MlflowClient()
    (fold_run,) = _runs(client, KIND_FOLD)
    assert fold_run.info.status in ("KILLED", "FAILED", "RUNNING")  # RUNNING: died without closing it
    result = run_cross_validation(
        config, resume_run_id=fold_run.info.run_id, progress=False, cache_root=tmp_path / "cache"
    )
    history = client.get_metric_history(fold_run.info.run_id, "val_score")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert len(_runs(client, KIND_FOLD)) == 1 and len(_runs(client, KIND_CV)) == 1
    assert client.get_run(fold_run.info.run_id).info.status == "FINISHED"
    assert result.run_id == fold_run.data.tags["mlflow.parentRunId"]
    assert result.folds[0].run_id == fold_run.info.run_id


def test_experiments_of_a_sqlite_store_keep_artifacts_beside_it(tmp_path, monkeypatch) -> None:
    from geopose_mlops.tracking.experiments import experiment_id

    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store/mlflow.db")
    (tmp_path / "store").mkdir()
    experiment = MlflowClient().get_experiment(experiment_id("beside", create=True))
    assert experiment.artifact_location == (tmp_path / "store" / "mlartifacts" / "beside").as_uri()


def _checkpoint(path: Path, value: float) -> Path:
    from geopose_mlops.data.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"w": torch.full((4,), value)}, tmp)
    return path


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "copy"])
def test_stored_checkpoints_keep_their_content_when_training_rewrites_the_local_files(tmp_path, monkeypatch, links):
    """Checkpoints go into a local artifact store as hard links (no copy), or copies where links fail.

    Either way the stored file keeps what was logged when training writes the next ``last.pt`` (and
    ``oof/``) over the local one, and logging again replaces it.
    """
    if not links:
        def no_link(*args, **kwargs):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    tracker = CvTracker("links")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    work = tmp_path / "work"
    local = _checkpoint(work / "last.pt", 1.0)
    (work / "oof").mkdir()
    (work / "oof" / "index.csv").write_text("row\n0\n")
    tracker.log_checkpoint(run_id, local)
    tracker.log_oof(run_id, work / "oof")
    artifact_dir = Path(tracker.client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    stored = artifact_dir / "checkpoints" / "last.pt"
    assert stored.samefile(local) is links  # a link shares the local file's inode; a copy does not

    _checkpoint(local, 2.0)  # the next epoch, written as training writes it (temporary file, rename)
    from geopose_mlops.data.io import atomic_path

    with atomic_path(work / "oof" / "index.csv") as tmp:
        tmp.write_text("row\n0\n1\n")
    assert torch.load(stored)["w"][0] == 1.0
    assert (artifact_dir / "oof" / "index.csv").read_text() == "row\n0\n"

    tracker.log_checkpoint(run_id, local)
    assert torch.load(stored)["w"][0] == 2.0
    names = {a.path for a in tracker.client.list_artifacts(run_id, "checkpoints")}
    assert names == {"checkpoints/last.pt"}  # no staging file left behind
    assert sorted(p.name for p in work.iterdir()) == ["last.pt", "oof"]


# The last request also holds the fold's summary (best_val_score, best_epoch) at step 0.
@pytest.mark.parametrize(("interval", "requests"), [(0.0, [[0], [1], [2, 0]]), (1e9, [[0, 1, 2, 0]])])
def test_epoch_metrics_are_written_at_most_every_metrics_interval(data_dir, tmp_path, monkeypatch, interval, requests):
    """``metrics_interval_s`` 0 writes each epoch's metrics on its own; a long one writes all three
    epochs in one request with the final checkpoints, each at its own step; the summary goes with the
    last epoch's metrics, not in a request of its own."""
    torch.set_num_threads(1)
    calls, summaries = [], []
    original = CvTracker.log_epochs

    def log_epochs(self, run_id, epochs):
        calls.append([epoch for epoch, _ in epochs])
        original(self, run_id, epochs)

    monkeypatch.setattr(CvTracker, "log_epochs", log_epochs)
    monkeypatch.setattr(CvTracker, "log_fold_summary", lambda self, *args: summaries.append(args))
    config = TrainConfig(
        data_dir=str(data_dir), model=ModelConfig(encoder="resnet18"), epochs=3, batch_size=4, image_size=64, k=2,
        folds=(0,), amp=False, augment=False, metrics_interval_s=interval,
    )  # fmt: skip
    result = run_cross_validation(config, experiment="interval", progress=False, cache_root=tmp_path / "cache")
    assert calls == requests
    assert summaries == []
    history = MlflowClient().get_metric_history(result.folds[0].run_id, "val_score")
    assert sorted(m.step for m in history) == [0, 1, 2]
    metrics = MlflowClient().get_run(result.folds[0].run_id).data.metrics
    assert metrics["best_val_score"] == result.folds[0].best_score
    assert metrics["best_epoch"] == result.folds[0].best_epoch


def _two_fold_config(data_dir) -> TrainConfig:
    return TrainConfig(
        data_dir=str(data_dir), model=ModelConfig(encoder="resnet18"), epochs=1, batch_size=4, image_size=64, k=2,
        amp=False, augment=False,
    )  # fmt: skip


def test_a_fold_whose_summary_cannot_be_stored_fails_and_the_next_fold_never_starts(data_dir, tmp_path, monkeypatch):
    """Storing fold 0's summary fails: its run ends FAILED, the error reaches the caller, and fold 1 has
    no run (the error stops the cross-validation before it is created, and is not charged to it)."""
    torch.set_num_threads(1)
    real_log_epochs = CvTracker.log_epochs

    def disk_full(self, run_id, *args, **kwargs):
        raise OSError(28, "No space left on device")

    def summary_disk_full(self, run_id, epochs):
        # The summary travels with the last epoch's metrics (one request fewer per fold)
        if any("best_val_score" in metrics for _, metrics in epochs):
            disk_full(self, run_id)
        real_log_epochs(self, run_id, epochs)

    monkeypatch.setattr(CvTracker, "log_fold_summary", disk_full)
    monkeypatch.setattr(CvTracker, "log_epochs", summary_disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_cross_validation(
            _two_fold_config(data_dir), experiment="closing", progress=False, cache_root=tmp_path / "cache"
        )
    client = MlflowClient()
    (fold_run,) = _runs(client, KIND_FOLD)
    assert fold_run.data.tags["geopose.fold"] == "0" and fold_run.info.status == "FAILED"
    (cv_run,) = _runs(client, KIND_CV)
    assert cv_run.info.status == "FAILED"


def test_after_a_failed_upload_nothing_more_is_stored():
    """A failed upload is raised by the next wait, and later records are dropped, not stored past it."""
    from geopose_mlops.train.cv import EpochUploads

    done = []

    def fails():
        raise OSError("store down")

    uploads = EpochUploads()
    uploads.submit(done.append, "epoch 0")
    uploads.submit(fails)
    with pytest.raises(OSError, match="store down"):
        uploads.wait()
    uploads.submit(done.append, "epoch 2")
    uploads.close()
    assert done == ["epoch 0"]


def test_a_data_set_logged_by_two_runs_at_once_ends_up_linked_to_both(tmp_path, monkeypatch):
    """Two tune workers starting trials at once log the same data set: the store looks it up, then inserts
    it, so both can insert and the later one fails on the unique key (seen on PostgreSQL in CI, where the
    worker died). ``log_data`` tries once more, which finds the data set and links it; other store errors
    are raised."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    tracker = CvTracker("race")
    first, second = (tracker.client.create_run(tracker.experiment_id).info.run_id for _ in range(2))
    table = pd.DataFrame({"id": ["JAX_0", "OMA_0"], "city": ["JAX", "OMA"], "fold": [0, 1]})
    tracker.log_data(first, table, str(tmp_path), "d" * 64)  # the other worker's insert won the race

    calls = []
    original = MlflowClient.log_inputs

    def loses_the_race(self, run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:  # what the server answered the worker that died
            raise MlflowException(
                'BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                '"dataset_pk" DETAIL: Key (experiment_id, name, digest)=(3, geopose-train, dddd) already exists.'
            )
        return original(self, run_id, datasets, models)

    monkeypatch.setattr(MlflowClient, "log_inputs", loses_the_race)
    tracker.log_data(second, table, str(tmp_path), "d" * 64)
    assert calls == [second, second]
    for run_id in (first, second):
        (linked,) = MlflowClient().get_run(run_id).inputs.dataset_inputs
        assert linked.dataset.name == "geopose-train" and linked.dataset.digest == "d" * 36

    def store_down(self, run_id, datasets=None, models=None):
        raise MlflowException("connection refused")

    monkeypatch.setattr(MlflowClient, "log_inputs", store_down)
    with pytest.raises(MlflowException, match="connection refused"):
        tracker.log_data(second, table, str(tmp_path), "d" * 64)


def test_workers_creating_the_same_experiment_at_once_all_get_the_one_that_was_made(tmp_path, monkeypatch):
    """Two workers look the experiment up, find nothing, and both create it: the store refuses the later
    one (RESOURCE_ALREADY_EXISTS), and that worker takes the experiment the other one made."""
    from geopose_mlops.tracking.experiments import experiment_id

    made_by_the_other = MlflowClient().create_experiment("workers")
    looked_up = []
    original = MlflowClient.get_experiment_by_name

    def stale_first_look(self, name):
        looked_up.append(name)
        return None if len(looked_up) == 1 else original(self, name)  # as read before the other's commit

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first_look)
    assert experiment_id("workers", create=True) == made_by_the_other
    assert looked_up == ["workers", "workers"]
    assert [e.name for e in MlflowClient().search_experiments()].count("workers") == 1
