"""Every MLflow call of sweep: one parent run per sweep invocation, one child run per job."""

from __future__ import annotations

import math
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .config import TrackingConfig
from .redaction import redact_mapping, redact_text, redact_uri
from .results import JobResult, RunStatus

JOB_UID_TAG = "job_uid"  # JobResult.uid: finds a run again when an upload is retried from the spool


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


class Tracker:
    def __init__(self, cfg: TrackingConfig):
        configure_http_retries(cfg)
        check_server_reachable(cfg.uri)
        _ensure_sqlite_folder(cfg.uri)
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.uri = cfg.uri
        self.experiment = cfg.experiment
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        elif cfg.uri.startswith(("http://", "https://")):
            self.experiment_id = self.client.create_experiment(cfg.experiment)  # the server owns artifacts
        else:
            artifacts = Path(cfg.artifact_root).expanduser().resolve()
            self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts.as_uri())

    def start_sweep(self, name: str, tags: dict[str, str]) -> str:
        tags = redact_mapping(tags | {"sweep_role": "parent"})
        run = self.client.create_run(self.experiment_id, run_name=redact_text(name), tags=tags)
        return run.info.run_id

    def end_sweep(self, sweep_id: str, summary: dict[str, float], failed: bool) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(sweep_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        self.client.set_terminated(sweep_id, status="FAILED" if failed else "FINISHED")

    def is_reachable(self, timeout_s: float = 5.0) -> bool:
        """One quick probe, no retries: does the store answer now?"""
        try:
            check_server_reachable(self.uri, timeout_s)
        except ConnectionError:
            return False
        return True

    def log_job(self, sweep_id: str, result: JobResult) -> str:
        """One child run, redacted. A run an earlier attempt left half-logged (same `job_uid`, still RUNNING) is
        deleted first; one it completed is kept and returned, so a retried upload never duplicates a job."""
        for earlier in self.client.search_runs([self.experiment_id], f"tags.{JOB_UID_TAG} = '{result.uid}'"):
            if earlier.info.status != "RUNNING":
                return earlier.info.run_id
            self.client.delete_run(earlier.info.run_id)
        tags = redact_mapping(result.tags) | {
            MLFLOW_PARENT_RUN_ID: sweep_id,
            "sweep_id": sweep_id,
            "sweep_role": "job",
            "run_status": result.status.value,
            "status_reason": redact_text(result.reason)[:5000],
            JOB_UID_TAG: result.uid,
        }
        run = self.client.create_run(self.experiment_id, run_name=redact_text(result.name), tags=tags)
        run_id = run.info.run_id
        stamp = result.ended_ms
        metrics = [Metric(k, float(v), stamp, 0) for k, v in result.metrics.items() if not _is_nan(v)]
        params = [Param(k, v) for k, v in redact_mapping({k: str(v) for k, v in result.params.items()}).items()]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        self._log_artifacts(run_id, result.artifacts)
        self.client.set_terminated(run_id, status="FAILED" if result.status == RunStatus.failed else "FINISHED")
        return run_id

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


def _without_credentials(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _ensure_sqlite_folder(uri: str) -> None:
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        Path(uri[len(prefix):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
