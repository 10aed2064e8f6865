"""Pytest plugin: a throw-away PostgreSQL cluster and an ``mlflow server`` on it, shared per session.

Test modules opt in with ``pytest_plugins = ["conftest_pg"]``. Where PostgreSQL is not installed or
will not start, every test that asks for these fixtures is SKIPPED with the reason (``pytest -ra``
prints it); nothing passes without having run against the real thing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from geopose_mlops.tracking.server import MlflowServer, PostgresCluster, ServerError


@dataclass
class TrackingStack:
    """What the shared-tracking tests talk to."""

    cluster: PostgresCluster
    server: MlflowServer
    tracking_uri: str  # http://127.0.0.1:PORT, for MLFLOW_TRACKING_URI
    artifacts_dir: Path

    def optuna_storage(self, name: str) -> str:
        """A fresh PostgreSQL database for an Optuna study, as a SQLAlchemy URL."""
        return self.cluster.create_database(name)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster on a free loopback port; skipped (with the reason) where it cannot start."""
    # Under /tmp rather than pytest's tmp_path: as root, the cluster runs as the postgres user, who
    # cannot traverse pytest's root-private temporary directories.
    root = Path(tempfile.mkdtemp(prefix="geopose-pg-"))
    root.chmod(0o755)
    cluster = PostgresCluster(root / "cluster")
    try:
        cluster.start()
    except ServerError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL unavailable: {err}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_stack(
    postgres_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrackingStack]:
    """``mlflow server`` on the cluster's ``mlflow`` database with artifacts served from a temp dir."""
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    server = MlflowServer(postgres_cluster.create_database("mlflow"), artifacts, workers=2)
    server.start(timeout_s=180)
    yield TrackingStack(postgres_cluster, server, server.url, artifacts)
    server.stop()
