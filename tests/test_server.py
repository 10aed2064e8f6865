"""The shared tracking stack: PostgreSQL backend store, served artifacts, Optuna storage beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from geopose_mlops.tracking.server import MlflowServer, ServerError, free_port, mlflow_server_command

pytest_plugins = ["conftest_pg"]


def test_server_command_serves_artifacts_from_destination(tmp_path):
    command = mlflow_server_command("postgresql+psycopg2://u@h:5432/db", tmp_path / "art", port=5123)
    assert command[command.index("--backend-store-uri") + 1] == "postgresql+psycopg2://u@h:5432/db"
    assert "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1] == str((tmp_path / "art").resolve())
    assert command[command.index("--port") + 1] == "5123"


def test_server_that_cannot_start_names_its_log(tmp_path):
    server = MlflowServer("notadb://nowhere", tmp_path / "art", port=free_port())
    with pytest.raises(ServerError, match="mlflow-server.log"):
        server.start(timeout_s=60)
    assert server.process is None


def test_cli_server_needs_exactly_one_backend(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "geopose_mlops.cli", "server", "--artifacts-destination", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 1
    assert "--backend-store-uri" in result.stderr and "--init-postgres" in result.stderr


@pytest.mark.postgres
@pytest.mark.slow
def test_runs_and_artifacts_land_in_postgres_and_artifact_store(tracking_stack, tmp_path, monkeypatch):
    import mlflow
    import optuna
    import sqlalchemy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_stack.tracking_uri)
    mlflow.set_tracking_uri(tracking_stack.tracking_uri)
    experiment_id = mlflow.create_experiment("server-smoke")
    note = tmp_path / "note.txt"
    note.write_text("served")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("cv_score", 0.5)
        mlflow.log_artifact(str(note))
    # The run is a row in PostgreSQL, and the artifact went through the server into its destination.
    engine = sqlalchemy.create_engine(tracking_stack.cluster.url("mlflow"))
    with engine.connect() as conn:
        value = conn.execute(
            sqlalchemy.text("SELECT value FROM metrics WHERE run_uuid = :r AND key = 'cv_score'"),
            {"r": run.info.run_id},
        ).scalar_one()
    engine.dispose()
    assert value == 0.5
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list(tracking_stack.artifacts_dir.rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "served"
    # Optuna keeps its studies in its own database on the same cluster.
    storage = tracking_stack.optuna_storage("optuna_smoke")
    study = optuna.create_study(study_name="smoke", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="smoke", storage=storage).trials) == 2
