"""Train two tiny architectures, fit an ensemble, promote it, predict through the registry, evaluate."""

from __future__ import annotations

import json
import math
import re

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from geopose_mlops.cli import main
from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.train.cv import run_cross_validation


@pytest.mark.slow
def test_fit_promote_predict_evaluate(tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    MlflowClient().create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    data = tmp_path / "data"
    make_synthetic_dataset(data, 3, 64, 0, test_images_per_city=1)
    runs = []
    for decoder in ("Unet", "FPN"):
        config = TrainConfig(
            data_dir=str(data),
            model=ModelConfig(encoder="resnet18", decoder=decoder, encoder_weights="none"),
            epochs=1,
            lr=3e-3,
            batch_size=4,
            image_size=64,
            k=2,
            amp=False,
            augment=False,
        )
        runs.append(run_cross_validation(config, experiment="e2e", progress=False))
    runner = CliRunner()
    fitted = runner.invoke(main, ["ensemble", "fit", "--experiment", "e2e"])
    assert fitted.exit_code == 0, fitted.output
    client = MlflowClient()
    ensembles = client.search_runs(
        [client.get_experiment_by_name("e2e").experiment_id], "tags.`geopose.kind` = 'ensemble'"
    )
    assert len(ensembles) == 1
    best = ensembles[0]
    assert best.data.metrics["oof_score"] >= best.data.metrics["best_member_oof_score"] - 1e-9
    assert sorted(json.loads(best.data.params["members"])) == sorted(r.run_id for r in runs)
    assert best.data.params["method"] == "simplex"
    metrics = best.data.metrics
    assert {"oof_score_ARG", "oof_score_OMA", "equal_weights_oof_score", "caruana_weights_oof_score"} <= metrics.keys()
    assert metrics["simplex_weights_oof_score"] >= metrics["equal_weights_oof_score"] - 1e-12
    assert metrics["simplex_weights_oof_score"] >= metrics["best_member_oof_score"] - 1e-12
    artifacts = {a.path for a in client.list_artifacts(best.info.run_id)}
    assert "ensemble.json" in artifacts

    promoted = runner.invoke(main, ["promote", "--ensemble", "best", "--experiment", "e2e"])
    assert promoted.exit_code == 0, promoted.output
    again = runner.invoke(main, ["promote", "--ensemble", best.info.run_id, "--experiment", "e2e"])
    assert again.exit_code == 0 and "existing" in again.output
    versions = client.search_model_versions("name = 'geopose-ensemble'")
    assert len(versions) == 1
    assert versions[0].tags["geopose.ensemble_run_id"] == best.info.run_id
    assert float(versions[0].tags["oof_score"]) == pytest.approx(metrics["oof_score"])
    assert sorted(json.loads(versions[0].tags["members"])) == sorted(r.run_id for r in runs)
    info = mlflow.models.get_model_info("models:/geopose-ensemble@champion")
    assert [i.name for i in info.signature.inputs.inputs] == ["image", "gsd", "city"]

    out = tmp_path / "submission"
    predicted = runner.invoke(main, ["predict", "--images", str(data / "test"), "--out", str(out), "--tta", "flip"])
    assert predicted.exit_code == 0, predicted.output
    assert len(list(out.glob("*_AGL.tif"))) == 4 and len(list(out.glob("*_VFLOW.json"))) == 4
    rerun = runner.invoke(main, ["predict", "--images", str(data / "test"), "--out", str(out)])
    assert rerun.exit_code == 0 and "skipped 4 image(s)" in rerun.output and "wrote 0" in rerun.output
    scores = tmp_path / "scores.json"
    evaluated = runner.invoke(
        main,
        [
            "evaluate",
            "--predictions-dir",
            str(out),
            "--truth-dir",
            str(data / "test_truth"),
            "--output-json",
            str(scores),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert math.isfinite(json.loads(scores.read_text())["final_score"])

    # A cv run is not an ensemble: refused as a bad argument, nothing registered.
    not_ensemble = runner.invoke(main, ["promote", "--ensemble", runs[0].run_id, "--experiment", "e2e"])
    assert not_ensemble.exit_code == 2 and "not an ensemble run" in not_ensemble.output
    assert len(client.search_model_versions("name = 'geopose-ensemble'")) == 1

    # An ensemble of the weaker member alone scores below the champion: its promotion is refused.
    weaker = min(runs, key=lambda r: r.cv_score)
    worse = runner.invoke(main, ["ensemble", "fit", "--experiment", "e2e", "--run-ids", weaker.run_id])
    assert worse.exit_code == 0, worse.output
    worse_id = re.search(r"ensemble run (\w+):", worse.output).group(1)
    worse_score = client.get_run(worse_id).data.metrics["oof_score"]
    assert worse_score < metrics["oof_score"]
    refused = runner.invoke(main, ["promote", "--ensemble", worse_id, "--experiment", "e2e"])
    assert refused.exit_code == 1
    assert "refusing" in refused.output and "oof_score" in refused.output
    assert f"{worse_score:.6f}" in refused.output and f"{metrics['oof_score']:.6f}" in refused.output
    # --force moves the alias to the worse version all the same.
    forced = runner.invoke(main, ["promote", "--ensemble", worse_id, "--experiment", "e2e", "--force"])
    assert forced.exit_code == 0, forced.output
    assert client.get_model_version_by_alias("geopose-ensemble", "champion").tags["geopose.ensemble_run_id"] == worse_id

    # Back to the better ensemble, then a promote of the worse one that read the holder before any
    # alias existed (as a concurrent call can): the gate passes on the stale read, and the alias still
    # ends on the better version because each promote settles it on the best candidate.
    restored = runner.invoke(main, ["promote", "--ensemble", best.info.run_id, "--experiment", "e2e"])
    assert restored.exit_code == 0, restored.output
    best_version = client.get_model_version_by_alias("geopose-ensemble", "champion").version

    def stale_read(self, name, alias):
        raise MlflowException("no alias yet (stale read)")

    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "get_model_version_by_alias", stale_read)
        raced = runner.invoke(main, ["promote", "--ensemble", worse_id, "--experiment", "e2e"])
    assert raced.exit_code == 0, raced.output
    holder = client.get_model_version_by_alias("geopose-ensemble", "champion")
    assert holder.version == best_version and holder.tags["geopose.ensemble_run_id"] == best.info.run_id


def test_a_search_keeps_the_best_runs_data_and_names_the_runs_it_leaves_out(tmp_path) -> None:
    """Candidates must cover the same images: a search keeps the runs on the best run's data and warns
    naming the others; named runs on other data are refused."""
    from geopose_mlops.constants import FINGERPRINT_PARAM, KIND_CV, KIND_TAG
    from geopose_mlops.ensemble.members import select_cv_runs
    from geopose_mlops.errors import ConfigError

    client = MlflowClient()
    experiment = client.create_experiment("candidates", artifact_location=(tmp_path / "artifacts").as_uri())

    def cv_run(data: str, score: float) -> str:
        run_id = client.create_run(experiment, tags={KIND_TAG: KIND_CV}).info.run_id
        client.log_param(run_id, FINGERPRINT_PARAM, data)
        client.log_metric(run_id, "cv_score", score)
        client.set_terminated(run_id)
        return run_id

    best, second, other_data = cv_run("a" * 64, 0.5), cv_run("a" * 64, 0.3), cv_run("b" * 64, 0.4)
    with pytest.warns(UserWarning, match=rf"1 finished cv run\(s\) left out.*{other_data}"):
        runs = select_cv_runs("candidates")
    assert [r.info.run_id for r in runs] == [best, second]
    with pytest.raises(ConfigError, match=other_data):
        select_cv_runs("candidates", run_ids=[best, other_data])
