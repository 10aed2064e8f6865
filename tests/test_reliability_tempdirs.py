"""Nothing left behind: every temporary folder the package makes is gone after success, failure and Ctrl-C.

One test runs, under a private ``TMPDIR`` (``tempfile`` reads it again once ``tempfile.tempdir`` is
reset), a tiny cv, a cv that fails, a cv stopped by ``KeyboardInterrupt`` and its resume, a fold worker
of a shared cv, a one-trial study and a prediction, and then finds that folder empty; the user cache,
where runs keep their local records, is empty too (everything was stored).
"""

from __future__ import annotations

import importlib
import multiprocessing.util
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tiny_cv import run_tiny_cv, write_study_file

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import BEST_NAME, CHECKPOINT_DIR, ENSEMBLE_JSON
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.tracking.runs import fold_runs
from geopose_mlops.train.cv import run_cross_validation
from geopose_mlops.train.shared_cv import run_fold_worker, start_shared_cv


@pytest.fixture
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``TMPDIR`` set to an empty folder for this test (and ``tempfile``'s cached choice reset around it)."""
    # Not the package's: multiprocessing's one pymp-* folder per process (removed when the process exits)
    # and torch's compile cache, TMPDIR/torchinductor_USER, made when torch._dynamo is first imported
    # (lazily, by torch itself during training) and kept on purpose. Made here, before the switch.
    multiprocessing.util.get_temp_dir()
    importlib.import_module("torch._dynamo")
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(folder)
    yield folder
    tempfile.tempdir = None


def _stop_at_first_epoch(error: BaseException):
    def callback(fold: int, epoch: int, metrics: dict) -> None:
        raise error

    return callback


def _assert_empty(folder: Path, after: str) -> None:
    left = sorted(p.name for p in folder.iterdir())
    assert left == [], f"after {after}: {left} left in TMPDIR"


def _ensemble_folder(result, folder: Path) -> Path:
    """A one-member ensemble folder of a cv's fold ``best.pt`` files (as ``registry`` packages one)."""
    client = MlflowClient()
    for fold, fold_result in result.folds.items():
        path = client.download_artifacts(fold_result.run_id, f"{CHECKPOINT_DIR}/{BEST_NAME}", str(folder / "dl"))
        target = folder / CHECKPOINT_DIR / "m0" / f"fold{fold}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    EnsembleSpec(["m0"], "equal", [1.0], [1.0], [1.0], image_size=64).save(folder / ENSEMBLE_JSON)
    return folder


@pytest.mark.slow
def test_no_temporary_folder_is_left_after_cv_resume_worker_failure_study_and_predict(
    private_tmpdir, tmp_path, user_cache
) -> None:
    from geopose_mlops.inference import predict_folder
    from geopose_mlops.registry import load_predictor
    from geopose_mlops.tune.study import run_study
    from geopose_mlops.tune.study_file import load_study_config

    result = run_tiny_cv(tmp_path)  # a cv (data and cache under tmp_path)
    _assert_empty(private_tmpdir, "a cv")
    config = TrainConfig(
        data_dir=str(tmp_path / "data"), model=ModelConfig(encoder="resnet18", encoder_weights="none"),
        epochs=1, lr=1e-3, batch_size=2, image_size=64, amp=False, k=2, augment=False,
    )  # fmt: skip
    kwargs = {"cache_root": tmp_path / "cache", "device": "cpu", "progress": False}
    with pytest.raises(RuntimeError, match="stop here"):  # a failing cv
        run_cross_validation(config, "failing", on_epoch_end=_stop_at_first_epoch(RuntimeError("stop here")), **kwargs)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C
        run_cross_validation(config, "interrupted", on_epoch_end=_stop_at_first_epoch(KeyboardInterrupt()), **kwargs)
    _assert_empty(private_tmpdir, "a failed and an interrupted cv")
    interrupted = MlflowClient().get_experiment_by_name("interrupted").experiment_id
    (cv_run,) = [r for r in MlflowClient().search_runs([interrupted]) if r.data.tags.get("geopose.kind") == "cv"]
    resumed = run_cross_validation(config, resume_run_id=cv_run.info.run_id, **kwargs)  # a resumed cv
    assert set(fold_runs(MlflowClient(), interrupted, resumed.run_id)) == {0, 1}
    _assert_empty(private_tmpdir, "a resumed cv")

    shared = start_shared_cv(config, "shared", tmp_path / "cache")  # fold workers
    run_fold_worker(shared, [0], cache_root=tmp_path / "cache", device="cpu", progress=False)
    worker = run_fold_worker(shared, [1], cache_root=tmp_path / "cache", device="cpu", progress=False)
    assert worker.cv is not None
    _assert_empty(private_tmpdir, "two fold workers")

    study_file = write_study_file(tmp_path, tmp_path / "data", "tempdirs", "study")  # a 1-trial study
    study = run_study(load_study_config(study_file), n_trials=1, **kwargs)
    assert len(study.trials) == 1
    _assert_empty(private_tmpdir, "a study")

    threads = torch.get_num_threads()
    predictor = load_predictor(str(_ensemble_folder(result, tmp_path / "ensemble")))  # a prediction
    done = predict_folder(predictor, tmp_path / "data" / "train", tmp_path / "predictions", progress=False)
    torch.set_num_threads(threads)
    assert len(done) == 4
    _assert_empty(private_tmpdir, "a prediction")
    runs = user_cache / "geopose-mlops" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []  # every run stored all: no local copy kept
