"""The MLflow UI, as a user opens it, shows our fold runs and their `val_score` (headless Chromium).

Starts ``mlflow server`` on 127.0.0.1 over a temporary store that the test fills with two real tiny
cross-validations (``tests/tiny_cv.py``: 64 px synthetic data, U-Net and FPN over resnet18, 2 folds,
2 epochs), then drives Debian's Chromium (``/usr/bin/chromium``, never a downloaded browser) with
Playwright to the experiment's runs page (fold runs expanded under their parent, then the chart view),
to the same page grouped by ``geopose.cv_group`` (one aggregated ``val_score`` line with its min/max
band per cross-validation) and to the comparison page of two fold runs. Screenshots are saved under
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

from geopose_mlops.tracking.runs import CV_GROUP_TAG

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
    """What the UI should show: the experiment, the cv runs, the first one's fold runs, every cv group.

    Attributes:
        experiment_id: The experiment of both cross-validations.
        cv_names: Names of the cv runs (U-Net first).
        fold_ids, fold_names: The first cv run's fold runs.
        cv_groups: The ``geopose.cv_group`` value of each cross-validation (one per cv run).
    """

    experiment_id: str
    cv_names: list[str]
    fold_ids: list[str]
    fold_names: list[str]
    cv_groups: list[str]


def _fill_store(uri: str, root: Path) -> TrackedCv:
    """Run and track two real tiny cross-validations (U-Net and FPN, 2 folds, 2 epochs) in ``uri``."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        results = [run_tiny_cv(root, decoder) for decoder in ("Unet", "FPN")]
    finally:
        mlflow.set_tracking_uri(previous)
    client = MlflowClient(uri)
    groups = []
    for result in results:
        folds = [client.get_run(result.folds[fold].run_id) for fold in sorted(result.folds)]
        assert len(folds) == 2 and all("val_score" in run.data.metrics for run in folds)
        (group,) = {run.data.tags[CV_GROUP_TAG] for run in folds}  # one value per cross-validation
        groups.append(group)
    parents = [client.get_run(result.run_id) for result in results]
    folds = [client.get_run(results[0].folds[fold].run_id) for fold in sorted(results[0].folds)]
    assert len(set(groups)) == 2, groups
    return TrackedCv(parents[0].info.experiment_id, [r.info.run_name for r in parents],
                     [r.info.run_id for r in folds], [r.info.run_name for r in folds], groups)


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


# On the chart's plotly figure: the aggregated lines (a group's mean, drawn with markers) and the min/max
# bands (filled traces) that hold data; the "Unassigned" group of runs without the tag holds none.
_FINITE_JS = "(trace) => (trace.y || []).some((y) => y !== null && Number.isFinite(y))"
_LINES_JS = f"plot.data.filter((t) => t.mode === 'lines+markers' && ({_FINITE_JS})(t))"
_BANDS_JS = f"plot.data.filter((t) => t.fill && ({_FINITE_JS})(t))"


def _val_score_chart(page):
    """The chart card titled exactly ``val_score`` on the runs page's chart view."""
    cards = page.locator('[data-testid="experiment-view-compare-runs-card"]')
    cards.first.wait_for(timeout=UI_WAIT_MS)
    for index in range(cards.count()):
        card = cards.nth(index)
        if card.inner_text().splitlines()[0].strip() == "val_score":
            return card
    raise AssertionError("no chart titled val_score on the runs page")


def test_experiment_page_and_run_comparison_show_fold_runs_and_val_score(mlflow_server, browser_page) -> None:
    base_url, tracked = mlflow_server
    page = browser_page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # Experiment page, runs tab: the cv parents; expanding them shows the fold runs nested under them.
    page.goto(f"{base_url}/#/experiments/{tracked.experiment_id}/runs")
    for cv_name in tracked.cv_names:
        page.get_by_text(cv_name, exact=True).first.wait_for(timeout=UI_WAIT_MS)
        parent_row = page.locator('[role="row"]', has_text=cv_name).first
        parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
    for name in tracked.fold_names:
        page.get_by_text(name, exact=True).first.wait_for(timeout=UI_WAIT_MS)
    page.screenshot(path=SCREENSHOTS / "experiment_runs.png")

    # The same page in chart view, narrowed to val_score: one chart with a line per fold run (4).
    page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    page.get_by_placeholder("Search metric charts").fill("val_score")
    page.get_by_text("val_score", exact=True).first.wait_for(timeout=UI_WAIT_MS)
    page.wait_for_function("() => document.querySelectorAll('.scatterlayer .trace').length >= 2",
                           timeout=UI_WAIT_MS)  # plotly has drawn the fold curves
    page.screenshot(path=SCREENSHOTS / "experiment_charts.png")

    # Grouped by geopose.cv_group: the val_score chart draws one aggregated line (the mean of the
    # group's fold runs) with its min/max band per cross-validation, and its legend names the groups.
    # Ungrouped it draws one line per fold run (4), no band, and names the runs.
    page.get_by_role("button", name="Group by").click()
    page.get_by_role("menuitemcheckbox", name=CV_GROUP_TAG, exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_text(f"Group by: {CV_GROUP_TAG}").first.wait_for(timeout=UI_WAIT_MS)
    chart = _val_score_chart(page)
    expected = len(tracked.cv_groups)
    plot = chart.locator(".js-plotly-plot")
    plot.wait_for(timeout=UI_WAIT_MS)
    page.wait_for_function(f"(plot) => plot.data && ({_LINES_JS}).length === {expected}", arg=plot.element_handle(),
                           timeout=UI_WAIT_MS)  # plotly has drawn the groups' lines
    page.screenshot(path=SCREENSHOTS / "experiment_grouped_charts.png")
    lines, bands = plot.evaluate(f"(plot) => [({_LINES_JS}).length, ({_BANDS_JS}).length]")
    assert (lines, bands) == (expected, expected), f"{lines} lines and {bands} bands for {expected} cv runs"
    legend = {line for line in chart.inner_text().splitlines() if line.endswith(" (val_score)")}
    legend.discard("Unassigned (val_score)")  # the runs without the tag (cv parents): no val_score, no line
    assert legend == {f"{group} (val_score)" for group in tracked.cv_groups}, legend

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
    shots = ("experiment_runs.png", "experiment_charts.png", "experiment_grouped_charts.png", "compare_runs.png",
             "compare_runs_metrics.png")
    for name in shots:
        assert (SCREENSHOTS / name).stat().st_size > 10_000, name
