"""Numerical faults: a NaN loss stops the fold visibly; an image with no AGL truth is skipped with a warning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import KIND_CV, KIND_FOLD, KIND_TAG, LAST_NAME
from geopose_mlops.errors import GeoposeError
from geopose_mlops.metrics import GeoposeMetric, NoTruthWarning
from geopose_mlops.models import losses
from geopose_mlops.train.checkpoint import load_checkpoint
from geopose_mlops.train.cv import run_cross_validation


def test_all_no_data_image_is_skipped_with_a_warning_and_the_rest_scored() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((8, 8)) * 10
    metric = GeoposeMetric()
    metric.update("ARG", truth + 0.5, truth, 2.0, 0.3, 2.0, 0.3, sample_id="ARG_good")
    with pytest.warns(NoTruthWarning, match="ARG_empty .ARG.: every AGL pixel is no-data"):
        metric.update("ARG", truth, np.full((8, 8), np.nan), 2.0, 0.3, 2.0, 0.3, sample_id="ARG_empty")
    scores = metric.compute()
    assert metric.skipped == ["ARG_empty"]
    assert math.isfinite(scores["final_score"]) and scores["cities"]["ARG"]["agl_rmse"] == pytest.approx(0.5)


def test_loss_turning_nan_stops_the_fold_and_keeps_the_last_good_checkpoint(
    synthetic_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 0 trains normally; from the first micro-batch of epoch 1 on the loss is NaN."""
    torch.set_num_threads(1)
    real_build_loss = losses.build_loss
    calls = {"n": 0}

    def build_nan_loss(name, weights=None, city_means=None):
        loss_fn = real_build_loss(name, weights, city_means)

        def nan_after_first_epoch(outputs, batch):
            total, parts = loss_fn(outputs, batch)
            calls["n"] += 1
            return (total * math.nan if calls["n"] > 2 else total), parts  # 4 training images, batches of 2

        return nan_after_first_epoch

    monkeypatch.setattr(losses, "build_loss", build_nan_loss)
    config = TrainConfig(
        data_dir=str(synthetic_data), model=ModelConfig(encoder="resnet18"), epochs=3, lr=1e-3, batch_size=2,
        image_size=64, amp=False, k=2, folds=(0,), augment=False,
    )  # fmt: skip
    with pytest.raises(GeoposeError, match=r"training loss is nan at epoch 1.*Last good checkpoint: epoch 0"):
        run_cross_validation(
            config, experiment="nan", cache_root=tmp_path / "cache", work_dir=tmp_path / "work", progress=False
        )

    client = MlflowClient()
    experiment = client.get_experiment_by_name("nan").experiment_id
    (cv,) = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_CV}'")
    (fold,) = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    assert (cv.info.status, fold.info.status) == ("FAILED", "FAILED")
    history = client.get_metric_history(fold.info.run_id, "val_score")
    assert [m.step for m in history] == [0] and math.isfinite(history[0].value)  # no NaN epochs logged
    assert all(math.isfinite(m.value) for m in client.get_metric_history(fold.info.run_id, "train_loss"))
    stored = client.download_artifacts(fold.info.run_id, f"checkpoints/{LAST_NAME}", str(tmp_path / "dl"))
    assert load_checkpoint(stored)["epoch"] == 0
    local = tmp_path / "work" / cv.info.run_id / "fold_0" / LAST_NAME
    assert load_checkpoint(local)["epoch"] == 0
