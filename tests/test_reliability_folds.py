"""Where the data and the folds come from: a --data-dir that is not a folder, and a team's own folds.csv.

A ``--data-dir`` that is not a folder is a bad argument: exit 2, one line naming it, nothing written. A
``DATA/folds.csv`` is used when it lists every training sample (by ``CITY_id`` or by the competition's
bare id) and its number of folds is ``--k`` (or ``--k`` is left out and taken from it); otherwise exit 2
naming the file and what disagrees. The cv run records which folds it used (tag ``geopose.folds_file``).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from geopose_mlops.cli import main
from geopose_mlops.constants import FOLDS_CSV, FOLDS_FILE_TAG, KIND_CV, KIND_TAG
from geopose_mlops.data.layout import find_samples
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.errors import ConfigError
from geopose_mlops.train.data import folds_table_for

TRAIN = ["--encoder", "resnet18", "--encoder-weights", "none", "--image-size", "64", "--batch-size", "2"]
TRAIN += ["--epochs", "1", "--no-amp", "--no-augment"]


@pytest.fixture(scope="module")
def six_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 training images in each of ARG and JAX, 64 px (shared: copy before adding a folds.csv)."""
    data = tmp_path_factory.mktemp("folds") / "data"
    make_synthetic_dataset(data, images_per_city=3, size=64, seed=0, cities=("ARG", "JAX"))
    return data


@pytest.fixture
def data_dir(six_images: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(six_images, tmp_path / "data"))


def _agreed_split(data_dir: Path) -> dict[str, int]:
    """A split no seed would make: samples in name order dealt over 3 folds."""
    return {s.sample_id: i % 3 for i, s in enumerate(find_samples(data_dir, "train"))}


def _write_folds(data_dir: Path, folds: dict[str, int], form: str) -> Path:
    """``DATA/folds.csv`` with ids as ``CITY_id`` (``full``), bare with a city column (``bare``) or bare alone."""
    path = data_dir / FOLDS_CSV
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "fold"] if form == "bare_no_city" else ["id", "city", "fold"])
        for sample_id, fold in folds.items():
            city, bare = sample_id.split("_", 1)
            if form == "full":
                writer.writerow([sample_id, city, fold])
            else:
                writer.writerow([bare, fold] if form == "bare_no_city" else [bare, city, fold])
    return path


@pytest.mark.parametrize("kind", ["missing", "file"])
@pytest.mark.parametrize("command", [["train"], ["cv", "start"]])
def test_a_data_dir_that_is_not_a_folder_exits_2_naming_it_and_writes_nothing(
    tmp_path, tracking_uri, kind, command
) -> None:
    target = tmp_path / "nowhere"
    if kind == "file":
        target.write_text("not a data set")
    result = CliRunner().invoke(main, [*command, "--data-dir", str(target), "--cache-dir", str(tmp_path / "c"), *TRAIN])
    assert result.exit_code == 2, (result.output, result.exception)
    (message,) = result.stderr.strip().splitlines()
    assert f"--data-dir {target}: {'does not exist' if kind == 'missing' else 'is a file'}" in message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "c").exists()  # no store, no cache


@pytest.mark.parametrize("form", ["full", "bare", "bare_no_city"])
def test_a_folds_file_in_any_id_form_gives_its_own_split(data_dir, form) -> None:
    wanted = _agreed_split(data_dir)
    path = _write_folds(data_dir, wanted, form)
    table, source = folds_table_for(find_samples(data_dir, "train"), data_dir, k=3, seed=0)
    assert dict(zip(table["id"], table["fold"], strict=True)) == wanted
    assert source == str(path.resolve())


def test_without_a_folds_file_the_folds_are_seeded_and_said_so(data_dir) -> None:
    table, source = folds_table_for(find_samples(data_dir, "train"), data_dir, k=2, seed=7)
    assert sorted(table["fold"].unique()) == [0, 1] and source == "seeded k=2 seed=7"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("k", "has 3 folds but k=2; give --k 3 (or leave --k out)"),
        ("missing", "does not list 1 of the 6 training samples"),
        ("gap", "the training samples' folds are [0, 2]; expected 0..K-1"),
    ],
)
def test_a_folds_file_that_disagrees_is_refused_naming_it(data_dir, change, expected) -> None:
    folds = _agreed_split(data_dir)
    k = 2 if change == "k" else 3
    if change == "missing":
        folds.pop(sorted(folds)[0])
    if change == "gap":
        folds = {sample_id: 2 if fold == 1 else fold for sample_id, fold in folds.items()}
    path = _write_folds(data_dir, folds, "bare")
    with pytest.raises(ConfigError, match="folds") as refused:
        folds_table_for(find_samples(data_dir, "train"), data_dir, k=k, seed=0)
    assert str(path) in str(refused.value) and expected in str(refused.value), refused.value


def test_train_uses_the_folds_file_takes_k_from_it_and_records_it(data_dir, tmp_path) -> None:
    wanted = _agreed_split(data_dir)
    path = _write_folds(data_dir, wanted, "bare")  # the form of geopose_train.csv and metadata.csv
    args = ["train", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--folds", "0", *TRAIN]
    result = CliRunner().invoke(main, args)  # --k left out: 3, from the file
    assert result.exit_code == 0, (result.output, result.exception)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("geopose").experiment_id
    (cv,) = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_CV}'")
    assert cv.data.tags[FOLDS_FILE_TAG] == str(path.resolve()) and cv.data.params["k"] == "3"
    logged = pd.read_csv(client.download_artifacts(cv.info.run_id, FOLDS_CSV, str(tmp_path / "logged")))
    assert dict(zip(logged["id"], logged["fold"], strict=True)) == wanted


def test_train_with_another_k_than_the_folds_file_exits_2_before_any_run(data_dir, tmp_path) -> None:
    path = _write_folds(data_dir, _agreed_split(data_dir), "full")
    args = ["train", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--k", "2", *TRAIN]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    (message,) = result.stderr.strip().splitlines()
    assert f"{path} has 3 folds but k=2" in message
    assert not (tmp_path / "cache").exists()  # refused before the data were decoded
    experiment = MlflowClient().get_experiment_by_name("geopose")
    assert experiment is None or MlflowClient().search_runs([experiment.experiment_id]) == []
