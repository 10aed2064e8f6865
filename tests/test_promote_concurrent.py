"""Two `promote` processes at once against one `mlflow server` on PostgreSQL (issue 17).

A better and a worse ensemble of the same store are promoted for the same alias by two processes
started together, three times over (a fresh registered model each time, so every round is a real
race): the alias always ends on the better ensemble's version, whichever process finishes last, and
each version's tags say which ensemble run it holds and that it was a candidate for the alias. The
worse process either passes the gate on a stale read (and the settling moves the alias back) or is
refused with a message naming both scores; both outcomes are correct, neither may leave the alias on
the worse version.
"""

from __future__ import annotations

import re
import subprocess

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from reliability_helpers import cli_command, cli_env
from tiny_cv import run_tiny_cv

from geopose_mlops.cli import main
from geopose_mlops.registry import CANDIDATE_TAG_PREFIX, ENSEMBLE_RUN_TAG

pytest_plugins = ["conftest_pg"]
pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EXPERIMENT = "promote-race"
ROUNDS = 3


def _ensemble_run(cv_run_id: str) -> tuple[str, float]:
    """Fit a one-member ensemble of ``cv_run_id`` with the CLI; (ensemble run id, its oof_score)."""
    result = CliRunner().invoke(
        main, ["ensemble", "fit", "--experiment", EXPERIMENT, "--run-ids", cv_run_id, "--method", "equal"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    run_id = re.search(r"ensemble run (\w+)", result.output).group(1)
    return run_id, MlflowClient().get_run(run_id).data.metrics["oof_score"]


def test_two_promotes_at_once_leave_the_alias_on_the_better_ensemble(tracking_stack, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_stack.tracking_uri)
    mlflow.set_tracking_uri(tracking_stack.tracking_uri)
    unet = run_tiny_cv(tmp_path, "Unet", experiment=EXPERIMENT).run_id
    fpn = run_tiny_cv(tmp_path, "FPN", experiment=EXPERIMENT).run_id
    (better, better_score), (worse, worse_score) = sorted(
        [_ensemble_run(unet), _ensemble_run(fpn)], key=lambda pair: -pair[1]
    )
    assert better_score > worse_score, "the two tiny architectures scored alike: no race to decide"

    client = MlflowClient()
    env = cli_env(tracking_stack.tracking_uri)
    for round_ in range(ROUNDS):
        name = f"geopose-race-{round_}"
        # Alternate which process starts first, so neither order is favoured by the start-up.
        order = [better, worse] if round_ % 2 == 0 else [worse, better]
        processes = [
            subprocess.Popen(
                cli_command("promote", "--ensemble", run_id, "--name", name, "--experiment", EXPERIMENT),
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for run_id in order
        ]  # fmt: skip
        outcomes = {run_id: (p.wait(timeout=600), p.stderr.read()) for run_id, p in zip(order, processes, strict=True)}
        assert outcomes[better][0] == 0, outcomes[better][1][-2000:]
        code, stderr = outcomes[worse]
        assert code == 0 or (code == 1 and "refusing to move" in stderr), stderr[-2000:]

        holder = client.get_model_version_by_alias(name, "champion")
        assert holder.tags[ENSEMBLE_RUN_TAG] == better, f"round {round_}: alias on {holder.tags[ENSEMBLE_RUN_TAG]}"
        for version in client.search_model_versions(f"name = '{name}'"):
            assert version.tags[ENSEMBLE_RUN_TAG] in (better, worse)
            assert version.tags.get(f"{CANDIDATE_TAG_PREFIX}champion") == "true"
