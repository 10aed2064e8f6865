"""The registry on real tiny runs: what a promoted version says about itself, and one architecture predicted alone.

One store per module: two tiny cross-validations (``tests/tiny_cv.py``: U-Net and FPN over resnet18, 2
folds, 2 epochs, 64 px, 2 cities) on data with one test image per city. Each test points MLflow at it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from tiny_cv import run_tiny_cv

from geopose_mlops.cli import main
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.ensemble.members import fit_tracked_ensemble
from geopose_mlops.tracking.lineage import ENSEMBLE_RUN_TAG, FINGERPRINT_TAG, MEMBER_NAMES_TAG, MEMBERS_TAG
from geopose_mlops.tracking.runs import CV_GROUP_TAG, fold_runs

pytestmark = pytest.mark.slow

EXPERIMENT = "geopose"  # tiny_cv's


@dataclass(frozen=True)
class Store:
    """The module's tracking store: its URI, data folder and, per cv run id, its fold run ids and group."""

    uri: str
    data: Path
    folds: dict[str, list[str]]
    groups: dict[str, str]


@pytest.fixture(scope="module")
def store(module_tmp: Path) -> Store:
    root = module_tmp
    uri = f"sqlite:///{root}/mlflow.db"
    data = root / "data"
    make_synthetic_dataset(data, images_per_city=2, size=64, seed=0, cities=("ARG", "JAX"), test_images_per_city=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("XDG_CACHE_HOME", str(root / "user-cache"))
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        experiment = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
        folds, groups = {}, {}
        for decoder in ("Unet", "FPN"):
            cv_run_id = run_tiny_cv(root, decoder).run_id
            runs = fold_runs(client, experiment, cv_run_id)
            folds[cv_run_id] = [runs[f].info.run_id for f in sorted(runs)]
            (groups[cv_run_id],) = {r.data.tags[CV_GROUP_TAG] for r in runs.values()}  # one value per cv
    assert len(set(groups.values())) == 2 and all(len(ids) == 2 for ids in folds.values())
    return Store(uri, data, folds, groups)


@pytest.fixture
def tracked(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    mlflow.set_tracking_uri(store.uri)
    return store


def _invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _warnings_of(action):
    """Run ``action``; every warning it raises under Python's default rules, but none deduplicated away."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)  # hidden by default outside __main__
        result = action()
    return result, [f"{w.category.__name__}: {w.message}" for w in caught]


def test_a_promoted_version_describes_itself_and_lineage_lists_every_fold_run(tracked: Store, capfd) -> None:
    fitted = _invoke("ensemble", "fit", "--experiment", EXPERIMENT, "--run-ids", ",".join(tracked.folds))
    ensemble_run_id = fitted.output.split("ensemble run ", 1)[1].split(":", 1)[0]
    capfd.readouterr()
    promoted, raised = _warnings_of(lambda: _invoke("promote", "--ensemble", ensemble_run_id))
    out, err = capfd.readouterr()
    assert raised == [], raised  # no CloudPickle, type-hint or requirements warning
    assert "warning" not in (promoted.output + out + err).lower(), promoted.output + out + err
    # MLflow's own registration lines are left out: promote says what it made in its own line
    said = promoted.output + out + err
    for chatter in ("Successfully registered model", "Created version", "Validating input example"):
        assert chatter not in said, said
    assert "geopose-ensemble version 1" in promoted.output

    client = MlflowClient()
    version = client.get_model_version_by_alias("geopose-ensemble", "champion")
    run = client.get_run(ensemble_run_id)
    names = [tracked.groups[m] for m in json.loads(version.tags[MEMBERS_TAG])]
    # Tags: the lineage ids and the member names.
    assert version.tags[ENSEMBLE_RUN_TAG] == ensemble_run_id
    assert sorted(json.loads(version.tags[MEMBERS_TAG])) == sorted(tracked.folds)
    assert json.loads(version.tags[MEMBER_NAMES_TAG]) == names
    fingerprint = client.get_run(next(iter(tracked.folds))).data.params["data_fingerprint"]
    assert version.tags[FINGERPRINT_TAG] == fingerprint
    # Description: members by name, scores, data, the command that re-creates it.
    for text in (*names, *tracked.folds, fingerprint, "oof_score", "best member", "city height factors",
                 "scale model", f"{run.data.metrics['oof_score']:.4f}", "geopose-ml ensemble fit --experiment"):
        assert text in version.description, text
    # Metrics: MLflow 3 keeps a version's on its logged model (models:/m-...).
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    metrics = {m.key: m.value for m in model.metrics}
    for key in ("oof_score", "best_member_oof_score", "oof_score_ARG", "oof_score_JAX"):
        assert metrics[key] == pytest.approx(run.data.metrics[key]), key
    assert model.source_run_id == ensemble_run_id
    # A model from code: MLflow stored this package's pyfunc file, not a pickled object.
    info = mlflow.models.get_model_info("models:/geopose-ensemble@champion")
    flavor = info.flavors["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
    assert [i.name for i in info.signature.inputs.inputs] == ["image", "gsd", "city"]

    shown = _invoke("lineage", "models:/geopose-ensemble@champion").output
    for cv_run_id, fold_ids in tracked.folds.items():
        assert cv_run_id in shown and tracked.groups[cv_run_id] in shown
        for fold_run_id in fold_ids:
            assert f"run {fold_run_id} (FINISHED" in shown, fold_run_id
    assert ensemble_run_id in shown and fingerprint in shown and str(tracked.data) in shown
    assert _invoke("lineage", f"models:/geopose-ensemble/{version.version}").output.splitlines()[1:] == (
        shown.splitlines()[1:]
    )


def test_predict_with_a_cv_run_scores_as_its_one_member_equal_weight_ensemble(tracked: Store, tmp_path: Path) -> None:
    cv_run_id = next(iter(tracked.folds))
    # The one-member ensemble without what ``ensemble fit`` may add to the folds' mean: city factors, a scale
    # model (``ensemble fit --method equal --no-city-factors --no-scale-model``).
    ensemble_run_id, _ = fit_tracked_ensemble(EXPERIMENT, run_ids=[cv_run_id], method="equal", city_factors=False,
                                              scale_model=False)  # fmt: skip
    spec = json.loads(mlflow.artifacts.load_text(f"runs:/{ensemble_run_id}/ensemble.json"))
    assert (spec["members"], spec["height_weights"], spec["city_height_factors"], spec["scale_model"]) == (
        [cv_run_id], [1.0], {}, None
    )
    _invoke("promote", "--ensemble", ensemble_run_id, "--name", "geopose-single")

    scores = {}
    for label, model in [("registered", "models:/geopose-single@champion"), ("run", f"runs:/{cv_run_id}"),
                         ("id", cv_run_id)]:  # fmt: skip
        out = tmp_path / label
        predicted = _invoke("predict", "--model", model, "--images", str(tracked.data / "test"), "--out", str(out))
        assert "wrote 2 prediction(s)" in predicted.output
        _invoke("evaluate", "--predictions-dir", str(out), "--truth-dir", str(tracked.data / "test_truth"),
                "--output-json", str(tmp_path / f"{label}.json"))  # fmt: skip
        scores[label] = json.loads((tmp_path / f"{label}.json").read_text())["final_score"]
    assert scores["run"] == scores["registered"] and scores["id"] == scores["registered"], scores

    fold_run_id = tracked.folds[cv_run_id][0]
    refused = CliRunner().invoke(main, ["predict", "--model", f"runs:/{fold_run_id}", "--images",
                                        str(tracked.data / "test"), "--out", str(tmp_path / "fold")])  # fmt: skip
    assert refused.exit_code == 2 and f"a fold run; its architecture's folds: --model runs:/{cv_run_id}" in (
        refused.output
    )


def test_a_promote_stopped_midway_leaves_the_ensemble_run_finished_and_no_version_to_reuse(
    tracked: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    cv_run_id = next(iter(tracked.folds))
    ensemble_run_id, _ = fit_tracked_ensemble(EXPERIMENT, run_ids=[cv_run_id], method="equal", city_factors=False)
    client = MlflowClient()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Stopped while the model is logged: the fitted run stays FINISHED (``--ensemble best`` still finds it).
    with monkeypatch.context() as patch:
        patch.setattr(mlflow.pyfunc, "log_model", interrupted)
        stopped = CliRunner().invoke(main, ["promote", "--ensemble", ensemble_run_id, "--name", "geopose-stopped"])
    assert stopped.exit_code == 130, stopped.output
    assert client.get_run(ensemble_run_id).info.status == "FINISHED"
    # Stopped once the version exists but before it is complete: that version is never reused nor aliased.
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "update_model_version", interrupted)
        stopped = CliRunner().invoke(main, ["promote", "--ensemble", ensemble_run_id, "--name", "geopose-stopped"])
    assert stopped.exit_code == 130, stopped.output
    (incomplete,) = client.search_model_versions("name = 'geopose-stopped'")
    assert ENSEMBLE_RUN_TAG not in incomplete.tags
    promoted = _invoke("promote", "--ensemble", ensemble_run_id, "--name", "geopose-stopped")
    assert "(new)" in promoted.output
    holder = client.get_model_version_by_alias("geopose-stopped", "champion")
    assert holder.version != incomplete.version and holder.tags[ENSEMBLE_RUN_TAG] == ensemble_run_id
