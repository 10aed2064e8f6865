"""Separate worker processes each train one fold of one cross-validation on the shared tracking server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from geopose_mlops.constants import KIND_TAG
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.metrics import GeoposeMetric
from geopose_mlops.train.oof import OofPredictions

pytest_plugins = ["conftest_pg"]

REPO = Path(__file__).resolve().parents[1]
TRAIN_OPTIONS = [
    "--encoder", "resnet18", "--decoder", "Unet", "--encoder-weights", "none", "--epochs", "1",
    "--batch-size", "2", "--image-size", "64", "--no-amp", "--k", "2", "--no-augment", "--seed", "3",
]  # fmt: skip


def geopose_ml(*args: str) -> list[str]:
    return [sys.executable, "-m", "geopose_mlops.cli", *args]


def env_for(tracking_uri: str) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_share_one_cv_and_the_last_logs_cv_score(tracking_stack, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from geopose_mlops.tracking.truth import stored_truth

    data = tmp_path / "data"
    make_synthetic_dataset(data, images_per_city=2, size=64, seed=0, cities=("JAX", "OMA"), rgb_format="tif")
    env = env_for(tracking_stack.tracking_uri)
    common = ["--data-dir", str(data), *TRAIN_OPTIONS, "--experiment", "shared-cv"]
    start = subprocess.run(geopose_ml("cv", "start", *common), env=env, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stderr
    cv_run_id = start.stdout.strip().splitlines()[-1]

    early = subprocess.run(geopose_ml("cv", "finalize", cv_run_id), env=env, capture_output=True, text=True)
    assert early.returncode == 1 and "fold 0: no run" in early.stderr and "fold 1: no run" in early.stderr

    workers = [
        subprocess.Popen(
            geopose_ml("train", *common, "--parent-run-id", cv_run_id, "--folds", str(fold)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for fold in (0, 1)
    ]
    outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)
    assert sum("all folds in, cv_score" in out for out in outputs) >= 1

    client = MlflowClient(tracking_stack.tracking_uri)
    cv_run = client.get_run(cv_run_id)
    assert cv_run.info.status == "FINISHED" and cv_run.data.tags[KIND_TAG] == "cv"
    experiment = cv_run.info.experiment_id
    fold_runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{cv_run_id}'")
    assert sorted(r.data.tags["geopose.fold"] for r in fold_runs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in fold_runs)
    # The parent's cv_score is the metric over both folds' out-of-fold predictions, as stored (the truth once).
    mlflow.set_tracking_uri(tracking_stack.tracking_uri)  # the conftest fixture restores its own afterwards
    truth = stored_truth(cv_run.data.params["data_fingerprint"], tmp_path / "truth")
    metric = GeoposeMetric()
    for run in fold_runs:
        folder = client.download_artifacts(run.info.run_id, "oof", str(tmp_path / run.info.run_id))
        OofPredictions.load(folder, truth).update_metric(metric)
    assert len(metric.cities) == 2 and sum(c.images for c in metric.cities.values()) == 4
    assert cv_run.data.metrics["cv_score"] == pytest.approx(metric.compute()["final_score"], abs=1e-9)


def test_a_worker_refuses_options_that_would_train_its_fold_differently(tmp_path):
    """Every fold of a shared cv trains the cv run's configuration: a worker given another --epochs or --lr
    exits 2 naming both, before any fold run exists; the same values, or local options, are accepted."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from geopose_mlops.cli import main
    from geopose_mlops.train.shared_cv import worker_config

    data = tmp_path / "data"
    make_synthetic_dataset(data, images_per_city=2, size=64, seed=0, cities=("JAX", "OMA"))
    common = ["--data-dir", str(data), *TRAIN_OPTIONS, "--experiment", "shared-cv"]
    start = CliRunner().invoke(main, ["cv", "start", *common])
    assert start.exit_code == 0, start.output
    cv_run_id = start.stdout.strip().splitlines()[-1]

    worker = ["train", "--data-dir", str(data), "--parent-run-id", cv_run_id, "--folds", "0"]
    refused = CliRunner().invoke(main, [*worker, "--epochs", "3", "--lr", "0.01", "--encoder", "resnet18"])
    assert refused.exit_code == 2, refused.output
    message = refused.stderr if refused.stderr else refused.output
    assert "epochs 3 (the run's: 1)" in message and "lr 0.01 (the run's: 0.0001)" in message, message
    assert "encoder" not in message.split("given here:")[1]  # the same value is not a difference
    client = MlflowClient()
    assert client.search_runs([client.get_experiment_by_name("shared-cv").experiment_id],
                              f"tags.mlflow.parentRunId = '{cv_run_id}'") == []  # fmt: skip

    from geopose_mlops.tracking.runs import CvTracker
    from geopose_mlops.train.shared_cv import _load_shared

    config, _ = _load_shared(CvTracker("shared-cv"), cv_run_id)
    local = worker_config(config, cv_run_id, {"num_workers": 3, "metrics_interval_s": 0.0, "epochs": 1})
    assert (local.num_workers, local.metrics_interval_s) == (3, 0.0)
    assert local.epochs == config.epochs and local.model == config.model
