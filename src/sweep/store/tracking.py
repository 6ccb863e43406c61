"""Every MLflow call of sweep: one parent run per sweep invocation, one child run per job."""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from sweep.config import TrackingConfig
from sweep.records.redaction import redact_mapping, redact_text, redact_uri
from sweep.records.results import JobResult, RunStatus
from sweep.store.runs_view import MACHINES_VIEW_QUERY, share_machines_view

# MLflow's UI opens an experiment on its GenAI pages unless told it holds model-training runs. MLflow 3.17 reads
# that from the page URL (`workflowType`, a switch in the sidebar); earlier 3.x UIs read this experiment tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
DEFAULT_UI_ADDRESS = "http://127.0.0.1:5000"
DESCRIPTION_LIMIT = MAX_TAG_VAL_LENGTH  # a run's description is its `mlflow.note.content` tag

# A job's resume key (sweep/resume.py) on its run. Not named like `*_key`: redaction hides the values of such tags.
RESUME_TAG = "combination_hash"
RESUMED_TAG_PREFIX = "resumed."  # on the parent run: one tag per combination skipped as already measured
RESUMED_NOTE = ": measured in run "  # such a tag's value: `<job name>: measured in run <run id>`
# On a job read back for a sweep that resumed it (never logged): the resuming sweep's id; the run's own `sweep_id`
# names the sweep that measured it.
RESUMED_BY_TAG = "resumed_by_sweep"

JOB_UID_TAG = "job_uid"  # JobResult.uid: finds a run again when an upload is retried from the spool
REPORT_ROLE = "report"  # the `sweep_role` of a run holding a report (`python -m sweep.report --log-run`)


def configure_http_retries(cfg: TrackingConfig) -> None:
    """Bounded waits for an http(s) store, through the variables MLflow reads on every request. MLflow's own
    defaults (7 retries, 120 s timeout, backoff factor 2) hang each call for about 4 minutes on a dead server.
    urllib3 sleeps backoff_factor * 2**(n-1) s before retry n >= 2, so one request waits at most
    (http_max_retries + 1) * http_timeout_s + sum of those sleeps (README, "When things go wrong")."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.http_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.http_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(cfg.http_backoff_factor)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0"
    # MLflow prints each run's URL, with the tracking URI's credentials if it has any.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def worst_case_request_wait_s(cfg: TrackingConfig) -> float:
    """The longest one MLflow request can block with these settings (every attempt timing out)."""
    sleeps = sum(min(120.0, cfg.http_backoff_factor * 2 ** (n - 1)) for n in range(2, cfg.http_max_retries + 1))
    return (cfg.http_max_retries + 1) * cfg.http_timeout_s + sleeps


def check_server_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raises ConnectionError for an http(s) store that does not answer: MLflow would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    try:  # without the URI's credentials: urllib does not take them, and any answer will do
        urllib.request.urlopen(_without_credentials(uri), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # the server answered; MLflow reports any real problem
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"cannot reach MLflow server {redact_uri(uri)}: {reason}; start it (mlflow server ...)") from None


def open_store(cfg: TrackingConfig) -> MlflowClient:
    """A client of the store `cfg.uri`, with bounded waits; ConnectionError when it is a server that does not answer.
    A local sqlite file's folder is made, and its tables are created or upgraded by one process at a time."""
    configure_http_retries(cfg)
    check_server_reachable(cfg.uri)
    with _sqlite_store_lock(cfg.uri):
        return MlflowClient(tracking_uri=cfg.uri)  # creates or upgrades a sqlite store's tables


def open_experiment(client: MlflowClient, cfg: TrackingConfig) -> str:
    """The id of the experiment `cfg.experiment`, created when missing (a server owns its artifacts; a local store
    keeps them under `cfg.artifact_root`), marked as holding model-training runs for the UI."""
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    elif cfg.uri.startswith(("http://", "https://")):
        experiment_id = client.create_experiment(cfg.experiment)
    else:
        artifacts = Path(cfg.artifact_root).expanduser().resolve()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=artifacts.as_uri())
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id


class Tracker:
    """`describe`: a job's result in one line, the child run's description (the views layer writes it)."""

    def __init__(self, cfg: TrackingConfig, describe: Callable[[JobResult], str]):
        self.describe = describe
        self.client = open_store(cfg)
        self.uri = cfg.uri
        self.experiment = cfg.experiment
        self.experiment_id = open_experiment(self.client, cfg)
        share_machines_view(self.client, self.experiment_id)

    def start_sweep(self, name: str, tags: dict[str, str]) -> str:
        tags = redact_mapping(tags | {"sweep_role": "parent"})
        run = self.client.create_run(self.experiment_id, run_name=redact_text(name), tags=tags)
        return run.info.run_id

    def end_sweep(self, sweep_id: str, summary: dict[str, float], failed: bool) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(sweep_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        self.client.set_terminated(sweep_id, status="FAILED" if failed else "FINISHED")

    def start_job(self, sweep_id: str, result: JobResult, tags: dict[str, str]) -> str:
        """A RUNNING child run for the job `result` will hold, so that a job in progress (or killed) is visible;
        `log_job` completes it (from the spool too: the run carries the record's `job_uid`)."""
        tags = redact_mapping(result.tags | tags) | {
            MLFLOW_PARENT_RUN_ID: sweep_id, "sweep_id": sweep_id, "sweep_role": "job", JOB_UID_TAG: result.uid}
        run_id = self.client.create_run(self.experiment_id, run_name=redact_text(result.name), tags=tags).info.run_id
        params = redact_mapping({k: str(v) for k, v in result.params.items()})
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        return run_id

    def kill_job(self, run_id: str, reason: str) -> None:
        self.client.log_batch(run_id, tags=[RunTag("run_status", "killed"), RunTag("status_reason", reason)])
        self.client.set_terminated(run_id, status="KILLED")

    def kill_sweep(self, sweep_id: str, reason: str) -> None:
        """The sweep was interrupted: its children still RUNNING (in any process) and itself end KILLED."""
        for run in self._children(sweep_id, "attributes.status = 'RUNNING'"):
            self.kill_job(run.info.run_id, reason)
        self.client.set_tag(sweep_id, "status_reason", reason)
        self.client.set_terminated(sweep_id, status="KILLED")

    def sweep_shape(self, sweep_id: str) -> tuple[int | None, frozenset[str]]:
        """What the launching process recorded on the parent: how many jobs, and which keys the sweep varies."""
        tags = self.client.get_run(sweep_id).data.tags
        total = tags.get("total_jobs", "")
        return (int(total) if total.isdigit() else None), frozenset(filter(None, tags.get("swept_keys", "").split(",")))

    def find_measured(self, job_key: str) -> str | None:
        """The id of a `measured` run with this resume key (sweep/resume.py), in any sweep of the experiment."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.{RESUME_TAG} = '{job_key}' and tags.run_status = 'measured'", max_results=1)
        return runs[0].info.run_id if runs else None

    def note_resumed(self, sweep_id: str, job_key: str, name: str, run_id: str) -> None:
        """The sweep skips its job `name`: run `run_id`, of an earlier sweep, measured it."""
        self.client.set_tag(sweep_id, f"{RESUMED_TAG_PREFIX}{job_key[:16]}", f"{name}{RESUMED_NOTE}{run_id}")

    def resumed_jobs(self, sweep_id: str) -> dict[str, JobResult]:
        """The earlier runs that measured the jobs the sweep skipped (`note_resumed`), as the store holds them, by
        run id in the order they ran: named as in this sweep and tagged RESUMED_BY_TAG."""
        names = resumed_runs(self.client.get_run(sweep_id))
        runs = sorted((self.client.get_run(run_id) for run_id in names), key=lambda run: run.info.start_time)
        jobs = {}
        for run in runs:
            job = job_result(run)
            job.name, job.tags[RESUMED_BY_TAG] = names[run.info.run_id], sweep_id
            jobs[run.info.run_id] = job
        return jobs

    def _children(self, sweep_id: str, condition: str = "") -> list:
        query = f"tags.sweep_id = '{sweep_id}' and tags.sweep_role = 'job'" + (f" and {condition}" if condition else "")
        return self.client.search_runs([self.experiment_id], query, max_results=50000)

    def is_reachable(self, timeout_s: float = 5.0) -> bool:
        """One quick probe, no retries: does the store answer now?"""
        try:
            check_server_reachable(self.uri, timeout_s)
        except ConnectionError:
            return False
        return True

    def log_job(self, sweep_id: str, result: JobResult, run_id: str | None = None) -> str:
        """Completes the job's run, redacted: its `start_job` run (`run_id`) or a new child run. Without `run_id`, a
        run an earlier attempt left half-logged (same `job_uid`, still RUNNING) is deleted first, and one it
        completed is kept and returned, so a retried upload from the spool never duplicates a job."""
        if run_id is None:
            for earlier in self.client.search_runs([self.experiment_id], f"tags.{JOB_UID_TAG} = '{result.uid}'"):
                if earlier.info.status != "RUNNING":
                    return earlier.info.run_id
                self.client.delete_run(earlier.info.run_id)
        tags = redact_mapping(result.tags) | non_finite_metric_tags(result.metrics) | {
            MLFLOW_PARENT_RUN_ID: sweep_id,
            "sweep_id": sweep_id,
            "sweep_role": "job",
            "run_status": result.status.value,
            "status_reason": redact_text(result.reason)[:5000],
            MLFLOW_RUN_NOTE: redact_text(self.describe(result)),
            JOB_UID_TAG: result.uid,
        }
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=redact_text(result.name), tags=tags)
            run_id = run.info.run_id
        else:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        stamp = result.ended_ms
        metrics = [Metric(k, float(v), stamp, 0) for k, v in result.metrics.items() if not _is_nan(v)]
        params = [Param(k, v) for k, v in redact_mapping({k: str(v) for k, v in result.params.items()}).items()]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        self._log_artifacts(run_id, result.artifacts)
        self.client.set_terminated(run_id, status="FAILED" if result.status == RunStatus.failed else "FINISHED")
        return run_id

    def sweep_jobs(self, sweep_id: str) -> dict[str, JobResult]:
        """The sweep's job runs as the store holds them, by run id, in the order they were logged: whichever
        process or machine logged them. Artifacts are not read back."""
        jobs: dict[str, JobResult] = {}
        filter_string = f"tags.sweep_id = '{sweep_id}' and tags.sweep_role = 'job'"
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, order_by=["attributes.start_time ASC"],
                                           page_token=token)
            for run in page:
                jobs[run.info.run_id] = job_result(run)
            token = page.token
            if not token:
                return jobs

    def describe_sweep(self, sweep_id: str, description: str, artifacts: dict[str, str | bytes]) -> None:
        """The parent run's description (markdown, at most DESCRIPTION_LIMIT characters) and its artifacts."""
        self.client.set_tag(sweep_id, MLFLOW_RUN_NOTE, redact_text(description))
        self._log_artifacts(sweep_id, artifacts)

    def log_report(self, name: str, page: Callable[[str], tuple[str, dict[str, str | bytes]]]) -> str:
        """A finished run holding a report (`sweep_role` REPORT_ROLE), its id: `page(run_id)` is its description
        and artifacts, as for `describe_sweep`."""
        run = self.client.create_run(self.experiment_id, run_name=redact_text(name), tags={"sweep_role": REPORT_ROLE})
        self.describe_sweep(run.info.run_id, *page(run.info.run_id))
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def ui_command(self) -> str | None:
        """The command that serves this store's UI; None for a tracking server, which serves it already."""
        if self.uri.startswith(("http://", "https://")):
            return None
        store, prefix = self.uri, "sqlite:///"
        if store.startswith(prefix):  # absolute, so that the command works from any directory
            store = prefix + str(Path(store[len(prefix):]).expanduser().resolve())
        return f"mlflow ui --backend-store-uri {store}"

    def run_page(self, run_id: str) -> str:
        """The address of the run's page in the UI, opened on model-training runs."""
        return f"{self._ui_address()}/{self.run_link(run_id)}"

    def run_link(self, run_id: str) -> str:
        """The run's page relative to the UI's address, for links inside the UI (run descriptions)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}?{UI_WORKFLOW_QUERY}"

    def machines_view_page(self) -> str:
        """The address of the experiment's runs in the UI, each configuration's machines side by side."""
        return f"{self._ui_address()}/{self.machines_view_link()}"

    def machines_view_link(self) -> str:
        """The experiment's runs in the view `share_machines_view` saved, relative to the UI's address."""
        return f"#/experiments/{self.experiment_id}/runs?{MACHINES_VIEW_QUERY}&{UI_WORKFLOW_QUERY}"

    def _ui_address(self) -> str:
        return self.uri.rstrip("/") if self.ui_command() is None else DEFAULT_UI_ADDRESS

    @staticmethod
    def artifact_link(run_id: str, path: str) -> str:
        """A run's artifact file relative to the UI's address, e.g. for an image in a run description."""
        return "get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})

    def _log_artifacts(self, run_id: str, artifacts: dict[str, str | bytes]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            for artifact_path, content in artifacts.items():
                local = Path(folder) / artifact_path
                local.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    local.write_bytes(content)
                else:
                    local.write_text(redact_text(content))
            self.client.log_artifacts(run_id, folder)


def resumed_runs(sweep: Run) -> dict[str, str]:
    """The runs of earlier sweeps that the parent run `sweep` resumed, by run id: each with its job's name in
    `sweep`."""
    notes = (value.rpartition(RESUMED_NOTE) for key, value in sweep.data.tags.items()
             if key.startswith(RESUMED_TAG_PREFIX))
    return {run_id: name for name, _, run_id in notes}


def job_result(run: Run) -> JobResult:
    """A job run as the store holds it; artifacts are not read back. `ended_ms` is when the job ended, as its
    metrics are stamped (`log_job`), also for a run uploaded later from the spool; for a run without metrics, when
    it ended in the store, else when it started. A run without a result (still running, or its process died) reads
    as failed, and its reason says so."""
    tags = run.data.tags
    stamps = [metric.timestamp for metric in run.data.to_proto().metrics]
    ended_ms = max(stamps) if stamps else run.info.end_time or run.info.start_time
    reason = tags.get("status_reason", "")
    if "run_status" not in tags:
        reason = (f"no result logged: the run is {run.info.status} in the store (in progress, or its process "
                  "died before logging one)")
    return JobResult(name=run.info.run_name, params=dict(run.data.params),
                     status=RunStatus(tags.get("run_status", RunStatus.failed.value)), reason=reason,
                     metrics=dict(run.data.metrics), ended_ms=ended_ms,
                     tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")})


def _without_credentials(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


# MLflow's stores keep +-inf as +-1.7976931348623157e308 (the largest float64); report and summary print that
# value as ∞. NaN, which a store may not keep, is not logged as a metric. Both are named in tags, so that
# neither passes unseen.
INFINITE_METRICS_TAG = "infinite_metrics"
NAN_METRICS_TAG = "nan_metrics"


def non_finite_metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    infinite = sorted(k for k, v in metrics.items() if isinstance(v, float) and math.isinf(v))
    nan = sorted(k for k, v in metrics.items() if _is_nan(v))
    return ({INFINITE_METRICS_TAG: ",".join(infinite)} if infinite else {}) | (
        {NAN_METRICS_TAG: ",".join(nan)} if nan else {})


@contextmanager
def _sqlite_store_lock(uri: str) -> Iterator[None]:
    """For a local sqlite store: its folder made, and held while MLflow opens the file, an exclusive lock on that
    folder (no file left beside the store; a read-only folder locks too). MLflow creates and upgrades a store's
    tables unguarded: sweeps started at once on a new store each did, and all but one failed (`table
    _alembic_tmp_metrics already exists`, `Online migration expected to match one row`)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    folder = Path(uri[len(prefix):]).expanduser().parent
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when closed, also by a process that is killed
        yield
    finally:
        os.close(handle)
