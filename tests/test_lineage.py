"""``geopose.cv_group`` on fold and trial runs, and ``geopose-ml lineage`` over a chain of runs made by hand.

No training: the runs are created the way training and ``ensemble fit`` create them (``CvTracker``,
``StudyTracker``, an ``ensemble.json`` artifact), and the version is registered on the ensemble run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from geopose_mlops.cli import main
from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import KIND_ENSEMBLE, KIND_TAG
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.tracking.lineage import ENSEMBLE_RUN_TAG, ensemble_lineage, version_description
from geopose_mlops.tracking.runs import CV_GROUP_TAG, CvTracker, cv_group
from geopose_mlops.tracking.studies import StudyTracker

EXPERIMENT = "lineage"
FINGERPRINT = "f" * 40


def _config(decoder: str, **changes) -> TrainConfig:
    return TrainConfig(model=ModelConfig(encoder="resnet18", decoder=decoder), lr=1e-3, image_size=64, k=2, **changes)


@dataclass(frozen=True)
class Chain:
    """A registered version over an ensemble of two cv runs with two fold runs each."""

    ensemble_run_id: str
    folds: dict[str, list[str]]  # cv run id -> fold run ids
    version: str


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    client = MlflowClient()
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    tracker = CvTracker(EXPERIMENT)
    folds: dict[str, list[str]] = {}
    for decoder in ("Unet", "FPN"):
        config = _config(decoder)
        cv_run_id = tracker.start_cv_run(config, FINGERPRINT)
        folds[cv_run_id] = []
        for fold in (0, 1):
            fold_run_id = tracker.start_fold_run(cv_run_id, fold, config, FINGERPRINT, "fp32")
            tracker.log_fold_summary(fold_run_id, 0.5 + fold / 10, 1)
            tracker.end_run(fold_run_id)
            folds[cv_run_id].append(fold_run_id)
        client.log_metric(cv_run_id, "cv_score", 0.55)
        tracker.end_run(cv_run_id)
    ids = list(folds)
    spec = EnsembleSpec(
        members=ids, method="simplex", height_weights=[0.7, 0.3], scale_weights=[0.5, 0.5], angle_weights=[1.0, 0.0],
        oof_score=0.61, member_oof_scores={ids[0]: 0.58, ids[1]: 0.52}, equal_weights_oof_score=0.6,
        member_folds={cv: {str(f): r for f, r in enumerate(runs)} for cv, runs in folds.items()}, image_size=64,
    )  # fmt: skip
    ensemble_run_id = client.create_run(experiment, tags={KIND_TAG: KIND_ENSEMBLE}).info.run_id
    spec.save(tmp_path / "ensemble.json")
    client.log_artifact(ensemble_run_id, str(tmp_path / "ensemble.json"))
    client.log_metric(ensemble_run_id, "oof_score", spec.oof_score)
    client.set_terminated(ensemble_run_id)
    client.create_registered_model("lineage-model")
    source = f"{client.get_run(ensemble_run_id).info.artifact_uri}/model"
    tags = {ENSEMBLE_RUN_TAG: ensemble_run_id}
    version = client.create_model_version("lineage-model", source, ensemble_run_id, tags=tags)
    client.set_registered_model_alias("lineage-model", "champion", version.version)
    return Chain(ensemble_run_id, folds, version.version)


def test_cv_group_names_the_architecture_the_options_set_and_the_run() -> None:
    assert cv_group(TrainConfig(), "ab12cd34") == "Unet/resnet34 lr=0.0001 #ab12"
    changed = _config("FPN", batch_size=2, effective_batch_size=8, loss="r2", ema=0.999, keep_top=3)
    assert cv_group(changed, "ffff0000") == "FPN/resnet18 lr=0.001 batch=8 loss=r2 ema=0.999 top=3 #ffff"


def test_fold_and_trial_runs_carry_their_cross_validations_group(tmp_path: Path) -> None:
    client = MlflowClient()
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    tracker, config = CvTracker(EXPERIMENT), _config("Unet")
    cv_run_id = tracker.start_cv_run(config, FINGERPRINT)
    fold_run_id = tracker.start_fold_run(cv_run_id, 0, config, FINGERPRINT)
    assert client.get_run(fold_run_id).data.tags[CV_GROUP_TAG] == cv_group(config, cv_run_id)
    assert CV_GROUP_TAG not in client.get_run(cv_run_id).data.tags  # the parent is not a curve of the group
    # A trial run is adopted by the cross-validation it holds: it and its fold runs form one group.
    studies = StudyTracker(EXPERIMENT)
    study_run_id = studies.study_run("s", "sqlite")
    trial_run_id = studies.start_trial_run(study_run_id, 0, {"lr": 1e-3})
    tracker.start_cv_run(config, FINGERPRINT, study_run_id, trial_run_id, StudyTracker.trial_tags(0))
    trial_fold_id = tracker.start_fold_run(trial_run_id, 0, config, FINGERPRINT)
    group = cv_group(config, trial_run_id)
    assert client.get_run(trial_run_id).data.tags[CV_GROUP_TAG] == group
    assert client.get_run(trial_fold_id).data.tags[CV_GROUP_TAG] == group


def test_lineage_prints_the_chain_down_to_every_fold_run(chain: Chain) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["lineage", "models:/lineage-model@champion"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"models:/lineage-model@champion: lineage-model version {chain.version}"
    assert chain.ensemble_run_id in lines[1] and "simplex" in lines[1] and "oof_score 0.6100" in lines[1]
    for cv_run_id, fold_ids in chain.folds.items():
        member = next(line for line in lines if f"cv run {cv_run_id}" in line)
        assert "/resnet18 lr=0.001 #" in member and "cv_score 0.5500" in member
        for fold, fold_run_id in enumerate(fold_ids):
            assert f"      fold {fold}: run {fold_run_id} (FINISHED, best_val_score {0.5 + fold / 10:.4f})" in lines
    assert lines[-1].startswith("  data: ") and lines[-1].endswith(f"fingerprint {FINGERPRINT}")
    by_number = runner.invoke(main, ["lineage", f"models:/lineage-model/{chain.version}"])
    assert by_number.output.splitlines()[1:] == lines[1:]


def test_the_description_names_members_weights_scores_data_and_the_command(chain: Chain) -> None:
    lineage = ensemble_lineage(chain.ensemble_run_id)
    text = version_description(lineage)
    first, second = lineage.members
    assert f"| {first.name} | `{first.run_id}` | 0.700 / 0.500 / 1.000 | 0.5800 |" in text
    assert f"| {second.name} | `{second.run_id}` | 0.300 / 0.500 / 0.000 | 0.5200 |" in text
    assert f"oof_score: 0.6100 (best member 0.5800: {first.name}; equal weights 0.6000)" in text
    assert "city height factors: none kept" in text and f"fingerprint `{FINGERPRINT}`" in text
    assert f"--run-ids {first.run_id},{second.run_id} --method simplex --no-city-factors --no-scale-model" in text


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("runs:/0123", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
        ("models:/lineage-model@nobody", "no such registered version"),
        ("models:/lineage-model/2", f"has no tag {ENSEMBLE_RUN_TAG}"),
    ],
)
def test_lineage_refuses_what_it_cannot_follow(chain: Chain, uri: str, message: str) -> None:
    client = MlflowClient()
    source = client.get_model_version("lineage-model", chain.version).source
    client.create_model_version("lineage-model", source, chain.ensemble_run_id)  # version 2: no ensemble tag
    refused = CliRunner().invoke(main, ["lineage", uri])
    assert refused.exit_code == 2 and message in refused.output, refused.output
