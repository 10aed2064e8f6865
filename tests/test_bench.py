"""Smoke test of ``make bench``: every script runs at its smallest sizes and reports its figures."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "data_feed_speedup",
    "data_feed_samples_per_s_per_core",
    "train_step_speedup_cpu",
    "evaluate_speedup",
    "evaluate_score_difference",
    "tracking_overhead",
    "pruning_epoch_reduction",
    "pruning_best_value_difference",
}
if importlib.util.find_spec("geopose_mlops.ensemble.fit") is not None:
    # run_all skips the ensemble figure where that module is not in the checkout yet.
    FIGURES |= {"ensemble_fit_peak_memory_growth_ours", "ensemble_fit_peak_memory_growth_reference"}


@pytest.mark.slow
def test_every_bench_script_reports_its_figures(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out-dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {row["figure"] for row in rows} == FIGURES
    for row in rows:
        assert {"figure", "value", "unit", "goal", "met"} <= row.keys()
        assert isinstance(row["met"], bool) and isinstance(row["goal"], str) and row["unit"]
        assert math.isfinite(row["value"]), row
        assert row["machine"]["cores"] >= 1 and row["machine"]["torch"]
    table = (tmp_path / "results.md").read_text()
    for name in FIGURES:
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert "MET" in line or "MISSED" in line
    # The two scorers agree at any size: that figure is a correctness check, not a speed.
    evaluate = next(row for row in rows if row["figure"] == "evaluate_score_difference")
    assert evaluate["met"], evaluate
