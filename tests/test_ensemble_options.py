"""`ensemble fit --no-city-factors --no-scale-model`: the method fits only what its name says (issue 17)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from tiny_cv import run_tiny_cv

from geopose_mlops.cli import main


@pytest.mark.slow
def test_equal_weights_alone_when_factors_and_scale_model_are_switched_off(tmp_path) -> None:
    cv = run_tiny_cv(tmp_path, "Unet")
    result = CliRunner().invoke(
        main,
        ["ensemble", "fit", "--experiment", "geopose", "--run-ids", cv.run_id, "--method", "equal",
         "--no-city-factors", "--no-scale-model"],
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "city height factors {}; scale model not kept" in result.output
    run_id = re.search(r"ensemble run (\w+)", result.output).group(1)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert json.loads(run.data.params["city_height_factors"]) == {} and run.data.params["scale_model"] == "False"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "scale_model.json" not in artifacts
    # One member with equal weights and nothing else: the ensemble is that member, score for score (its
    # scales clipped at 0 px/m as predict does, which may differ from the raw cv_score of an untrained model).
    assert run.data.metrics["oof_score"] == pytest.approx(run.data.metrics["best_member_oof_score"], abs=1e-12)
    assert run.data.metrics["oof_score"] == pytest.approx(cv.cv_score, abs=0.05)
