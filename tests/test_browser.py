"""The MLflow UI, as a user opens it, shows our fold runs and their `val_score` (headless Chromium).

Starts ``mlflow server`` on 127.0.0.1 over a temporary store that the test fills with a small
cross-validation, then drives Debian's Chromium (``/usr/bin/chromium``, never a downloaded browser)
with Playwright to the experiment's runs page (fold runs expanded under their parent, then the chart
view) and to the comparison page of the two fold runs. Screenshots are saved under
``tests/artifacts/browser/`` (git-ignored; the path is printed). Where Chromium or Playwright is
missing the test is skipped with the reason, which ``pytest -ra`` prints.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from geopose_mlops.constants import KIND_TAG

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
SCREENSHOTS = Path(__file__).parent / "artifacts" / "browser"
SERVER_START_S = 120.0  # two shared CPU cores: the server's first start (database migrations) can be slow
UI_WAIT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_store(uri: str, artifacts: Path) -> tuple[str, list[str]]:
    """A cv parent run with two fold runs, each with two epochs of metrics (SPEC §4 names).

    Returns:
        The experiment id and the two fold run ids.
    """
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("geopose", artifact_location=str(artifacts))
    params = {"encoder": "resnet18", "decoder": "Unet", "encoder_weights": "none", "lr": "0.001",
              "effective_batch_size": "4", "epochs": "2", "amp": "False", "image_size": "64"}
    parent = client.create_run(experiment_id, tags={KIND_TAG: "cv"}, run_name="cv-Unet-resnet18")
    fold_ids = []
    for fold in range(2):
        child = client.create_run(experiment_id, run_name=f"fold-{fold}",
                                  tags={KIND_TAG: "fold", "mlflow.parentRunId": parent.info.run_id})
        for key, value in {**params, "fold": str(fold)}.items():
            client.log_param(child.info.run_id, key, value)
        for epoch in range(2):
            client.log_metric(child.info.run_id, "val_score", 0.2 + 0.1 * epoch + 0.05 * fold, step=epoch)
            client.log_metric(child.info.run_id, "epoch_seconds", 1.5, step=epoch)
        client.set_terminated(child.info.run_id)
        fold_ids.append(child.info.run_id)
    for key, value in params.items():
        client.log_param(parent.info.run_id, key, value)
    client.log_metric(parent.info.run_id, "cv_score", 0.33)
    client.set_terminated(parent.info.run_id)
    return experiment_id, fold_ids


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """``(base_url, experiment_id, fold_run_ids)`` of a running ``mlflow server`` over a filled store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id, fold_ids = _fill_store(uri, tmp_path / "artifacts")
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", uri, "--artifacts-destination", str(tmp_path / "served-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}: {(tmp_path / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer on {base_url} within {SERVER_START_S:.0f} s")
            time.sleep(0.5)
        yield base_url, experiment_id, fold_ids
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def browser_page():
    """A Playwright page in Debian's headless Chromium; skips (with the reason) where there is none."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


def test_experiment_page_and_run_comparison_show_fold_runs_and_val_score(browser_page, mlflow_server) -> None:
    base_url, experiment_id, fold_ids = mlflow_server
    page = browser_page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # Experiment page, runs tab: the cv parent; expanding it shows the fold runs nested under it.
    page.goto(f"{base_url}/#/experiments/{experiment_id}/runs")
    page.get_by_text("cv-Unet-resnet18").first.wait_for(timeout=UI_WAIT_MS)
    parent_row = page.locator('[role="row"]', has_text="cv-Unet-resnet18").first
    parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
    for name in ("fold-0", "fold-1"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=UI_WAIT_MS)
    page.screenshot(path=SCREENSHOTS / "experiment_runs.png")

    # The same page in chart view, narrowed to val_score: one chart with a line per fold run.
    page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    page.get_by_placeholder("Search metric charts").fill("val_score")
    page.get_by_text("val_score", exact=True).first.wait_for(timeout=UI_WAIT_MS)
    page.wait_for_function("() => document.querySelectorAll('.scatterlayer .trace').length >= 2",
                           timeout=UI_WAIT_MS)  # plotly has drawn the two fold curves
    page.screenshot(path=SCREENSHOTS / "experiment_charts.png")

    # Run comparison of the two fold runs (the route MLflow's own "Compare" button opens).
    query = f"runs={json.dumps(fold_ids)}&experiments={json.dumps([experiment_id])}"
    page.goto(f"{base_url}/#/compare-runs?{query}")
    page.get_by_text("Comparing 2 Runs").first.wait_for(timeout=UI_WAIT_MS)
    body = page.locator("body")
    for text in (*fold_ids, "fold-0", "fold-1", "val_score"):
        page.get_by_text(text, exact=True).first.wait_for(timeout=UI_WAIT_MS)
    assert "val_score" in body.inner_text()
    page.screenshot(path=SCREENSHOTS / "compare_runs.png")
    page.get_by_text("Metrics", exact=True).last.scroll_into_view_if_needed()
    page.screenshot(path=SCREENSHOTS / "compare_runs_metrics.png")
    print(f"screenshots: {SCREENSHOTS}")
    for name in ("experiment_runs.png", "experiment_charts.png", "compare_runs.png", "compare_runs_metrics.png"):
        assert (SCREENSHOTS / name).stat().st_size > 10_000, name
