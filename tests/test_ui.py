"""Browsing a sweep in the MLflow UI as a person would: a real `mlflow server` on 127.0.0.1 over the store a small
CPU sweep wrote, pages loaded and clicked through in headless Chromium (Debian's package, driven by Selenium with
Debian's chromedriver), JavaScript run.

Screenshots of each step go to the test's temporary folder, and also to $SWEEP_UI_SCREENSHOTS when set
(`SWEEP_UI_SCREENSHOTS=docs/ui python -m pytest tests/test_ui.py` refreshes the README's)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from mlflow.tracking import MlflowClient
from test_server import (
    LOCAL_ENV,
    Server,
    _loopback_without_proxy,  # noqa: F401  (autouse: no proxy for 127.0.0.1)
    mlflow_server,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking switches Chromium dials out at start, which a closed network refuses.
CHROMIUM_SWITCHES = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-proxy-server", "--disable-dev-shm-usage", "--window-size=1600,1000")
PAGE_TIMEOUT_S = 90

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does)")]

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the `test` extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@dataclass
class BrowsedSweep:
    server: Server
    page: str  # the sweep's page as the sweep printed it, on this server
    experiment_id: str
    parent_id: str
    jobs: dict[str, str]  # run name -> one-line description
    screenshots: Path


@pytest.fixture(scope="module")
def sweep(cpu_kernel_configs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowsedSweep]:
    """bf16 x (rms_cpu, silu_cpu) x T in (24, 40) logged to a sqlite store, then `mlflow server` on that store."""
    root = tmp_path_factory.mktemp("ui")
    store = root / "runs"
    command = [sys.executable, "-m", "sweep", "--config-dir", str(cpu_kernel_configs), "-m", "dtype=bf16",
               "kernels=rms_cpu,silu_cpu", "prompt.length=24,40", "timing=quick", "numerics.gen_tokens=4",
               f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_root={store}/artifacts",
               f"hydra.sweep.dir={root}/hydra"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=LOCAL_ENV,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert f"browse the runs: mlflow ui --backend-store-uri sqlite:///{store}/mlflow.db" in done.stdout
    printed = re.search(r"this sweep's page: http://127\.0\.0\.1:5000/(\S+)", done.stdout)
    assert printed, done.stdout[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    (parent,) = client.search_runs(["1"], "tags.sweep_role = 'parent'")
    jobs = {r.info.run_name: r.data.tags["mlflow.note.content"]
            for r in client.search_runs(["1"], "tags.sweep_role = 'job'")}
    screenshots = root / "screenshots"
    screenshots.mkdir()
    with mlflow_server(store) as server:  # serves store/mlflow.db; artifacts are read where the sweep wrote them
        yield BrowsedSweep(server, f"{server.url}/{printed.group(1)}", parent.info.experiment_id,
                           parent.info.run_id, jobs, screenshots)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for switch in (*CHROMIUM_SWITCHES, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(switch)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


# --- what a person does ---------------------------------------------------------------------------------------------


def wait_for(driver: WebDriver, condition, what: str):
    return WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.5).until(
        lambda d: condition(d), message=f"{what} did not appear within {PAGE_TIMEOUT_S} s at {driver.current_url}")


def page_text(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_text(driver: WebDriver, text: str) -> None:
    wait_for(driver, lambda d: text in page_text(d), repr(text))


def open_page(driver: WebDriver, url: str, text: str) -> None:
    """Load `url`, wait for `text`, close MLflow's assistant panel if it opened (it hides half the page)."""
    driver.get(url)
    wait_for_text(driver, text)
    for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if close.is_displayed():
            close.click()


def scroll_to(driver: WebDriver, xpath: str, what: str) -> WebElement:
    element = wait_for(driver, lambda d: next((e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()), None),
                       what)
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
    return element


def click(driver: WebDriver, xpath: str, what: str) -> None:
    scroll_to(driver, xpath, what).click()


def loaded_image(driver: WebDriver, css: str, what: str) -> WebElement:
    """An <img> matching `css` that the browser has fetched and decoded."""
    return wait_for(driver, lambda d: next((i for i in d.find_elements(By.CSS_SELECTOR, css)
                                            if d.execute_script("return arguments[0].naturalWidth", i) > 0), None),
                    what)


def screenshot(driver: WebDriver, sweep: BrowsedSweep, name: str) -> None:
    path = sweep.screenshots / name
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    if os.environ.get("SWEEP_UI_SCREENSHOTS"):
        target = Path(os.environ["SWEEP_UI_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / name)


def open_sweep_page(driver: WebDriver, sweep: BrowsedSweep) -> None:
    """The sweep's run page, its description unfolded ("Show more") down to the tables."""
    open_page(driver, sweep.page, "Description")

    def unfolded(d: WebDriver) -> bool:
        if "Timing" in page_text(d):
            return True
        for button in d.find_elements(By.CSS_SELECTOR, "button[aria-label='Expand description']"):
            if button.is_displayed():
                button.click()
        return False

    wait_for(driver, unfolded, "the description's tables")


def runs_page(sweep: BrowsedSweep) -> str:
    return sweep.page.split("/runs/")[0] + "/runs?" + sweep.page.split("?", 1)[1]


# --- the walk-through ---------------------------------------------------------------------------------------------


def test_the_runs_page_lists_the_sweeps_jobs(sweep, browser):
    """Open: the experiment's runs (not the GenAI overview); find the sweep, unfold it: its jobs are listed."""
    parent_name = "dtype=bf16 kernels=rms_cpu,silu_cpu prompt.length=24,40"
    open_page(browser, runs_page(sweep), parent_name[:12])
    assert "Model training" in page_text(browser) and "No data available" not in page_text(browser)
    click(browser, "//button[contains(@data-component-id, 'runnamecellrenderer')]", "the sweep's unfold button")
    for name in sweep.jobs:
        wait_for(browser, lambda d, name=name: d.find_elements(By.XPATH, f"//a[normalize-space()='{name}']"),
                 f"job run {name!r}")
    assert sorted(sweep.jobs) == ["rms_cpu T=24", "rms_cpu T=40", "silu_cpu T=24", "silu_cpu T=40"]
    screenshot(browser, sweep, "1-runs.png")


def test_the_sweeps_page_shows_its_tables_and_chart(sweep, browser):
    """The address the sweep printed: the parent run's description holds the tables and the chart."""
    open_sweep_page(browser, sweep)
    text = page_text(browser)
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep.server.root}/mlflow.db")
    for run in client.search_runs([sweep.experiment_id], "tags.sweep_role = 'job'"):
        m = run.data.metrics
        cells = (f"{run.info.run_name} bf16 {run.data.params['kernels']} {run.data.params['prompt_len']} "
                 f"{m['latency_ms_baseline']:.4f} {m['latency_ms_kernel']:.4f} {m['speedup']:.3f}x "
                 f"[{m['speedup_ci_low']:.3f}, {m['speedup_ci_high']:.3f}]")
        assert cells in text, f"summary row of {run.info.run_name} not rendered"
    assert "Accuracy" in text and "layer_err_ratio_max" in text
    scroll_to(browser, "//*[normalize-space()='Timing']", "the Timing heading")
    screenshot(browser, sweep, "2-sweep-table.png")
    chart = loaded_image(browser, "img[src*='summary%2Fspeedup.png']", "the speedup chart")
    assert browser.execute_script("return arguments[0].naturalWidth", chart) > 500
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", chart)
    screenshot(browser, sweep, "3-sweep-chart.png")


def test_a_jobs_page_shows_its_result_and_its_layer_plot(sweep, browser):
    """From the sweep's table to a job: its one-line result, then its layer plot among its artifacts."""
    name = "rms_cpu T=40"
    open_sweep_page(browser, sweep)
    click(browser, f"//a[normalize-space()='{name}']", f"the link to {name}")
    browser.switch_to.window(browser.window_handles[-1])  # the description's links open a new tab
    wait_for_text(browser, sweep.jobs[name])
    assert sweep.jobs[name].startswith("speedup ") and sweep.jobs[name].endswith("measured")
    click(browser, "//button[normalize-space()='Artifacts']", "the Artifacts tab")
    click(browser, "//*[normalize-space(text())='layers']", "the layers folder")
    click(browser, "//*[normalize-space(text())='layers.png']", "layers.png")
    plot = loaded_image(browser, "img[src^='blob:']", "the layer plot")
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 500
    screenshot(browser, sweep, "4-job-layers.png")
