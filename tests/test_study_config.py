"""Study files, the search space, micro-batch selection and the heartbeat storage (no training)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from geopose_mlops.errors import ConfigError
from geopose_mlops.tune.storage import build_storage
from geopose_mlops.tune.study import micro_batch_size, suggest_hyperparameters, trial_train_config
from geopose_mlops.tune.study_file import BatchSizeRange, SearchSpace, StudyConfig, load_study_config

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
study_name: s
train:
  data_dir: data
  image_size: 64
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_shipped_study_searches_lr_and_effective_batch(tmp_path: Path) -> None:
    config = load_study_config(REPO / "studies" / "lr_batch.yaml")
    assert (config.search_space.lr.low, config.search_space.lr.high, config.search_space.lr.log) == (1e-5, 1e-3, True)
    batch = config.search_space.effective_batch_size
    assert (batch.low, batch.high) == (1, 128)
    assert config.sampler.name == "tpe" and config.direction == "maximize" and config.objective == "fold0"
    assert config.storage == f"sqlite:///{(REPO / 'studies' / 'lr_batch.db').resolve()}"


def test_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"study\.yaml.*unknown key\(s\) \['n_trails'\]"):
        load_study_config(write(tmp_path, MINIMAL + "n_trails: 3\n"))
    nested = MINIMAL + "search_space:\n  lr:\n    hgh: 0.1\n"
    with pytest.raises(ConfigError, match=r"search_space\.lr: unknown key\(s\) \['hgh'\]"):
        load_study_config(write(tmp_path, nested))


@pytest.mark.parametrize(
    ("low", "high"),
    [("1e-3", "1e-5"), ("0", "1e-3"), ("1e-5", "10")],
    ids=["reversed", "zero", "too-high"],
)
def test_lr_range_is_checked(tmp_path: Path, low: str, high: str) -> None:
    text = MINIMAL + f"search_space:\n  lr:\n    low: {low}\n    high: {high}\n"
    with pytest.raises(ConfigError, match=r"search_space\.lr"):
        load_study_config(write(tmp_path, text))


def test_malformed_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'ten'"):
        load_study_config(write(tmp_path, MINIMAL + "  epochs: ten\n"))
    with pytest.raises(ConfigError, match=r"pruner\.name: expected one of"):
        load_study_config(write(tmp_path, MINIMAL + "pruner: {name: sometimes}\n"))
    pow2 = MINIMAL + "search_space:\n  effective_batch_size: {low: 3, high: 128, scale: pow2}\n"
    with pytest.raises(ConfigError, match=r"\[3\] are not powers of two"):
        load_study_config(write(tmp_path, pow2))
    with pytest.raises(ConfigError, match="study_name"):
        load_study_config(write(tmp_path, "train: {data_dir: d}\n"))


def test_yaml_exponent_floats_and_default_storage(tmp_path: Path) -> None:
    config = load_study_config(write(tmp_path, MINIMAL + "search_space:\n  lr: {low: 2e-5, high: 5E-4}\n"))
    assert config.search_space.lr.low == 2e-5 and config.search_space.lr.high == 5e-4
    assert config.storage == f"sqlite:///{tmp_path.resolve() / 's.db'}"


@pytest.mark.parametrize(
    ("effective", "cap", "micro"),
    [(128, 8, 8), (12, 8, 6), (7, 8, 7), (127, 8, 1), (1, 8, 1), (96, 32, 32), (48, 20, 16)],
)
def test_micro_batch_is_largest_divisor_under_cap(effective: int, cap: int, micro: int) -> None:
    assert micro_batch_size(effective, cap) == micro


@given(st.integers(1, 128), st.integers(1, 128))
def test_micro_batch_properties(effective: int, cap: int) -> None:
    micro = micro_batch_size(effective, cap)
    assert micro <= cap and effective % micro == 0
    assert not any(effective % d == 0 for d in range(micro + 1, min(effective, cap) + 1))


@pytest.mark.parametrize("scale", ["pow2", "log"])
def test_suggestions_stay_in_the_space_and_fit_a_train_config(scale: str) -> None:
    config = StudyConfig(
        study_name="s",
        train=load_study_config(REPO / "studies" / "lr_batch.yaml").train,
        search_space=SearchSpace(effective_batch_size=BatchSizeRange(scale=scale, max_micro_batch=8)),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(60):
        trial = study.ask()
        params = suggest_hyperparameters(trial, config.search_space)
        train = trial_train_config(config, params)
        assert 1e-5 <= train.lr <= 1e-3
        assert 1 <= train.effective_batch_size <= 128 and train.batch_size <= 8
        assert train.batch_size * train.accumulation_steps == train.effective_batch_size
        assert train.folds == (0,)
        if scale == "pow2":
            assert train.effective_batch_size & (train.effective_batch_size - 1) == 0
        seen.add(train.effective_batch_size)
        study.tell(trial, 0.0)
    assert len(seen) >= 5


def test_dead_worker_trial_fails_and_is_retried(tmp_path: Path) -> None:
    text = MINIMAL + "heartbeat_interval: 1\ngrace_period: 2\nmax_retry: 1\n"
    config = load_study_config(write(tmp_path, text))
    storage = build_storage(config)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 1e-5, 1e-3, log=True)
    storage.record_heartbeat(trial._trial_id)  # as a worker does, then it "dies": no more heartbeats
    time.sleep(3)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert len(trials) == 2 and trials[1].state == optuna.trial.TrialState.WAITING
    assert trials[1].params == trials[0].params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
