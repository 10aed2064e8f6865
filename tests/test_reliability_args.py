"""Bad arguments: one line naming the value and the allowed range, exit code 2, nothing in the tracking store.

Each command runs in-process through click with ``MLFLOW_TRACKING_URI`` at a SQLite file that must not
even be created: validation happens before anything opens the store.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from geopose_mlops.cli import main
from geopose_mlops.constants import KIND_CV, KIND_TAG

TRAIN = ["train", "--encoder", "resnet18", "--image-size", "64", "--epochs", "1", "--k", "2", "--no-amp"]


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite tracking store path that does not exist yet."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return db


def _fails_cleanly(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(main, args)
    message = result.stderr.strip() if result.stderr else result.output.strip()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(message.splitlines()) == 1, message
    for text in expected:
        assert text in message, message
    return message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--lr", "0"], ["lr must be > 0, got 0.0"]),
        (["--lr", "-0.001"], ["lr must be > 0, got -0.001"]),
        (
            ["--batch-size", "4", "--effective-batch-size", "2"],
            ["effective_batch_size", "multiple of batch_size=4", "got 2"],
        ),
        (["--batch-size", "4", "--effective-batch-size", "6"], ["[1, 128]", "multiple of batch_size=4", "got 6"]),
        (["--batch-size", "0"], ["batch_size must be in [1, 128], got 0"]),
        (["--encoder", "resnet19"], ["unknown encoder 'resnet19'", "valid:", "resnet18"]),
        (["--encoder", "tu-notamodel"], ["unknown timm encoder 'tu-notamodel'"]),
        (["--decoder", "UNetPlusPlusPlus"], ["unknown decoder 'UNetPlusPlusPlus'", "Unet"]),
        (["--encoder-weights", "instagram"], ["has no weights 'instagram'", "available"]),
        (["--k", "5", "--folds", "7"], ["folds [7] out of range: with k=5 folds are 0..4"]),
        (["--folds", "first"], ["--folds 'first'", "0,2"]),
    ],
)
def test_bad_train_arguments_exit_2_before_the_store_exists(synthetic_data, store, extra, expected) -> None:
    _fails_cleanly([*TRAIN, "--data-dir", str(synthetic_data), *extra], *expected)
    assert not store.exists()


def test_study_file_with_an_unknown_key_exits_2_and_creates_nothing(tmp_path, store) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("study_name: s\nn_trails: 3\ntrain:\n  data_dir: data\n")
    message = _fails_cleanly(["tune", str(study)], str(study), "unknown key(s) ['n_trails']", "n_trials")
    assert "allowed" in message
    assert not store.exists()
    assert not (tmp_path / "s.db").exists()  # nor the Optuna storage


def test_study_file_with_an_out_of_range_value_exits_2(tmp_path, store) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("study_name: s\ntrain: {data_dir: data}\nsearch_space: {lr: {low: 0.1, high: 0.01}}\n")
    _fails_cleanly(["tune", str(study)], "search_space.lr", "low < high", "low=0.1 high=0.01")
    assert not store.exists()


def test_promote_of_a_run_that_is_not_an_ensemble_exits_2_and_registers_nothing(store) -> None:
    client = MlflowClient()
    experiment = client.create_experiment("geopose")
    run = client.create_run(experiment, tags={KIND_TAG: KIND_CV})
    _fails_cleanly(["promote", "--ensemble", run.info.run_id], run.info.run_id, "not an ensemble run", KIND_CV)
    assert client.search_registered_models() == []
    assert len(client.search_runs([experiment])) == 1
