"""Every MLflow call of sweep: one parent run per sweep invocation, one child run per job."""

from __future__ import annotations

import math
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from .config import TrackingConfig
from .results import JobResult, RunStatus
from .summary import job_description

# MLflow's UI opens an experiment on its GenAI pages unless told it holds model-training runs. MLflow 3.17 reads
# that from the page URL (`workflowType`, a switch in the sidebar); earlier 3.x UIs read this experiment tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
DEFAULT_UI_ADDRESS = "http://127.0.0.1:5000"
DESCRIPTION_LIMIT = MAX_TAG_VAL_LENGTH  # a run's description is its `mlflow.note.content` tag


def check_server_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raises ConnectionError for an http(s) store that does not answer: MLflow would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # the server answered; MLflow reports any real problem
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"cannot reach MLflow server {uri}: {reason}; start it (mlflow server ...)") from None


class Tracker:
    def __init__(self, cfg: TrackingConfig):
        check_server_reachable(cfg.uri)
        _ensure_sqlite_folder(cfg.uri)
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.uri = cfg.uri
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        elif cfg.uri.startswith(("http://", "https://")):
            self.experiment_id = self.client.create_experiment(cfg.experiment)  # the server owns artifacts
        else:
            artifacts = Path(cfg.artifact_root).expanduser().resolve()
            self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts.as_uri())
        self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def start_sweep(self, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags | {"sweep_role": "parent"})
        return run.info.run_id

    def end_sweep(self, sweep_id: str, summary: dict[str, float], failed: bool) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(sweep_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        self.client.set_terminated(sweep_id, status="FAILED" if failed else "FINISHED")

    def log_job(self, sweep_id: str, result: JobResult) -> str:
        tags = result.tags | {
            MLFLOW_PARENT_RUN_ID: sweep_id,
            "sweep_id": sweep_id,
            "sweep_role": "job",
            "run_status": result.status.value,
            "status_reason": result.reason[:5000],
            MLFLOW_RUN_NOTE: job_description(result),
        }
        run_id = self.client.create_run(self.experiment_id, run_name=result.name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics.items() if not _is_nan(v)]
        params = [Param(k, str(v)) for k, v in result.params.items()]
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
                tags = run.data.tags
                jobs[run.info.run_id] = JobResult(
                    name=run.info.run_name, params=dict(run.data.params),
                    status=RunStatus(tags.get("run_status", RunStatus.failed.value)),
                    reason=tags.get("status_reason", ""), metrics=dict(run.data.metrics),
                    tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")})
            token = page.token
            if not token:
                return jobs

    def describe_sweep(self, sweep_id: str, description: str, artifacts: dict[str, str | bytes]) -> None:
        """The parent run's description (markdown, at most DESCRIPTION_LIMIT characters) and its artifacts."""
        self.client.set_tag(sweep_id, MLFLOW_RUN_NOTE, description)
        self._log_artifacts(sweep_id, artifacts)

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
        address = self.uri.rstrip("/") if self.ui_command() is None else DEFAULT_UI_ADDRESS
        return f"{address}/{self.run_link(run_id)}"

    def run_link(self, run_id: str) -> str:
        """The run's page relative to the UI's address, for links inside the UI (run descriptions)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}?{UI_WORKFLOW_QUERY}"

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
                    local.write_text(content)
            self.client.log_artifacts(run_id, folder)


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _ensure_sqlite_folder(uri: str) -> None:
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        Path(uri[len(prefix):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
