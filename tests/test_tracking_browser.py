"""The MLflow UI in a real headless Chromium (Debian's chromium + chromium-driver, Selenium) against the
test's tracking server on PostgreSQL: two runs recorded by segcap's Tracker compare side by side, and
the experiment page shows a run's overlay image. Screenshots go to $SEGCAP_TEST_ARTIFACTS (default
<repo>/test-artifacts/), kept as test artifacts.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from mlflow_stack import REPO, need

from launcher.config import TrackingConfig
from launcher.eval.overlays import draw_overlay
from launcher.eval.runner import Overlay
from launcher.tracking import Tracker

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = Path(os.environ.get("SEGCAP_TEST_ARTIFACTS", REPO / "test-artifacts"))
# As root in a closed network: no sandbox, and none of Chromium's own background connections.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,2400"]


@pytest.fixture
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need("selenium is not installed (pip install -e '.[dev]')")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        need("Debian's chromium and chromium-driver are not installed (scripts/install_services.sh)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="segcap-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate, what: str, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"the MLflow UI did not show {what} within {timeout:.0f} s")


def overlay(step: int, path: Path) -> Path:
    """A real overlay (the evaluator's drawing) whose predicted mask grows with the step."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 32, 32, generator=g)
    gt = torch.zeros(32, 32, dtype=torch.bool)
    gt[8:24, 8:24] = True
    pred = torch.zeros(32, 32, dtype=torch.bool)
    pred[8 : 12 + 4 * step, 8 : 12 + 4 * step] = True
    draw_overlay(Overlay(pixels, (32, 32), gt, pred, key="sample0", task="referring", caption=f"step {step}")).save(path)
    return path


def test_compare_page_and_overlay_image_in_chromium(mlflow_server, browser, tmp_path):
    from mlflow import MlflowClient

    uri, stamp = mlflow_server.uri, time.strftime("%H%M%S")
    names, ids = [f"lr-small-{stamp}", f"lr-large-{stamp}"], []
    for name, lr in zip(names, (1e-4, 3e-4)):
        t = Tracker(TrackingConfig(tracking_uri=uri, experiment="browser", run_name=name), tmp_path / name, True)
        t.start(None, {"optim.lr": lr, "train.steps": 3}, {})
        for step in range(4):
            t.log_metrics({"train/loss": 2.0 / (step + 1) + lr * 1e3}, step)
            t.log_image(overlay(step, tmp_path / f"{name}-{step}.png"), key="val/00_referring", step=step)
        t.finish()
        assert t.flush(timeout=120, while_failing=True)
        ids.append(t.run_id)
    exp_id = MlflowClient(uri).get_run(ids[0]).info.experiment_id
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # The compare page: both run names, the differing param, a metric chart (plotly).
    browser.get(f'{uri}/#/compare-runs?runs=["{ids[0]}","{ids[1]}"]&experiments=["{exp_id}"]')
    wait_for(lambda: all(n in browser.page_source for n in names), "both run names")
    wait_for(lambda: "optim.lr" in browser.page_source and "0.0003" in browser.page_source, "the differing param")
    charts = wait_for(lambda: browser.find_elements("css selector", ".js-plotly-plot"), "a metric chart")
    assert "train/loss" in charts[0].text or "train/loss" in browser.page_source
    browser.save_screenshot(str(ARTIFACTS / "mlflow_compare.png"))

    # The experiment page (chart view): the overlay image of a run at step 0, served by the server.
    browser.get(f"{uri}/#/experiments/{exp_id}/runs?compareRunsMode=CHART")
    wait_for(lambda: "val/00_referring" in browser.page_source, "the image chart")

    def loaded_overlays():
        imgs = browser.find_elements("css selector", "img[src*='get-artifact']")
        return [i for i in imgs if "val~00_referring" in i.get_attribute("src")
                and browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)]

    imgs = wait_for(loaded_overlays, "an overlay image")
    assert "step%2B0" in imgs[0].get_attribute("src")
    browser.save_screenshot(str(ARTIFACTS / "mlflow_experiment_overlay.png"))
