"""Shared fixtures: a private tracking store and user cache for every test, one tiny synthetic data set per session.

The data set follows torchgeo's fixtures (SIZE small, seed 0). The tracking store follows MLflow's own
test suite, whose autouse fixture points every test at a fresh store: here a SQLite file in the test's
``tmp_path``, set both for this process (``mlflow.set_tracking_uri``) and for the commands a test
starts (``MLFLOW_TRACKING_URI``), and the previous values restored afterwards.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from geopose_mlops.data.synth import make_synthetic_dataset

SIZE = 64  # pixels
SEED = 0


@pytest.fixture(autouse=True)
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This test's own SQLite tracking store, ``sqlite:///<tmp_path>/mlflow.db`` (created on first use).

    A test that needs another store (a server) sets it itself; the fixture restores what was there before.
    """
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own user cache (``XDG_CACHE_HOME``): where runs keep their local records without --work-dir.

    What a test leaves there (a run stopped by a store failure keeps its unsent records) stays in its
    ``tmp_path``, not in the home directory.
    """
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def pytest_report_header(config: pytest.Config) -> str:
    """The free space where the tests write: a full disk shows as many unrelated failures."""
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free
    return f"free disk under {tempfile.gettempdir()}: {free / 2**30:.1f} GiB (the suite needs ~4 GiB at once)"


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for what one test module's tests share, removed after its last test unless one failed.

    The module-scoped counterpart of ``tmp_path`` under ``tmp_path_retention_policy = "failed"``: the
    checkpoints and stores a module builds do not stay on disk for the rest of the session.
    """
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synth folder: 2 training + 1 test image per city, 64 px, seed 0 (test truth in test_truth/).

    Shared by the whole session: tests must not modify it (copy it first).
    """
    out = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic_dataset(out, images_per_city=2, size=SIZE, seed=SEED, test_images_per_city=1)
    return out
