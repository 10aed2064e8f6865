"""Shared helpers of the reliability tests: a data set with one of each kind of bad file, a CLI runner."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from geopose_mlops.data import io
from geopose_mlops.data.synth import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = [
    "--encoder", "resnet18", "--encoder-weights", "none", "--image-size", "64", "--batch-size", "2",
    "--k", "2", "--no-amp", "--no-augment", "--lr", "1e-3",
    "--metrics-interval", "0",  # each epoch's metrics in the store at once: the tests time kills on them
]  # fmt: skip

# MLflow's client retries a failed request for minutes by default; a test (or an impatient user) may
# shorten that through MLflow's own settings.
FAST_FAILURE = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def make_bad_dataset(root: Path) -> tuple[Path, dict[str, Path]]:
    """8 synthetic training images (ARG, ATL; 64 px), then one of each fault on its own sample.

    Returns:
        The data folder and ``{fault: the file at fault}`` for: truncated RGB, zero-byte AGL, AGL of the
        wrong size, NaN scale, a CSV row whose files do not exist, a file with no CSV row.
    """
    data = root / "data"
    make_synthetic_dataset(data, images_per_city=4, size=64, seed=0, cities=["ARG", "ATL"])
    train = data / "train"
    rgbs = sorted(train.glob("*_RGB.j2k"))
    ids = [p.name[: -len("_RGB.j2k")] for p in rgbs]
    bad = {
        "truncated_rgb": train / f"{ids[0]}_RGB.j2k",
        "empty_agl": train / f"{ids[1]}_AGL.tif",
        "wrong_size_agl": train / f"{ids[4]}_AGL.tif",
        "nan_scale": train / f"{ids[5]}_VFLOW.json",
        "row_without_files": train / "ARG_ghost1_RGB.j2k",
        "file_without_row": train / "ATL_orphan1_RGB.j2k",
    }
    raw = bad["truncated_rgb"].read_bytes()
    bad["truncated_rgb"].write_bytes(raw[: len(raw) // 2])
    bad["empty_agl"].write_bytes(b"")
    io.write_agl(bad["wrong_size_agl"], np.ones((32, 32), dtype=np.float32))
    bad["nan_scale"].write_text('{"scale": NaN, "angle": 0.5}')
    with (data / "geopose_train.csv").open("a") as handle:
        handle.write("ghost1,ARG_ghost1_AGL.tif,ARG_ghost1_VFLOW.json,ARG_ghost1_RGB.j2k\n")
    with (data / "metadata.csv").open("a") as handle:
        handle.write("ghost1,ARG,2.0\norphan1,ATL,2.0\n")
    bad["file_without_row"].write_bytes(rgbs[-1].read_bytes())
    return data, bad


def cli_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """Environment for a ``geopose-ml`` subprocess: this checkout first, one thread, the given store."""
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


def cli_command(*args: str) -> list[str]:
    """``python -m geopose_mlops.cli ARGS`` with this interpreter."""
    return [sys.executable, "-m", "geopose_mlops.cli", *args]


def count_metric(db: Path, key: str) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("select count(*) from metrics where key = ?", (key,)).fetchone()[0]
    except sqlite3.OperationalError:  # the store or its tables are not created yet
        return 0


def signal_after_first_epoch(command: list[str], env: dict, db: Path, sig: int, key: str = "val_score") -> int:
    """Run ``command``, send ``sig`` once the first ``key`` metric is in the store; its exit code."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while count_metric(db, key) == 0:
            assert process.poll() is None, f"ended before its first epoch: {process.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no epoch within 120 s"
            time.sleep(0.1)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    if sig == signal.SIGTERM:
        assert "interrupted" in stderr.splitlines()[-1], stderr[-2000:]
    return process.returncode
