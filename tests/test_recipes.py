"""Training recipes (issue 15): weight averages, r2 city means, height warp and staged training from a tracked run.

The averages are checked exactly on hand-set weights (dyadic values, so every sum is exact in float32);
the wiring through tracked runs on the session's 64 px synthetic data set (2 folds, resnet18 weights off).
"""

from __future__ import annotations

import dataclasses
import math

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import BEST_NAME, CHECKPOINT_DIR, INIT_FROM_TAG, LAST_NAME
from geopose_mlops.data.cache import build_cache
from geopose_mlops.data.folds import make_folds
from geopose_mlops.data.layout import find_samples
from geopose_mlops.errors import ConfigError
from geopose_mlops.models.losses import city_means_from, output_units_from
from geopose_mlops.report import make_report
from geopose_mlops.train import loop
from geopose_mlops.train.averaging import EmaWeights, TopKWeights, average_state_dicts
from geopose_mlops.train.checkpoint import load_checkpoint
from geopose_mlops.train.cv import run_cross_validation

MODEL = ModelConfig(encoder="resnet18", decoder="Unet", encoder_weights="none")


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def _set_weights(model: nn.Module, value: float) -> None:
    """Every float tensor of the model (weights and batch-norm statistics) set to ``value`` + its position / 4."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(value + torch.arange(tensor.numel(), dtype=tensor.dtype).view_as(tensor) / 4)
            else:
                tensor.fill_(int(value))


def test_ema_is_the_exponential_average_of_the_weights_exactly():
    model = _small_model()
    _set_weights(model, 1.0)
    ema = EmaWeights(model, decay=0.75)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for value in (3.0, -2.0, 5.0):
        _set_weights(model, value)
        ema.update(model)
        for name, current in model.state_dict().items():
            if current.is_floating_point():
                expected[name] = 0.75 * expected[name] + 0.25 * current
            else:
                expected[name] = current.clone()  # num_batches_tracked follows the model
    for name, value in ema.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    with pytest.raises(ValueError, match="decay"):
        EmaWeights(model, 1.0)


def test_top_k_keeps_the_k_best_epochs_and_averages_them_exactly():
    model = _small_model()
    top = TopKWeights(3)
    scores = [0.1, 0.5, math.nan, 0.3, 0.4, 0.2, 0.3]
    for epoch, score in enumerate(scores):
        _set_weights(model, 3.0 * epoch)  # kept: 3, 12 and 9 + position / 4, whose mean is exact
        top.offer(epoch, score, model.state_dict())
    # Epochs 1 (0.5), 4 (0.4), 3 (0.3); epoch 6 ties the last kept, epoch 3, which stays; NaN is never kept.
    assert [(k.epoch, k.score) for k in top.kept] == [(1, 0.5), (4, 0.4), (3, 0.3)]
    _set_weights(model, 100.0)  # the kept copies share no storage with the model
    average = top.average()
    for name, value in average.items():
        if value.is_floating_point():
            expected = 8.0 + torch.arange(value.numel(), dtype=value.dtype).view_as(value) / 4
            assert torch.equal(value, expected), name
        else:
            assert int(value) == 3, name  # integer buffers (num_batches_tracked) from the best epoch, 1
    restored = TopKWeights(3)
    restored.load_state_dict(top.state_dict())
    assert [(k.epoch, k.score) for k in restored.kept] == [(1, 0.5), (4, 0.4), (3, 0.3)]
    averaged_model = top.average_model(model)
    assert all(torch.equal(averaged_model.state_dict()[n], v) for n, v in average.items())


def test_average_state_dicts_keeps_dtypes_and_refuses_other_keys():
    states = [
        {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor(7)},
        {"w": torch.tensor([2.0, 4.0], dtype=torch.float16), "n": torch.tensor(9)},
    ]
    average = average_state_dicts(states)
    assert average["w"].dtype == torch.float16 and torch.equal(average["w"], torch.tensor([1.5, 3.0]).half())
    assert int(average["n"]) == 7
    with pytest.raises(ValueError, match="keys"):
        average_state_dicts([states[0], {"w": states[1]["w"]}])
    with pytest.raises(ValueError, match="no weights"):
        average_state_dicts([])


def test_recipe_options_are_validated():
    with pytest.raises(ConfigError, match="ema"):
        TrainConfig(ema=1.5)
    with pytest.raises(ConfigError, match="keep_top"):
        TrainConfig(keep_top=0)
    with pytest.raises(ConfigError, match="needs augment"):
        TrainConfig(height_warp_p=0.3, augment=False)
    with pytest.raises(ConfigError, match="height_warp_p"):
        TrainConfig(height_warp_p=1.5)


def _tiny_config(data_dir, **changes) -> TrainConfig:
    config = TrainConfig(
        data_dir=str(data_dir), model=MODEL, epochs=1, lr=1e-3, batch_size=2, image_size=64, amp=False, k=2,
        augment=False, checkpoint_interval_s=0, metrics_interval_s=0,
    )  # fmt: skip
    return dataclasses.replace(config, **changes)


def _checkpoint(run_id: str, name: str, dest) -> dict:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{name}", dst_path=dest)
    return load_checkpoint(path)


@pytest.mark.slow
def test_r2_ema_top_k_and_height_warp_train_through_a_tracked_fold(synthetic_data, tmp_path, monkeypatch):
    """r2 against the training rows' city means (logged), EMA scored, top-3 averaged, height warp passed on."""
    from geopose_mlops.data import augment

    torch.set_num_threads(1)
    warps = []
    real_build = augment.build_train_augmentation

    def spy(*args, **kwargs):
        warps.append(kwargs.get("height_warp_p"))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(augment, "build_train_augmentation", spy)
    config = _tiny_config(
        synthetic_data, epochs=3, folds=(0,), loss="r2", ema=0.5, keep_top=3, augment=True, height_warp_p=0.5
    )
    result = run_cross_validation(config, experiment="recipes", cache_root=tmp_path / "cache", progress=False)
    assert warps == [0.5]
    client = MlflowClient()
    fold_run = client.get_run(result.folds[0].run_id)
    # The r2 loss's city means: the fold's training rows only, as logged.
    table = pd.read_csv(client.download_artifacts(result.run_id, "folds.csv", str(tmp_path)), dtype={"id": str})
    cache = build_cache(find_samples(synthetic_data), tmp_path / "cache", 64, progress=False)
    train_rows = cache.rows(table.loc[table["fold"] != 0, "id"].tolist())
    means = city_means_from(cache.agl, cache.scale, cache.city_index, rows=train_rows)
    assert means.agl and {k: str(v) for k, v in means.as_params().items()}.items() <= fold_run.data.params.items()
    # The heads' output units: the training rows' spread, logged and stored with the weights.
    height_unit, magnitude_unit = output_units_from(cache.agl, cache.scale, rows=train_rows)
    assert fold_run.data.params["output_unit_agl_m"] == str(round(height_unit, 4))
    assert fold_run.data.params["output_unit_mag_px"] == str(round(magnitude_unit, 4))
    # Every epoch logged once; the last says whether best.pt is the top-3 average.
    history = client.get_metric_history(fold_run.info.run_id, "val_score")
    assert sorted(m.step for m in history) == [0, 1, 2]
    (which,) = client.get_metric_history(fold_run.info.run_id, "best_is_top_k_average")
    (top_k_score,) = client.get_metric_history(fold_run.info.run_id, "top_k_val_score")
    assert which.step == top_k_score.step == 2
    last, best = _checkpoint(fold_run.info.run_id, LAST_NAME, tmp_path / "l"), _checkpoint(
        fold_run.info.run_id, BEST_NAME, tmp_path / "b"
    )
    kept = {entry["epoch"]: entry["state"] for entry in last["top_k"]}
    assert sorted(kept) == [0, 1, 2]  # 3 epochs, keep 3: all of them, as scored (the EMA weights)
    for name, value in last["ema"].items():
        assert torch.equal(kept[2][name], value), name
    assert any(not torch.equal(last["ema"][n], last["model"][n]) for n in last["model"])  # EMA, not the weights
    if which.value == 1.0:
        expected, score = average_state_dicts([entry["state"] for entry in last["top_k"]]), top_k_score.value
    else:
        expected, score = kept[result.folds[0].best_epoch], max(m.value for m in history)
    for name, value in best["model"].items():
        assert torch.equal(value, expected[name]), name
    torch.testing.assert_close(best["model"]["pixel_head.unit"], torch.tensor([height_unit, magnitude_unit]))
    assert result.folds[0].best_score == pytest.approx(score)
    assert fold_run.data.metrics["best_val_score"] == pytest.approx(score)


def _other_seed(data_dir) -> int:
    """A seed whose 2-fold assignment differs from seed 0's."""
    samples = find_samples(data_dir)
    base = make_folds(samples, 2, 0)
    return next(s for s in range(1, 100) if make_folds(samples, 2, s) != base)


def _run_count(experiment: str) -> int:
    found = MlflowClient().get_experiment_by_name(experiment)
    return len(MlflowClient().search_runs([found.experiment_id])) if found else 0


@pytest.mark.slow
def test_init_from_starts_each_fold_from_its_parent_folds_best_checkpoint(synthetic_data, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cache = tmp_path / "cache"
    parent = run_cross_validation(_tiny_config(synthetic_data), experiment="staged", cache_root=cache, progress=False)
    started = []
    real_epoch = loop.train_one_epoch

    def first_weights(model, *args, **kwargs):
        if kwargs.get("epoch") == 0:
            started.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_epoch(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", first_weights)
    child_config = _tiny_config(synthetic_data, init_from=parent.run_id, lr=3e-4, augment=True, crop_size=32)
    child = run_cross_validation(child_config, experiment="staged", cache_root=cache, progress=False)
    client = MlflowClient()
    assert client.get_run(child.run_id).data.tags[INIT_FROM_TAG] == parent.run_id
    assert client.get_run(child.run_id).data.params["init_from"] == parent.run_id
    assert len(started) == 2  # folds 0 then 1
    for fold, weights in enumerate(started):
        parent_fold = parent.folds[fold].run_id
        child_params = client.get_run(child.folds[fold].run_id).data.params
        assert child_params["init_from_fold_run"] == parent_fold
        # the units logged are those of the weights it starts from
        parent_params = client.get_run(parent_fold).data.params
        for unit in ("output_unit_agl_m", "output_unit_mag_px"):
            assert child_params[unit] == parent_params[unit], unit
        best = _checkpoint(parent_fold, BEST_NAME, tmp_path / f"p{fold}")
        assert best["fold"] == fold
        for name, value in best["model"].items():
            assert torch.equal(weights[name], value), (fold, name)
    rows = {row["run_id"]: row for row in make_report("staged", tmp_path / "report").rows}
    assert (rows[child.run_id]["stages"], rows[parent.run_id]["stages"]) == (parent.run_id[:8], "")  # the chain


@pytest.mark.slow
def test_init_from_refuses_a_run_with_other_folds_or_another_model(synthetic_data, tmp_path):
    torch.set_num_threads(1)
    cache = tmp_path / "cache"
    parent = run_cross_validation(
        _tiny_config(synthetic_data, folds=(0,)), experiment="staged", cache_root=cache, progress=False
    )
    runs = _run_count("staged")
    refusals = [
        (_tiny_config(synthetic_data, folds=(0,), model=dataclasses.replace(MODEL, decoder="FPN")), "decoder Unet"),
        (_tiny_config(synthetic_data, folds=(0,), seed=_other_seed(synthetic_data)), "in another fold"),
        (_tiny_config(synthetic_data, folds=(1,)), r"fold\(s\) \[1\]"),  # the parent trained fold 0 only
        (_tiny_config(synthetic_data), r"fold\(s\) \[1\]"),
    ]
    for config, message in refusals:
        with pytest.raises(ConfigError, match=rf"--init-from {parent.run_id}: .*{message}"):
            run_cross_validation(
                dataclasses.replace(config, init_from=parent.run_id), experiment="staged", cache_root=cache,
                progress=False,
            )  # fmt: skip
        assert _run_count("staged") == runs  # refused before any run was created
    with pytest.raises(ConfigError, match="--init-from nope: not a cv run"):
        run_cross_validation(
            _tiny_config(synthetic_data, init_from="nope"), experiment="staged", cache_root=cache, progress=False
        )


@pytest.mark.slow
def test_a_resumed_fold_continues_its_weight_averages(synthetic_data, tmp_path):
    """Stopped after epoch 1 and resumed: the kept epochs and the moving average come back from last.pt."""
    torch.set_num_threads(1)
    config = _tiny_config(synthetic_data, epochs=3, folds=(0,), ema=0.5, keep_top=3)

    def stop_after_epoch_1(fold, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        run_cross_validation(
            config, experiment="resume", cache_root=tmp_path / "cache", on_epoch_end=stop_after_epoch_1, progress=False
        )
    client = MlflowClient()
    experiment = client.get_experiment_by_name("resume").experiment_id
    (cv_run,) = client.search_runs([experiment], "tags.`geopose.kind` = 'cv'")
    (stopped_fold,) = client.search_runs([experiment], "tags.`geopose.kind` = 'fold'")
    stopped = _checkpoint(stopped_fold.info.run_id, LAST_NAME, tmp_path / "stopped")
    assert stopped["epoch"] == 1 and sorted(entry["epoch"] for entry in stopped["top_k"]) == [0, 1]
    result = run_cross_validation(
        config, experiment="resume", resume_run_id=cv_run.info.run_id, cache_root=tmp_path / "cache", progress=False
    )
    fold_run = result.folds[0].run_id
    assert sorted(m.step for m in client.get_metric_history(fold_run, "val_score")) == [0, 1, 2]
    last = _checkpoint(fold_run, LAST_NAME, tmp_path / "resumed")
    assert sorted(entry["epoch"] for entry in last["top_k"]) == [0, 1, 2]  # epochs 0 and 1 kept across the stop
    for entry in stopped["top_k"]:
        kept = next(e for e in last["top_k"] if e["epoch"] == entry["epoch"])
        assert all(torch.equal(kept["state"][n], v) for n, v in entry["state"].items())
