"""Browsing a sweep in the MLflow UI as a person would: a real `mlflow server` on 127.0.0.1 over the store a small
CPU sweep wrote, pages loaded and clicked through in headless Chromium (Debian's package, driven by Selenium with
Debian's chromedriver), JavaScript run. Then two machines' runs in one store: the runs view that puts each
configuration's machines side by side, and the report logged as a run (`python -m sweep.report --log-run`).

Screenshots of each step go to the test's temporary folder, and also to $SWEEP_UI_SCREENSHOTS when set
(`SWEEP_UI_SCREENSHOTS=docs/ui python -m pytest -m slow -n 0 tests/test_ui.py` refreshes docs/ui/)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from mlflow.tracking import MlflowClient
from test_results_table import H100, H200, two_machines
from test_runs_view import VIEW_TAG, decoded
from test_server import (
    LOCAL_ENV,
    Server,
    _loopback_without_proxy,  # noqa: F401  (autouse: no proxy for 127.0.0.1)
    mlflow_server,
)

from sweep.report import main as report_main
from sweep.store.runs_view import VIEW_TAG_PREFIX, encode_state, machines_view_state
from sweep.views.machines import machine_pairs
from sweep.views.report import load_runs
from sweep.views.table import latest_runs

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
from selenium.common.exceptions import ElementClickInterceptedException  # noqa: E402
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
    assert ("every machine's runs side by side: http://127.0.0.1:5000/#/experiments/1/runs?"
            "viewStateShareKey=sweep-machines&workflowType=machine_learning") in done.stdout
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


@dataclass
class Machines:
    server: Server
    view: str  # the runs view of every machine, as the report printed it, on this server
    report: str  # the report's run page, as printed, on this server
    uri: str
    experiment_id: str
    headline: str  # the machine-vs-machine table's headline
    screenshots: Path


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machines]:
    """One sqlite store holding two machines' sweeps (an H100's and an H200's, logged through sweep's Tracker), the
    report on it logged as a run (`python -m sweep.report --log-run`), and `mlflow server` on that store."""
    root = tmp_path_factory.mktemp("machines")
    store = two_machines(root)
    out = io.StringIO()
    with redirect_stdout(out):
        assert report_main(["--tracking-uri", store.uri, "--out", str(root / "report"), "--log-run"]) == 0
    view = re.search(r"every machine's runs side by side: http://127\.0\.0\.1:5000/(\S+)", out.getvalue())
    report = re.search(r"the report's run: http://127\.0\.0\.1:5000/(\S+)", out.getvalue())
    assert view and report, out.getvalue()
    (pair,) = machine_pairs(latest_runs(load_runs([store.uri], "kernel-sweep")))
    screenshots = root / "screenshots"
    screenshots.mkdir()
    with mlflow_server(root / "server", backend_store_uri=store.uri) as server:
        yield Machines(server, f"{server.url}/{view.group(1)}", f"{server.url}/{report.group(1)}", store.uri,
                       store.tracker.experiment_id, pair.headline, screenshots)


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


def screenshot(driver: WebDriver, sweep: BrowsedSweep | Machines, name: str) -> None:
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
    view = browser.find_element(By.XPATH, "//a[contains(@href, 'viewStateShareKey=sweep-machines')]")
    assert view.text == "The experiment's runs, each configuration on every machine side by side"
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


# --- two machines in one store --------------------------------------------------------------------------------------

RUN_NAME, GPU_NAME, SPEEDUP = "attributes.`Run Name`", "tags.`gpu_name`", "metrics.`speedup`"


def grid_rows(driver: WebDriver) -> list[dict[str, str]]:
    """The runs table's rendered rows, top first: each cell's text by its column's id (e.g. tags.`gpu_name`)."""
    rows = driver.execute_script("""
        const rows = {};
        for (const cell of document.querySelectorAll('.ag-row [col-id]')) {
            const index = cell.closest('.ag-row').getAttribute('row-index');
            (rows[index] ??= {})[cell.getAttribute('col-id')] = cell.innerText.trim();
        }
        return rows;""")
    return [rows[index] for index in sorted(rows, key=int)]


def group_label(row: dict[str, str]) -> str | None:
    """A group row's label (`Group: kernels: rms, dtype: bf16, ...`); None for a run's row."""
    return next((line for line in row.get(RUN_NAME, "").splitlines() if line.startswith("Group: ")), None)


def test_the_machines_view_puts_each_configurations_machines_side_by_side(machines, browser):
    """The link every sweep and the report print: the job runs grouped by configuration, in each group one row per
    machine, the machines in the same order, with gpu_name, the speedup, its interval and err_ratio as columns."""
    client = MlflowClient(tracking_uri=machines.uri)
    jobs = {(run.info.run_name, run.data.tags["gpu_name"]): run
            for run in client.search_runs([machines.experiment_id], "tags.sweep_role = 'job'")}
    open_page(browser, machines.view, "gpu_name")

    def every_job_shown(d: WebDriver) -> list[dict[str, str]] | None:
        rows = grid_rows(d)
        return rows if sum(group_label(row) is None for row in rows) == len(jobs) else None

    rows = wait_for(browser, every_job_shown, f"a row for each of the {len(jobs)} job runs")
    headers = {h.get_attribute("col-id") for h in browser.find_elements(By.CSS_SELECTOR, ".ag-header-cell")}
    shown = {GPU_NAME, SPEEDUP, "metrics.`speedup_ci_low`", "metrics.`speedup_ci_high`", "metrics.`err_ratio`"}
    assert shown <= headers
    groups: list[tuple[str, list[dict[str, str]]]] = []
    for row in rows:
        label = group_label(row)
        if label is not None:
            groups.append((label, []))
        else:
            groups[-1][1].append(row)
    assert len(groups) == len({name for name, _ in jobs}) == 4  # one group per configuration
    for label, group in groups:
        assert [row[GPU_NAME] for row in group] == [H100, H200], label  # the two machines adjacent, in order
        for row in group:
            run = jobs[(row[RUN_NAME], row[GPU_NAME])]
            assert all(f"{key}: {run.data.params[key]}" in label for key in ("kernels", "dtype", "prompt_len"))
            speedup = run.data.metrics.get("speedup")
            assert row[SPEEDUP] == "-" if speedup is None else float(row[SPEEDUP]) == pytest.approx(speedup)
    screenshot(browser, machines, "5-machines-view.png")


def test_the_reports_run_shows_the_machine_against_machine_table(machines, browser):
    """The run `--log-run` logged: the report's tables as its description, its plots shown from its artifacts."""
    open_page(browser, machines.report, "Description")

    def unfolded(d: WebDriver) -> bool:
        if "Machine against machine" in page_text(d):
            return True
        for button in d.find_elements(By.CSS_SELECTOR, "button[aria-label='Expand description']"):
            if button.is_displayed():
                button.click()
        return False

    wait_for(browser, unfolded, "the report's tables")
    assert machines.headline in page_text(browser)
    view = browser.find_element(By.XPATH, "//a[contains(@href, 'viewStateShareKey=sweep-machines')]")
    assert view.text == "The experiment's runs, each configuration on every machine side by side"
    plot = loaded_image(browser, "img[src*='report%2Ferr_ratio.png']", "the err_ratio plot")
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 300
    scroll_to(browser, "//*[normalize-space()='Machine against machine']", "the machine-vs-machine heading")
    screenshot(browser, machines, "6-report-run.png")


def click_when_free(driver: WebDriver, css: str, what: str) -> None:
    """Clicks the element once nothing (a notification) covers it."""
    def clicked(d: WebDriver) -> bool:
        try:
            d.find_element(By.CSS_SELECTOR, css).click()
        except ElementClickInterceptedException:
            return False
        return True

    wait_for(driver, clicked, what)


def test_a_view_the_ui_saves_from_the_machines_view_holds_it_as_sweep_wrote_it(machines, browser):
    """The format is MLflow's: opened in the UI, taken over ("Override saved view") and saved again under a new
    name, the view the UI writes holds every setting sweep's holds, the same values encoded the same way."""
    open_page(browser, machines.view, "gpu_name")
    click(browser, "//button[normalize-space()='Override saved view']", "the button taking the view over")
    click_when_free(browser, "[data-testid='saved-views-trigger']", "the views menu")
    click_when_free(browser, "[data-testid='saved-views-save-current']", "Save as new view")
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid='save-view-name-input']"),
             "the view's name").send_keys("saved in the UI")
    click_when_free(browser, "[data-testid='save-view-save-button']", "Save")
    client = MlflowClient(tracking_uri=machines.uri)

    def saved(_: WebDriver) -> str | None:
        tags = client.get_experiment(machines.experiment_id).tags
        return next((value for key, value in tags.items()
                     if key.startswith(VIEW_TAG_PREFIX) and json.loads(value)["name"] == "saved in the UI"), None)

    envelope, state = decoded(wait_for(browser, saved, "the view the UI saved, in the store"))
    ours, our_state = decoded(client.get_experiment(machines.experiment_id).tags[VIEW_TAG])
    assert envelope.keys() == ours.keys()
    assert encode_state(state) == envelope["state"]
    assert {key: state.get(key) for key in our_state} == our_state == machines_view_state()
