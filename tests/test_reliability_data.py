"""Bad data: `train` refuses to start and names every bad file; `--skip-bad` trains on the rest and logs them."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from reliability_helpers import TINY_TRAIN, make_bad_dataset

from geopose_mlops.cli import main
from geopose_mlops.constants import KIND_CV, KIND_TAG
from geopose_mlops.data.check import usable_samples
from geopose_mlops.tracking.runs import SKIPPED_FILES


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_bad_dataset(tmp_path_factory.mktemp("bad"))


def test_header_check_leaves_out_exactly_the_bad_samples(bad_data) -> None:
    data, bad = bad_data
    samples, problems = usable_samples(data)
    named = {path for path, _ in problems}
    # The truncated JPEG 2000 has a valid header: only decoding (the cache build) finds it.
    assert {p for k, p in bad.items() if k != "truncated_rgb"} <= named
    assert bad["truncated_rgb"] not in named
    assert len(samples) == 8 - 3  # 3 bad samples among 8 (the ghost and the orphan never were samples)


def test_train_refuses_to_start_and_names_every_bad_file(bad_data, tmp_path, monkeypatch) -> None:
    data, bad = bad_data
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    result = CliRunner().invoke(
        main, ["train", "--data-dir", str(data), "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), *TINY_TRAIN]
    )
    assert result.exit_code == 1, result.output
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]  # one line
    assert "bad file(s)" in message
    for fault, path in bad.items():
        assert str(path) in message, fault
    assert "pixels cannot be decoded" in message and "'scale' must be a finite number" in message
    assert "AGL is 32x32 pixels but its RGB is 64x64" in message and "file is empty (0 bytes)" in message
    assert not db.exists()  # nothing trained, no run created


@pytest.mark.slow
def test_skip_bad_trains_on_the_rest_and_logs_the_skipped_files(bad_data, tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    data, bad = bad_data
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    args = ["train", "--data-dir", str(data), "--epochs", "1", "--skip-bad", "--experiment", "skip", *TINY_TRAIN]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, (result.output, result.exception)

    client = MlflowClient()
    (cv,) = client.search_runs(
        [client.get_experiment_by_name("skip").experiment_id], f"tags.`{KIND_TAG}` = '{KIND_CV}'"
    )
    assert cv.info.status == "FINISHED" and "cv_score" in cv.data.metrics
    skipped = pd.read_csv(client.download_artifacts(cv.info.run_id, SKIPPED_FILES, str(tmp_path)))
    assert set(skipped["path"]) == {str(p) for p in bad.values()} | {
        str(bad["row_without_files"]).replace("_RGB.j2k", "_AGL.tif"),
        str(bad["row_without_files"]).replace("_RGB.j2k", "_VFLOW.json"),
    }
    folds = pd.read_csv(client.download_artifacts(cv.info.run_id, "folds.csv", str(tmp_path)))
    assert len(folds) == 4  # 8 samples less the 4 with a bad file
    bad_ids = {p.name.rsplit("_", 1)[0] for p in bad.values()}
    assert not bad_ids & set(folds["id"])
