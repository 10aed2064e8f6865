"""The one look-up (and creation) of MLflow experiments by name, used by every tracking module.

Training and tuning create the experiment they log to; reports, ensemble fits and promotions only
read one, and refuse a name that is missing or deleted with a ``ConfigError`` naming it and the store.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from geopose_mlops.errors import ConfigError


def default_artifact_location(name: str) -> str | None:
    """Where a new experiment's artifacts go: beside a local SQLite store, else the server's choice.

    MLflow's own default for a SQLite store is ``./mlruns`` relative to whatever folder a command runs
    in, which scatters checkpoints over working directories; ``sqlite:///.../mlflow.db`` keeps them in
    ``.../mlartifacts/<experiment>`` instead.

    Args:
        name: The experiment's name (the last folder of the location).

    Returns:
        A ``file:`` URI, or None to let the tracking server choose.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if not database.is_absolute():
        database = Path.cwd() / database
    return (database.parent / "mlartifacts" / name).as_uri()


def experiment_id(name: str, create: bool = False, artifact_location: str | None = None) -> str:
    """The id of experiment ``name`` in the current tracking store.

    With ``create``, a missing experiment is created with ``artifact_location`` (by default
    ``default_artifact_location``). Workers starting at once (tune or fold workers on one server) may
    all find it missing: those whose creation loses the race (``RESOURCE_ALREADY_EXISTS``) take the
    winner's.

    Args:
        name: Experiment name.
        create: Create the experiment if it does not exist (what training and tuning do).
        artifact_location: Artifact root of a created experiment; ignored for an existing one.

    Raises:
        ConfigError: Without ``create``, no active experiment has that name (missing or deleted).
    """
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if create:
        return found.experiment_id if found is not None else _create(client, name, artifact_location)
    if found is None or found.lifecycle_stage != "active":
        uri = mlflow.get_tracking_uri()
        raise ConfigError(f"--experiment {name!r}: no active MLflow experiment of that name in {uri}")
    return found.experiment_id


def _create(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Create experiment ``name``; the id of the one another worker made if it won the race."""
    try:
        return client.create_experiment(name, artifact_location=artifact_location or default_artifact_location(name))
    except MlflowException as err:
        found = client.get_experiment_by_name(name) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if found is None:
            raise
        return found.experiment_id
