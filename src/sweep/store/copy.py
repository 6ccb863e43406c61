"""Copying one store's sweeps into another (`python -m sweep.copy`): each parent run with its job runs, their params,
metrics (every step), tags, status, times and artifacts. Each copy is tagged COPIED_FROM_TAG, so that copying
again adds only what the target lacks."""

from __future__ import annotations

import re
import tempfile
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Experiment, Metric, Param, Run, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from sweep.config import TrackingConfig
from sweep.records.redaction import redact_uri
from sweep.store.tracking import JOB_UID_TAG, open_experiment, open_store

# On a copy: the id of the run it copies as that run was first logged, so a copy of a copy names the same run and
# carrying runs A -> B -> C and A -> C never makes two copies of one run.
COPIED_FROM_TAG = "copied_from"
_RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")  # how MLflow names runs: tag values naming runs are rewritten
_SQLITE = "sqlite:///"


class CopyError(Exception):
    """The stores cannot be copied as given; the message says how to fix it."""


@dataclass(frozen=True)
class Store:
    uri: str
    client: MlflowClient
    experiment: Experiment
    artifact_location: str  # where the experiment's artifacts are now; a moved local store's differs from MLflow's


@dataclass(frozen=True)
class RunCopy:
    source: Run
    existing: Run | None  # its copy in the target, or the run itself where the target is the store it was logged to

    @property
    def pending(self) -> bool:
        """Missing from the target, or there only as a copy that is out of date: one that was interrupted, or made
        while the run was in progress. A run the target did not get from a copy is never touched."""
        return self.existing is None or (COPIED_FROM_TAG in self.existing.data.tags
                                         and self.existing.info.status != self.source.info.status)


@dataclass(frozen=True)
class SweepCopy:
    parent: RunCopy
    jobs: list[RunCopy]

    @property
    def pending(self) -> bool:
        return self.parent.pending or any(job.pending for job in self.jobs)


def check_different_stores(source_uri: str, target_uri: str) -> None:
    if _identity(source_uri) == _identity(target_uri):
        raise CopyError(f"--from and --to are the same store ({redact_uri(source_uri)}): copy into another one")


def open_source(uri: str, experiment: str, artifact_root: str | None = None) -> Store:
    """`artifact_root`: where the experiment's artifact folder is now, when the store was moved without it."""
    if uri.startswith(_SQLITE) and not _sqlite_path(uri).is_file():
        raise CopyError(f"no such store: {_sqlite_path(uri)} does not exist")
    client, found = _open(TrackingConfig(uri=uri, experiment=experiment), create=False)
    if found is None:
        names = ", ".join(repr(e.name) for e in client.search_experiments()) or "none"
        raise CopyError(f"{redact_uri(uri)} has no experiment {experiment!r} (it has {names}): pass --experiment")
    location = Path(artifact_root).expanduser().resolve().as_uri() if artifact_root else found.artifact_location
    if location.startswith("file:") and not Path(local_file_uri_to_path(location)).is_dir():
        raise CopyError(
            f"the artifacts of experiment {experiment!r} are not at {local_file_uri_to_path(location)} (a store "
            "logged on another machine, or moved without them): bring that folder (tracking.artifact_root there) "
            "too and pass --from-artifact-root <where it is now>, an empty folder if it holds none")
    return Store(uri, client, found, location)


def open_target(uri: str, experiment: str, artifact_root: str | None, create: bool) -> Store | None:
    """The target's experiment, created when missing if `create` (a new local store keeps artifacts under
    `artifact_root`, by default beside its sqlite file); None when it is missing and not to be created."""
    if not create and uri.startswith(_SQLITE) and not _sqlite_path(uri).is_file():
        return None  # opening it would create it
    if artifact_root is None:
        local = uri.startswith(_SQLITE)
        artifact_root = str(_sqlite_path(uri).parent / "artifacts") if local else TrackingConfig.artifact_root
    client, found = _open(TrackingConfig(uri=uri, experiment=experiment, artifact_root=artifact_root), create)
    return None if found is None else Store(uri, client, found, found.artifact_location)


def plan_copy(source: Store, target: Store | None) -> list[SweepCopy]:
    """Every sweep of the source (a parent run, `sweep_role=parent`) with its child runs, oldest first, each with
    its copy in the target when there is one: a target run with the same COPIED_FROM_TAG (or run id), or for a
    job run the same `job_uid`."""
    runs = _all_runs(source)
    targets = _all_runs(target) if target is not None else []
    by_origin = {_origin(run): run for run in targets}
    by_job_uid = {run.data.tags[JOB_UID_TAG]: run for run in targets if JOB_UID_TAG in run.data.tags}

    def find(run: Run) -> RunCopy:
        existing = by_origin.get(_origin(run)) or by_job_uid.get(run.data.tags.get(JOB_UID_TAG, ""))
        return RunCopy(run, existing)

    children: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if MLFLOW_PARENT_RUN_ID in run.data.tags:
            children[run.data.tags[MLFLOW_PARENT_RUN_ID]].append(run)
    return [SweepCopy(find(run), [find(child) for child in children[run.info.run_id]])
            for run in runs if run.data.tags.get("sweep_role") == "parent"]


def copy_sweeps(source: Store, target: Store, plan: list[SweepCopy]) -> None:
    """Copies what `plan` finds pending. A sweep's parent run is created first and completed last (its
    description links its job runs), so a copy interrupted anywhere is completed by the next."""
    ids = {copy.source.info.run_id: copy.existing.info.run_id
           for sweep in plan for copy in (sweep.parent, *sweep.jobs) if copy.existing is not None}
    for sweep in (sweep for sweep in plan if sweep.pending):
        parent_id = _target_run(source, target, sweep.parent, ids)
        for job in (job for job in sweep.jobs if job.pending):
            _fill(source, target, job.source, _target_run(source, target, job, ids), ids)
        if sweep.parent.existing is None or COPIED_FROM_TAG in sweep.parent.existing.data.tags:
            _fill(source, target, sweep.parent.source, parent_id, ids)


def _target_run(source: Store, target: Store, copy: RunCopy, ids: dict[str, str]) -> str:
    """The id of the run's copy in the target, created (with its tags, so that it is found again) if missing."""
    if copy.existing is not None:
        return copy.existing.info.run_id
    run = copy.source
    created = target.client.create_run(target.experiment.experiment_id, start_time=run.info.start_time,
                                       tags=_copied_tags(source, target, run, ids), run_name=run.info.run_name)
    ids[run.info.run_id] = created.info.run_id
    return created.info.run_id


def _fill(source: Store, target: Store, run: Run, target_id: str, ids: dict[str, str]) -> None:
    """Everything of `run` into its copy `target_id`: what is there already is overwritten with the same."""
    metrics = [entry for key in run.data.metrics for entry in source.client.get_metric_history(run.info.run_id, key)]
    tags = _copied_tags(source, target, run, ids)
    target.client.log_batch(target_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in metrics],
                            params=[Param(k, v) for k, v in run.data.params.items()],
                            tags=[RunTag(k, v) for k, v in tags.items()])
    artifacts = get_artifact_repository(_artifact_uri(source, run), tracking_uri=source.uri)
    if artifacts.list_artifacts():
        with tempfile.TemporaryDirectory() as folder:
            target.client.log_artifacts(target_id, artifacts.download_artifacts("", dst_path=folder))
    if run.info.status != "RUNNING":
        target.client.set_terminated(target_id, status=run.info.status, end_time=run.info.end_time)


def _copied_tags(source: Store, target: Store, run: Run, ids: dict[str, str]) -> dict[str, str]:
    """The run's tags naming the target's runs and experiment: `mlflow.parentRunId`, `sweep_id`, `resumed.*` and the
    description's links."""
    link = re.compile(rf"(?<=#/experiments/){re.escape(source.experiment.experiment_id)}(?=/)")

    def rewrite(value: str) -> str:
        value = _RUN_ID.sub(lambda found: ids.get(found[0], found[0]), value)
        # A longer experiment id in the links could push a full description past MLflow's limit.
        return link.sub(target.experiment.experiment_id, value)[:MAX_TAG_VAL_LENGTH]

    return {key: rewrite(value) for key, value in run.data.tags.items()} | {COPIED_FROM_TAG: _origin(run)}


def _origin(run: Run) -> str:
    return run.data.tags.get(COPIED_FROM_TAG, run.info.run_id)


def _artifact_uri(store: Store, run: Run) -> str:
    recorded = store.experiment.artifact_location
    uri = run.info.artifact_uri
    return store.artifact_location + uri[len(recorded):] if uri.startswith(recorded) else uri


def _all_runs(store: Store) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = store.client.search_runs([store.experiment.experiment_id], order_by=["attributes.start_time ASC"],
                                        max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def _open(cfg: TrackingConfig, create: bool) -> tuple[MlflowClient, Experiment | None]:
    try:
        client = open_store(cfg)
        if create:
            open_experiment(client, cfg)
        return client, client.get_experiment_by_name(cfg.experiment)
    except ConnectionError as error:
        raise CopyError(str(error)) from None
    except Exception as error:  # not an MLflow store, an older schema, a database that refuses the connection
        reason = next(iter(str(error).strip().splitlines()), "")
        raise CopyError(f"cannot open the store {redact_uri(cfg.uri)}: {type(error).__name__}: {reason}") from None


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len(_SQLITE):].partition("?")[0]).expanduser()


def _identity(uri: str) -> tuple[str, ...]:
    if uri.startswith(_SQLITE):
        return "sqlite", str(_sqlite_path(uri).resolve())
    parts = urllib.parse.urlsplit(uri)
    return parts.scheme, (parts.hostname or "").lower(), str(parts.port), parts.path.rstrip("/")
