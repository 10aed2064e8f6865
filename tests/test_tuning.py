"""``geopose-ml tune`` end to end on 64-px synthetic data: trial runs under one study run, resuming,
pruning, and two workers on one storage. The model is a small timm MobileNetV3 (2.3 M parameters, weights
off) so checkpoints stay small; training is real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from click.testing import CliRunner
from tiny_cv import write_study_file

from geopose_mlops.cli import main
from geopose_mlops.tracking.studies import TRIAL_NUMBER_TAG, TRIAL_STATE_TAG

REPO = Path(__file__).resolve().parents[1]


def study_file(folder: Path, data_dir: Path, name: str, extra: str = "", epochs: int = 1) -> Path:
    return write_study_file(folder, data_dir, name, "tune-tests", epochs=epochs, extra=extra)


@pytest.fixture(scope="module")
def workspace(module_tmp: Path, synthetic_data: Path):
    """A private copy of the synthetic data (its cache is written beside it) and a tracking store."""
    root = module_tmp
    data = root / "data"
    shutil.copytree(synthetic_data, data)
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    torch.set_num_threads(1)
    yield root, data
    mlflow.set_tracking_uri(previous)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def runs_of(kind: str, study_run_id: str | None = None):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tune-tests")
    query = f"tags.`geopose.kind` = '{kind}'"
    if study_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{study_run_id}'"
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)


def study_run(name: str):
    runs = [r for r in runs_of("study") if r.data.tags["optuna.study_name"] == name]
    assert len(runs) == 1, f"expected one study run for {name}, got {len(runs)}"
    return runs[0]


def tune(*args: str) -> None:
    result = CliRunner().invoke(main, ["tune", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "best value" in result.output


@pytest.mark.slow
def test_four_trials_under_one_study_run_then_resume(workspace) -> None:
    root, data = workspace
    path = study_file(root, data, "lr_batch_small")
    tune(str(path), "--n-trials", "4")

    study = optuna.load_study(study_name="lr_batch_small", storage=f"sqlite:///{root}/lr_batch_small.db")
    assert len(study.trials) == 4
    parent = study_run("lr_batch_small")
    trials = runs_of("trial", parent.info.run_id)
    assert len(trials) == 4
    values = []
    for run in trials:
        assert 1e-5 <= float(run.data.params["lr"]) <= 1e-3
        assert 1 <= int(run.data.params["effective_batch_size"]) <= 128
        assert int(run.data.params["effective_batch_size"]) % int(run.data.params["batch_size"]) == 0
        number = int(run.data.tags[TRIAL_NUMBER_TAG])
        assert study.trials[number].user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.metrics["trial_value"] == pytest.approx(study.trials[number].value)
        assert "val_score" in run.data.metrics and run.info.status == "FINISHED"
        values.append(run.data.metrics["trial_value"])
    assert parent.data.metrics["best_value"] == pytest.approx(max(values))
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["search_space.lr"] == "log[1e-05, 0.001]"
    client = mlflow.MlflowClient()
    artifacts = {a.path for folder in ("study", "plots") for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {"study/trials.csv", "study/trials.json", "plots/optimization_history.png"} <= artifacts
    assert "plots/param_importances.png" in artifacts

    tune(str(path), "--n-trials", "2")  # the same command again: the study grows, nothing starts over
    study = optuna.load_study(study_name="lr_batch_small", storage=f"sqlite:///{root}/lr_batch_small.db")
    assert [t.number for t in study.trials] == list(range(6))
    again = study_run("lr_batch_small")
    assert again.info.run_id == parent.info.run_id
    trials = runs_of("trial", parent.info.run_id)
    assert sorted(int(r.data.tags[TRIAL_NUMBER_TAG]) for r in trials) == list(range(6))
    assert again.data.metrics["best_value"] == pytest.approx(max(r.data.metrics["trial_value"] for r in trials))
    rows = client.download_artifacts(parent.info.run_id, "study/trials.csv", str(root / "dl"))
    assert len(Path(rows).read_text().strip().splitlines()) == 1 + 6


@pytest.mark.slow
def test_bad_learning_rates_are_pruned_and_their_runs_say_so(workspace) -> None:
    root, data = workspace
    epochs = 3
    pruner = "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}\n"
    path = study_file(root, data, "pruning", extra=pruner, epochs=epochs)
    text = path.read_text().replace("lr: {low: 1e-5, high: 1e-3}", "lr: {low: 1e-7, high: 1e-1}")
    path.write_text(text.replace("scale: log", "scale: pow2"))
    # One trial in the good region runs to the end; two in the bad one (AdamW at lr >= 1e-2 wrecks
    # this small model within an epoch) must be stopped after their first epoch.
    storage = f"sqlite:///{root}/pruning.db"
    seeded = optuna.create_study(study_name="pruning", storage=storage, direction="maximize")
    for lr in (1e-6, 3e-2, 6e-2):
        seeded.enqueue_trial({"lr": lr, "log2_effective_batch_size": 0})
    tune(str(path), "--n-trials", "3")

    study = optuna.load_study(study_name="pruning", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] + [optuna.trial.TrialState.PRUNED] * 2
    client = mlflow.MlflowClient()
    for trial in study.trials[1:]:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags[TRIAL_STATE_TAG] == "PRUNED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_score")]
        assert max(steps) < epochs - 1, "pruned before its last epoch"
        assert "trial_value" not in run.data.metrics
    complete = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert complete.data.tags[TRIAL_STATE_TAG] == "COMPLETE"
    assert len(client.get_metric_history(complete.info.run_id, "val_score")) == epochs
    assert study_run("pruning").data.metrics["n_trials_pruned"] == 2


@pytest.mark.slow
def test_two_workers_share_one_study(workspace) -> None:
    root, data = workspace
    path = study_file(root, data, "parallel")
    mlflow.MlflowClient().get_experiment_by_name("tune-tests") or mlflow.MlflowClient().create_experiment(
        "tune-tests"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "geopose_mlops.cli", "tune", str(path), "--n-trials", "2"]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in "ab"]
    outputs = [w.communicate(timeout=300)[0].decode() for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="parallel", storage=f"sqlite:///{root}/parallel.db")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    parent = study_run("parallel")
    trials = runs_of("trial", parent.info.run_id)
    assert sorted(int(r.data.tags[TRIAL_NUMBER_TAG]) for r in trials) == [0, 1, 2, 3]
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in trials}
