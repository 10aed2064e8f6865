"""`geopose-ml report`: the leaderboard's numbers against a store filled with runs of known metrics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from tiny_cv import run_tiny_cv

from geopose_mlops.cli import main
from geopose_mlops.constants import KIND_TAG
from geopose_mlops.report import CURVES_PNG, ENSEMBLE_PNG, LEADERBOARD_CSV, LEADERBOARD_MD, make_report
from geopose_mlops.tracking.reads import read_tracked_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "geopose-report-test"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))
    yield client, experiment_id
    mlflow.set_tracking_uri(previous)


def _params(decoder: str, encoder: str, lr: float) -> dict[str, str]:
    return {"encoder": encoder, "decoder": decoder, "encoder_weights": "none", "lr": str(lr), "batch_size": "2",
            "effective_batch_size": "4", "epochs": "3", "amp": "False", "image_size": "64", "seed": "0"}


def _log_cv(client: MlflowClient, experiment_id: str, params: dict[str, str], cv_score: float,
            fold_scores: list[list[float]], fold_seconds: list[list[float]], status: str = "FINISHED",
            precision: str | None = None) -> str:
    """A cv parent with one fold child per entry of ``fold_scores`` (val_score per epoch, step = epoch).

    ``precision``: the fold runs' ``precision`` param (None: not logged, as by older versions).
    """
    parent = client.create_run(experiment_id, tags={KIND_TAG: "cv"}, run_name=f"cv-{params['decoder']}")
    pid = parent.info.run_id
    for key, value in params.items():
        client.log_param(pid, key, value)
    client.log_metric(pid, "cv_score", cv_score)
    client.log_metric(pid, "cv_score_JAX", cv_score + 0.1)
    client.log_metric(pid, "cv_score_OMA", cv_score - 0.1)
    for fold, (scores, seconds) in enumerate(zip(fold_scores, fold_seconds, strict=True)):
        child = client.create_run(experiment_id, run_name=f"fold-{fold}",
                                  tags={KIND_TAG: "fold", "mlflow.parentRunId": pid})
        cid = child.info.run_id
        fold_params = {**params, "fold": str(fold)} | ({"precision": precision} if precision else {})
        for key, value in fold_params.items():
            client.log_param(cid, key, value)
        for epoch, (score, sec) in enumerate(zip(scores, seconds, strict=True)):
            client.log_metric(cid, "val_score", score, step=epoch)
            client.log_metric(cid, "epoch_seconds", sec, step=epoch)
        client.log_metric(cid, "best_val_score", max(scores))
        client.set_terminated(cid)
    client.set_terminated(pid, status=status)
    return pid


@pytest.fixture
def filled(store):
    client, eid = store
    unet = _log_cv(client, eid, _params("Unet", "resnet18", 1e-3), 0.50,
                   [[0.1, 0.3, 0.5], [0.2, 0.4, 0.45]], [[2.0, 2.0, 2.0], [3.0, 3.0, 4.0]])
    # Same architecture, worse: the row must keep the better run.
    _log_cv(client, eid, _params("Unet", "resnet18", 1e-3), 0.40, [[0.0, 0.1, 0.2]], [[9.0, 9.0, 9.0]])
    fpn = _log_cv(client, eid, _params("FPN", "resnet34", 3e-4) | {"amp": "True"}, 0.60,
                  [[0.2, 0.5, 0.6], [0.3, 0.5, 0.7]], [[5.0, 5.0, 5.0], [5.0, 6.0, 7.0]], precision="bf16")
    # A failed run and a deleted run with better scores must not appear.
    _log_cv(client, eid, _params("Linknet", "resnet18", 1e-3), 0.90, [[0.9]], [[1.0]], status="FAILED")
    deleted = _log_cv(client, eid, _params("PAN", "resnet18", 1e-3), 0.95, [[0.9]], [[1.0]])
    client.delete_run(deleted)
    # A failed fold under the Unet run: left out of its fold count, scores and timing.
    bad = client.create_run(eid, run_name="fold-2", tags={KIND_TAG: "fold", "mlflow.parentRunId": unet})
    client.log_metric(bad.info.run_id, "val_score", -5.0, step=0)
    client.log_metric(bad.info.run_id, "epoch_seconds", 100.0, step=0)
    client.set_terminated(bad.info.run_id, status="FAILED")
    ens = client.create_run(eid, tags={KIND_TAG: "ensemble"}, run_name="ensemble")
    client.log_param(ens.info.run_id, "members", json.dumps([unet, fpn]))
    client.log_metric(ens.info.run_id, "oof_score", 0.65)
    client.set_terminated(ens.info.run_id)
    # An ensemble whose members are only in its ensemble.json artifact.
    ens_json = client.create_run(eid, tags={KIND_TAG: "ensemble"}, run_name="ensemble-json")
    client.log_dict(ens_json.info.run_id, {"members": [{"run_id": fpn}, {"run_id": unet}]}, "ensemble.json")
    client.log_metric(ens_json.info.run_id, "oof_score", 0.62)
    client.set_terminated(ens_json.info.run_id)
    return client, eid, unet, fpn


def test_leaderboard_numbers_match_the_store(filled, tmp_path: Path) -> None:
    client, eid, unet, fpn = filled
    out = tmp_path / "report"
    result = make_report(EXPERIMENT, out, epochs=[1, 2, 3, 5])

    assert [row["run_id"] for row in result.rows] == [fpn, unet]  # sorted by cv_score, failed/deleted gone
    fpn_row, unet_row = result.rows
    assert (fpn_row["decoder"], fpn_row["encoder"], fpn_row["lr"]) == ("FPN", "resnet34", "0.0003")
    assert fpn_row["cv_score"] == pytest.approx(0.60)
    assert fpn_row["cv_score_JAX"] == pytest.approx(0.70) and fpn_row["cv_score_OMA"] == pytest.approx(0.50)
    assert fpn_row["sec_per_epoch"] == pytest.approx(33.0 / 6)
    assert unet_row["sec_per_epoch"] == pytest.approx(16.0 / 6)
    assert unet_row["folds"] == 2 and unet_row["precision"] == "fp32" and unet_row["effective_batch_size"] == "4"
    assert fpn_row["precision"] == "bf16"  # what its folds ran in, not the amp flag
    assert unet_row["score@e1"] == pytest.approx((0.1 + 0.2) / 2)
    assert unet_row["score@e2"] == pytest.approx((0.3 + 0.4) / 2)
    assert fpn_row["score@e3"] == pytest.approx((0.6 + 0.7) / 2)
    assert math.isnan(fpn_row["score@e5"])  # no fold reached epoch 5

    with (out / LEADERBOARD_CSV).open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["run_id"] for r in table] == [fpn, unet]
    assert float(table[1]["score@e2"]) == pytest.approx(0.35) and table[0]["score@e5"] == ""
    markdown = (out / LEADERBOARD_MD).read_text()
    assert "| 1 | FPN | resnet34 |" in markdown and unet in markdown and "0.6000" in markdown

    for name in (CURVES_PNG, ENSEMBLE_PNG):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name

    _, ensembles = read_tracked_runs(EXPERIMENT)
    assert {e.name: (e.oof_score, e.member_ids) for e in ensembles} == {
        "ensemble": (0.65, [unet, fpn]), "ensemble-json": (0.62, [fpn, unet])}

    report = client.get_run(result.run_id)
    assert report.data.tags[KIND_TAG] == "report" and report.info.status == "FINISHED"
    assert report.info.experiment_id == eid
    logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert logged == {LEADERBOARD_MD, LEADERBOARD_CSV, CURVES_PNG, ENSEMBLE_PNG}


def test_report_command_writes_and_a_second_report_ignores_the_first(filled, tmp_path: Path) -> None:
    _, _, unet, fpn = filled
    runner = CliRunner()
    for out in ("a", "b"):
        result = runner.invoke(main, ["report", "--experiment", EXPERIMENT, "--out", str(tmp_path / out),
                                      "--epochs", "1,3"])
        assert result.exit_code == 0, result.output
        assert "2 architecture(s)" in result.output
    with (tmp_path / "b" / LEADERBOARD_CSV).open() as handle:
        header = next(csv.reader(handle))
    assert "score@e1" in header and "score@e3" in header and "score@e2" not in header


def test_report_errors_name_the_experiment_and_the_epochs(store, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["report", "--experiment", "nope", "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "'nope'" in missing.output
    empty = runner.invoke(main, ["report", "--experiment", EXPERIMENT, "--out", str(tmp_path / "r")])
    assert empty.exit_code == 1 and "no finished cross-validation run" in empty.output
    bad = runner.invoke(main, ["report", "--experiment", EXPERIMENT, "--out", str(tmp_path / "r"), "--epochs", "x"])
    assert bad.exit_code == 2 and "--epochs" in bad.output


@pytest.mark.slow
def test_report_on_real_cross_validations_matches_their_fold_runs(store, tmp_path: Path) -> None:
    client, _ = store
    results = {decoder: run_tiny_cv(tmp_path, decoder=decoder, experiment=EXPERIMENT) for decoder in ("Unet", "FPN")}
    report = make_report(EXPERIMENT, tmp_path / "report", epochs=[1, 2])

    assert {row["run_id"] for row in report.rows} == {r.run_id for r in results.values()}
    assert [row["cv_score"] for row in report.rows] == sorted((r.cv_score for r in results.values()), reverse=True)
    for row in report.rows:
        result = results[row["decoder"]]
        fold_ids = [fold.run_id for fold in result.folds.values()]
        seconds = [m.value for f in fold_ids for m in client.get_metric_history(f, "epoch_seconds")]
        second_epoch = [next(m.value for m in client.get_metric_history(f, "val_score") if m.step == 1)
                        for f in fold_ids]
        assert row["folds"] == 2 and row["encoder"] == "resnet18" and row["precision"] == "fp32"  # amp off
        assert row["cv_score"] == pytest.approx(result.cv_score)
        assert row["cv_score_ARG"] == pytest.approx(result.city_scores["ARG"])
        assert row["sec_per_epoch"] == pytest.approx(sum(seconds) / len(seconds))
        assert row["score@e2"] == pytest.approx(sum(second_epoch) / len(second_epoch))
    assert (tmp_path / "report" / CURVES_PNG).read_bytes()[:8] == PNG_MAGIC
