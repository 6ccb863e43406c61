"""The experiment's saved runs view, each configuration's machines side by side (sweep.store.runs_view), and the report
logged as a run (`python -m sweep.report --log-run`), in real sqlite stores written with sweep's Tracker. The UI
opening both, and the format checked against a view the UI saves itself: tests/test_ui.py."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pytest
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from test_results_table import H100, H200, two_machines

from sweep.config import TrackingConfig
from sweep.report import main
from sweep.store.runs_view import (
    COMPRESSED_PREFIX,
    GROUPED_BY,
    MACHINES_VIEW_ID,
    MACHINES_VIEW_NAME,
    SHOWN,
    VIEW_TAG_PREFIX,
)
from sweep.store.tracking import DESCRIPTION_LIMIT, Tracker
from sweep.views.machines import machine_pairs
from sweep.views.report import load_runs
from sweep.views.summary import job_description
from sweep.views.sweep_page import REPORT_FOLDER, Links, report_page, sweep_page
from sweep.views.table import CONFIG, latest_runs

VIEW_TAG = VIEW_TAG_PREFIX + MACHINES_VIEW_ID


def decoded(tag_value: str) -> tuple[dict, dict]:
    """A saved view's envelope, and its state decoded."""
    envelope = json.loads(tag_value)
    assert envelope["state"].startswith(COMPRESSED_PREFIX)
    packed = base64.b64decode(envelope["state"].removeprefix(COMPRESSED_PREFIX))
    return envelope, json.loads(zlib.decompress(packed))


def test_a_sweeps_store_holds_the_machines_view_of_what_its_runs_log(tmp_path: Path) -> None:
    store = two_machines(tmp_path)
    client, experiment_id = store.tracker.client, store.tracker.experiment_id
    envelope, state = decoded(client.get_experiment(experiment_id).tags[VIEW_TAG])
    assert envelope["name"] == MACHINES_VIEW_NAME and envelope["createdAt"] == envelope["updatedAt"]
    assert state["searchFilter"] == "tags.sweep_role = 'job'" and state["orderByKey"] == "tags.`gpu_name`"
    shown = {"tags.`gpu_name`", "metrics.`speedup`", "metrics.`speedup_ci_low`", "metrics.`speedup_ci_high`",
             "metrics.`err_ratio`"}
    assert shown <= set(state["selectedColumns"])
    grouped = [key["groupByData"] for key in state["groupBy"]["groupByKeys"]]
    assert sorted(grouped) == sorted(("workload", "baseline", *CONFIG, "kernels"))  # a configuration, as views name it
    (run, *_) = client.search_runs([experiment_id], "tags.sweep_role = 'job' and params.kernels = 'rms'")
    assert set(GROUPED_BY) <= run.data.params.keys()
    logged = {"tags": run.data.tags, "metrics": run.data.metrics}
    assert all(name in logged[kind] for kind, name in SHOWN)
    assert store.tracker.machines_view_page() == (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?"
                                                  f"viewStateShareKey={MACHINES_VIEW_ID}&workflowType=machine_learning")


def test_a_view_saved_over_the_machines_view_stays(tmp_path: Path) -> None:
    """A user who changed the view in the UI and saved it over sweep's keeps it: later sweeps do not write it."""
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    tracker = Tracker(cfg, describe=job_description)
    envelope, state = decoded(tracker.client.get_experiment(tracker.experiment_id).tags[VIEW_TAG])
    changed = json.dumps(envelope | {"updatedAt": envelope["createdAt"] + 1, "state": json.dumps(state | {
        "orderByKey": "metrics.`speedup`"})})
    tracker.client.set_experiment_tag(tracker.experiment_id, VIEW_TAG, changed)
    Tracker(cfg, describe=job_description)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[VIEW_TAG] == changed


def test_the_report_is_logged_as_a_run_of_the_first_store_read(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    store = two_machines(tmp_path)
    before = load_runs([store.uri], "kernel-sweep")
    missing = tmp_path / "missing.db"
    code = main(["--tracking-uri", f"sqlite:///{missing}", "--tracking-uri", store.uri, "--log-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "# Kernel sweep report" in out and "store left out of the report" in err and not missing.exists()
    client, experiment_id = store.tracker.client, store.tracker.experiment_id
    (run,) = client.search_runs([experiment_id], "tags.sweep_role = 'report'")
    run_id = run.info.run_id
    assert f"the report's run: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}?" in err
    assert store.tracker.machines_view_page() in err
    assert run.info.status == "FINISHED" and run.info.run_name == f"report: 8 runs on {H100}, {H200}"

    description = run.data.tags[MLFLOW_RUN_NOTE]
    (pair,) = machine_pairs(latest_runs(before))
    assert len(description) <= DESCRIPTION_LIMIT and "## Machine against machine" in description
    assert pair.headline in description and f"]({store.tracker.machines_view_link()})" in description
    assert f"get-artifact?path={REPORT_FOLDER}%2Ferr_ratio.png&run_uuid={run_id}" in description
    assert "](err_ratio.png)" not in description
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, REPORT_FOLDER)}
    assert {"report.md", "report.csv", "report.html", "machines.csv", "speedup_vs_length.png",
            "err_ratio.png"} <= logged
    assert len(load_runs([store.uri], "kernel-sweep")) == len(before)  # the report's run is not a job's


def test_a_long_report_is_cut_between_its_blocks(tmp_path: Path) -> None:
    store = two_machines(tmp_path)
    runs = latest_runs(load_runs([store.uri], "kernel-sweep"))
    links = Links(store.tracker.run_link, store.tracker.artifact_link, store.tracker.machines_view_link())
    whole = report_page(runs, "r1", links, 10**6)
    cut = report_page(runs, "r1", links, 3000)
    assert "cut here" not in whole.description and len(cut.description) <= 3000 < len(whole.description)
    shown = cut.description.split("\n\n")
    assert "cut here to fit the description" in shown[-2]
    assert shown[:-2] == whole.description.split("\n\n")[:len(shown) - 2]  # whole blocks: never half a table
    assert cut.artifacts == whole.artifacts


def test_a_sweeps_page_links_the_machines_view(tmp_path: Path) -> None:
    store = two_machines(tmp_path)
    sweep_id = next(iter(store.sweeps))
    runs = load_runs([store.uri], "kernel-sweep", [sweep_id])
    view = store.tracker.machines_view_link()
    linked = sweep_page(sweep_id, runs, "t", Links(store.tracker.run_link, store.tracker.artifact_link, view),
                        DESCRIPTION_LIMIT, {})
    assert f"]({view})" in linked.description
    assert view not in sweep_page(sweep_id, runs, "t", Links(store.tracker.run_link, store.tracker.artifact_link),
                                  DESCRIPTION_LIMIT, {}).description
