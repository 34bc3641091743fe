"""The MLflow UI in a real headless browser (Debian chromium driven by playwright)."""

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import require_tool

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_runs_and_their_metrics_are_visible_in_the_mlflow_ui(finished_run, mlflow_server, tmp_path):
    chromium = require_tool("chromium")
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("MOP_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mop-test")
    runs = client.search_runs([exp.experiment_id])
    run_name = next(
        r.info.run_name
        for r in runs
        if r.data.tags.get("stage") == "finetune" and r.data.tags["method"] == "base"
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs")
        # The jobs' runs are grouped under their workflow invocation's parent run.
        expect(page.get_by_text("workflow ", exact=False).first).to_be_visible(timeout=60_000)
        page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
        link = page.get_by_role("link", name=run_name, exact=True)
        expect(link).to_be_visible(timeout=30_000)
        page.screenshot(path=str(shots / "mlflow-runs.png"), full_page=True)
        link.click()
        expect(page.get_by_text("test_accuracy").first).to_be_visible(timeout=30_000)
        expect(page.get_by_text("dev_accuracy").first).to_be_visible()
        page.screenshot(path=str(shots / "mlflow-run.png"), full_page=True)
        browser.close()
    assert (shots / "mlflow-runs.png").stat().st_size > 10_000
    assert (shots / "mlflow-run.png").stat().st_size > 10_000
