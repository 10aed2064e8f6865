"""The MLflow UI, as a user opens it, shows our fold runs and their `val_score` (headless Chromium).

Starts ``mlflow server`` on 127.0.0.1 over a temporary store that the test fills with a real tiny
cross-validation (``tests/tiny_cv.py``: 64 px synthetic data, resnet18, 2 folds, 2 epochs), then
drives Debian's Chromium (``/usr/bin/chromium``, never a downloaded browser) with Playwright to the
experiment's runs page (fold runs expanded under their parent, then the chart view) and to the
comparison page of the two fold runs. Screenshots are saved under
``tests/artifacts/browser/`` (git-ignored; the path is printed). Where Chromium or Playwright is
missing the test is skipped with the reason, which ``pytest -ra`` prints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from tiny_cv import run_tiny_cv

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


@dataclass(frozen=True)
class TrackedCv:
    """What the UI should show: the experiment, the cv run's name, the fold runs' ids and names."""

    experiment_id: str
    cv_name: str
    fold_ids: list[str]
    fold_names: list[str]


def _fill_store(uri: str, root: Path) -> TrackedCv:
    """Run and track a real tiny cross-validation (2 folds, 2 epochs) in ``uri``."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        result = run_tiny_cv(root)
    finally:
        mlflow.set_tracking_uri(previous)
    client = MlflowClient(uri)
    parent = client.get_run(result.run_id)
    folds = [client.get_run(result.folds[fold].run_id) for fold in sorted(result.folds)]
    assert len(folds) == 2 and all("val_score" in run.data.metrics for run in folds)
    return TrackedCv(parent.info.experiment_id, parent.info.run_name, [r.info.run_id for r in folds],
                     [r.info.run_name for r in folds])


@pytest.fixture
def playwright_api():
    """Playwright's sync API, after checking that Debian's Chromium is there (else skip, with the reason)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium)")
    return pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


@pytest.fixture
def mlflow_server(tmp_path: Path, playwright_api):
    """``(base_url, TrackedCv)`` of a running ``mlflow server`` over a store holding a tiny cross-validation."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracked = _fill_store(uri, tmp_path)
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", uri, "--artifacts-destination", str(tmp_path / "served-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        start_new_session=True,  # its own process group, so that its uvicorn workers stop with it
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
        yield base_url, tracked
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture
def browser_page(playwright_api, mlflow_server):
    """A page in Debian's headless Chromium (closed before the server stops)."""
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


def test_experiment_page_and_run_comparison_show_fold_runs_and_val_score(mlflow_server, browser_page) -> None:
    base_url, tracked = mlflow_server
    page = browser_page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # Experiment page, runs tab: the cv parent; expanding it shows the fold runs nested under it.
    page.goto(f"{base_url}/#/experiments/{tracked.experiment_id}/runs")
    page.get_by_text(tracked.cv_name, exact=True).first.wait_for(timeout=UI_WAIT_MS)
    parent_row = page.locator('[role="row"]', has_text=tracked.cv_name).first
    parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
    for name in tracked.fold_names:
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
    query = f"runs={json.dumps(tracked.fold_ids)}&experiments={json.dumps([tracked.experiment_id])}"
    page.goto(f"{base_url}/#/compare-runs?{query}")
    page.get_by_text("Comparing 2 Runs").first.wait_for(timeout=UI_WAIT_MS)
    for text in (*tracked.fold_ids, *tracked.fold_names, "val_score"):
        page.get_by_text(text, exact=True).first.wait_for(timeout=UI_WAIT_MS)
    page.screenshot(path=SCREENSHOTS / "compare_runs.png")
    page.get_by_role("link", name="val_score", exact=True).first.wait_for(timeout=UI_WAIT_MS)  # metrics table row
    # Scroll the page, not the metrics table: the table's name and value columns scroll separately.
    page.get_by_text("Metrics", exact=True).last.scroll_into_view_if_needed()
    page.screenshot(path=SCREENSHOTS / "compare_runs_metrics.png")
    print(f"screenshots: {SCREENSHOTS}")
    for name in ("experiment_runs.png", "experiment_charts.png", "compare_runs.png", "compare_runs_metrics.png"):
        assert (SCREENSHOTS / name).stat().st_size > 10_000, name
