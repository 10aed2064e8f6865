"""Interruptions: SIGTERM and SIGKILL during `train`, and a kill during the cache build.

Training: the killed run resumes with every epoch logged exactly once; SIGTERM closes the runs as
KILLED, SIGKILL leaves them RUNNING and `--resume` still works. Cache: a build killed half way leaves no
entry that would be reused, and the rebuild equals a clean build. (Tuning: tests/test_reliability_tune.py.)
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from reliability_helpers import TINY_TRAIN, cli_command, cli_env, signal_after_first_epoch

from geopose_mlops.cli import main
from geopose_mlops.constants import KIND_CV, KIND_FOLD, KIND_TAG
from geopose_mlops.data.cache import build_cache
from geopose_mlops.data.layout import find_samples
from geopose_mlops.data.synth import make_synthetic_dataset

EPOCHS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training images (ARG, ATL), 64 px: two folds of two."""
    root = tmp_path_factory.mktemp("interrupt") / "data"
    make_synthetic_dataset(root, images_per_city=2, size=64, seed=0, cities=["ARG", "ATL"])
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "local_copy"),
    [(signal.SIGTERM, True), (signal.SIGKILL, True), (signal.SIGKILL, False)],
    ids=["sigterm", "sigkill", "sigkill-nothing-stored"],
)
def test_killed_training_resumes_with_every_epoch_logged_once(
    data_dir, tmp_path, monkeypatch, sig, local_copy
) -> None:
    """Without a local copy, a SIGKILL before the first checkpoint upload (checkpoint_interval_s) leaves
    nothing to resume from: the fold trains again from epoch 0 and does not log epoch 0 a second time."""
    torch.set_num_threads(1)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    args = ["train", "--data-dir", str(data_dir), "--epochs", str(EPOCHS), "--experiment", "kill", *TINY_TRAIN]
    args += ["--cache-dir", str(tmp_path / "cache")]
    if local_copy:
        args += ["--work-dir", str(tmp_path / "work")]
    code = signal_after_first_epoch(cli_command(*args), cli_env(uri), db, sig)
    assert code == (130 if sig == signal.SIGTERM else -signal.SIGKILL)

    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kill").experiment_id
    (cv,) = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_CV}'")
    folds = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    expected = "KILLED" if sig == signal.SIGTERM else "RUNNING"  # SIGKILL cannot be caught
    assert cv.info.status == expected and {f.info.status for f in folds} == {expected}

    result = CliRunner().invoke(main, [*args, "--resume", cv.info.run_id])
    assert result.exit_code == 0, (result.output, result.exception)
    cv = client.get_run(cv.info.run_id)
    folds = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    assert cv.info.status == "FINISHED" and "cv_score" in cv.data.metrics
    assert len(folds) == 2 and {f.info.status for f in folds} == {"FINISHED"}
    for fold in folds:
        for key in ("val_score", "train_loss", "lr"):
            steps = [m.step for m in client.get_metric_history(fold.info.run_id, key)]
            assert sorted(steps) == list(range(EPOCHS)), (fold.data.tags, key, steps)


_BUILD = """
import sys
from geopose_mlops.data.cache import build_cache
from geopose_mlops.data.layout import find_samples
build_cache(find_samples(sys.argv[1]), sys.argv[2], int(sys.argv[3]), progress=False)
"""


@pytest.mark.slow
def test_cache_build_killed_half_way_is_never_reused(tmp_path) -> None:
    data = tmp_path / "data"
    make_synthetic_dataset(data, images_per_city=6, size=256, seed=1)
    cache_root = tmp_path / "cache"
    process = subprocess.Popen(cli_command()[:1] + ["-c", _BUILD, str(data), str(cache_root), "256"], env=cli_env(""))
    deadline = time.monotonic() + 60
    while not list(cache_root.glob(".tmp-*/rgb.npy")):  # the entry is being written
        assert process.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert [p.name for p in cache_root.iterdir() if not p.name.startswith(".tmp-")] == []  # no entry to reuse

    samples = find_samples(data)
    rebuilt = build_cache(samples, cache_root, 256, progress=False)
    clean = build_cache(samples, tmp_path / "clean", 256, progress=False)
    assert rebuilt.fingerprint == clean.fingerprint and rebuilt.ids == clean.ids
    for name in ("rgb", "agl", "scale", "angle", "gsd", "city_index"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(clean, name))
    assert not list(cache_root.glob(".tmp-*"))  # the dead build's folder was cleared
