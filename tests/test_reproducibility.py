"""The same seed trains the same fold: with or without DataLoader workers, and killed then resumed."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import KIND_FOLD, KIND_TAG
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.models import losses
from geopose_mlops.train.cv import run_cross_validation

CURVES = ("train_loss", "val_score", "val_agl_rmse")


class Killed(Exception):
    """Stands in for a kill after an epoch."""


def _not_called(*args, **kwargs):
    raise AssertionError("output units computed again on resume")


def _config(data_dir, num_workers: int) -> TrainConfig:
    # Augmentation on (draws per sample) and the scale head's dropout (torch's generator) both in play.
    return TrainConfig(
        data_dir=str(data_dir),
        model=ModelConfig(encoder="resnet18"),
        epochs=3,
        lr=1e-3,
        batch_size=2,
        image_size=64,
        k=2,
        folds=(0,),
        amp=False,
        augment=True,
        height_warp_p=0.5,
        num_workers=num_workers,
    )


def _curves(client: MlflowClient, experiment: str) -> dict[str, list[tuple[int, float]]]:
    exp = client.get_experiment_by_name(experiment)
    (fold_run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    history = client.get_metric_history
    return {name: sorted((m.step, m.value) for m in history(fold_run.info.run_id, name)) for name in CURVES}


@pytest.mark.slow
def test_workers_and_a_kill_with_resume_leave_every_epoch_s_metrics_unchanged(tmp_path, monkeypatch):
    """One fold of 3 epochs three ways: in-process loading; 2 loader workers; killed after epoch 0 and resumed.

    All three log the same training loss, validation score and RMSE at every epoch, to the last bit:
    the samples' augmentation is seeded per (epoch, position), the loaders draw their worker seeds from
    their own generator (torch's default one lost a draw per epoch without persistent workers, which
    shifted the dropout masks), and each epoch seeds torch's generators from the fold's seed and the epoch.
    """
    torch.set_num_threads(1)
    data_dir = tmp_path / "data"
    make_synthetic_dataset(data_dir, images_per_city=2, size=64, seed=0)
    cache = tmp_path / "cache"
    run_cross_validation(_config(data_dir, 0), experiment="in_process", progress=False, cache_root=cache)
    run_cross_validation(_config(data_dir, 2), experiment="workers", progress=False, cache_root=cache)

    def stop(fold, epoch, metrics):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        run_cross_validation(
            _config(data_dir, 0), experiment="resumed", on_epoch_end=stop, progress=False, cache_root=cache
        )
    client = MlflowClient()
    exp = client.get_experiment_by_name("resumed")
    (killed,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{KIND_FOLD}'")
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "val_score")] == [0]
    with monkeypatch.context() as patch:  # the checkpoint brings the output units: no images read for them
        patch.setattr(losses, "output_units_from", _not_called)
        run_cross_validation(_config(data_dir, 0), resume_run_id=killed.info.run_id, progress=False, cache_root=cache)

    reference = _curves(client, "in_process")
    assert all([step for step, _ in curve] == [0, 1, 2] for curve in reference.values())
    assert _curves(client, "workers") == reference
    assert _curves(client, "resumed") == reference
