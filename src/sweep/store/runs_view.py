"""The experiment's runs table in MLflow's UI as a saved view: the job runs grouped by configuration, each group one
row per machine (and per repeated measurement), with `gpu_name`, the speedup, its interval and err_ratio.

MLflow's UI (3.15 and later) keeps a saved runs-table view (columns, filter, sort, group-by) as an experiment tag,
`mlflow.sharedViewState.<id>`, and opens it from the page address with `viewStateShareKey=<id>`; MLflow 3.17 also
lists it under the runs page's view menu. The tag holds what the UI writes when a user saves a view (MLflow 3.17.2,
`ExperimentGetShareLinkModal` and `savedViewEnvelope`): a JSON envelope `{name, createdAt, updatedAt, state}`, its
`state` the page's search facets and table state as JSON, zlib-deflated and base64-encoded behind `deflate;`. Keys
the state leaves out take the UI's defaults. That state is the UI's internal format: pyproject.toml pins the MLflow
versions whose UI tests/test_ui.py checks it against."""

from __future__ import annotations

import base64
import json
import time
import zlib

from mlflow.tracking import MlflowClient

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
MACHINES_VIEW_ID = "sweep-machines"
MACHINES_VIEW_NAME = "sweep: each configuration on every machine"
MACHINES_VIEW_QUERY = f"viewStateShareKey={MACHINES_VIEW_ID}"
COMPRESSED_PREFIX = "deflate;"

# A group's params: a job's configuration as the views name it (sweep.views.table: workload, baseline, CONFIG,
# kernels); a group's runs differ by machine, or repeat a measurement. The group's label names them in this order,
# the likeliest to vary first: a narrow column shows the label's start.
GROUPED_BY = ("kernels", "dtype", "prompt_len", "model", "batch_size", "workload", "baseline", "timing_mode")
SHOWN = (("tags", "gpu_name"), ("metrics", "speedup"), ("metrics", "speedup_ci_low"), ("metrics", "speedup_ci_high"),
         ("metrics", "err_ratio"), ("metrics", "latency_ms_baseline"), ("tags", "run_status"))
RUN_NAME = ("attributes", "Run Name")
WIDTHS = {RUN_NAME: 300, ("tags", "gpu_name"): 200}  # pixels; the UI sizes the others


def column(kind: str, name: str) -> str:
    """A runs-table column as the UI names it, e.g. metrics.`speedup`."""
    return f"{kind}.`{name}`"


def machines_view_state() -> dict[str, object]:
    """Job runs only, grouped by configuration (a group's row shows the average of its runs), the machines in the
    same order in every group."""
    return {
        "searchFilter": "tags.sweep_role = 'job'",
        "orderByKey": column("tags", "gpu_name"),
        "orderByAsc": True,
        "selectedColumns": [column(kind, name) for kind, name in SHOWN],
        "columnOrder": [column(kind, name) for kind, name in (RUN_NAME, *SHOWN)],  # the UI sizes only these
        "columnWidths": {column(kind, name): width for (kind, name), width in WIDTHS.items()},
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "param", "groupByData": name} for name in GROUPED_BY]},
    }


def encode_state(state: dict[str, object]) -> str:
    """A view's state as the UI stores it."""
    text = json.dumps(state, separators=(",", ":"), ensure_ascii=False)
    return COMPRESSED_PREFIX + base64.b64encode(zlib.compress(text.encode())).decode()


def share_machines_view(client: MlflowClient, experiment_id: str) -> None:
    """Saves the view in the experiment, unless it holds it already: changes a user saved over it stay."""
    key = VIEW_TAG_PREFIX + MACHINES_VIEW_ID
    if key in client.get_experiment(experiment_id).tags:
        return
    now = int(time.time() * 1000)
    envelope = {"name": MACHINES_VIEW_NAME, "createdAt": now, "updatedAt": now,
                "state": encode_state(machines_view_state())}
    client.set_experiment_tag(experiment_id, key, json.dumps(envelope, separators=(",", ":")))
