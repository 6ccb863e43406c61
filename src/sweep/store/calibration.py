"""The rerun spread (`timing.rerun_sd`) that a store's repeated jobs showed, per device model and workload: one run
per estimate in the experiment `<experiment>-rerun-sd`, beside the sweeps' (docs/mlflow-contract.md)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from sweep.config import TrackingConfig
from sweep.store.tracking import open_experiment

RERUN_SD_EXPERIMENT_SUFFIX = "-rerun-sd"
RERUN_SD_SOURCE_TAG = "timing_rerun_sd_source"  # on a job: which rerun_sd its intervals added (config.rerun_sd_used)
# On a job: the same for jobs whose configurations differ only in `seed` (sweep/run/resume.py, repeat_hash).
REPEAT_TAG = "repeat_hash"


@dataclass(frozen=True)
class RerunSdEstimate:
    device_model: str  # `device_model` of the repeated jobs' fingerprint
    workload: str
    rerun_sd: float
    repeats: int  # how many jobs of one combination it comes from
    combination: str  # what they measured, e.g. `tiny-llama bf16 rms T=118 B=1 baseline=eager`
    sweep_id: str  # the sweep that ran them; empty when they came from several


def device_model(fingerprint: Mapping[str, str]) -> str:
    """What an estimate is kept for: the GPU's model (`gpu_name`), or on the CPU the CPU's (`cpu_model`)."""
    gpu = fingerprint.get("gpu_name", "")
    return fingerprint.get("cpu_model", "") if gpu == "cpu" else gpu


def rerun_sd_experiment(experiment: str) -> str:
    return experiment + RERUN_SD_EXPERIMENT_SUFFIX


def write_rerun_sd(client: MlflowClient, tracking: TrackingConfig, estimate: RerunSdEstimate) -> str:
    """The estimate as a finished run of the rerun-sd experiment of `tracking.experiment` (created when missing);
    its id."""
    calibration = dataclasses.replace(tracking, experiment=rerun_sd_experiment(tracking.experiment))
    experiment_id = open_experiment(client, calibration)
    tags = {"device_model": estimate.device_model, "workload": estimate.workload,
            "combination": estimate.combination, "sweep_id": estimate.sweep_id}
    run_id = client.create_run(experiment_id, run_name=f"rerun_sd {estimate.device_model} {estimate.workload}",
                               tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = {"rerun_sd": estimate.rerun_sd, "repeats": float(estimate.repeats)}
    client.log_batch(run_id, metrics=[Metric(name, value, now, 0) for name, value in metrics.items()])
    client.set_terminated(run_id)
    return run_id


def newest_rerun_sd(client: MlflowClient, experiment: str, model: str, workload: str) -> tuple[float, str] | None:
    """The newest estimate stored for jobs of `workload` on a device `model`: its rerun_sd and the source a job
    that uses it tags, `store: <n> repeats of <combination>, <date>`. None when there is none."""
    calibration = client.get_experiment_by_name(rerun_sd_experiment(experiment))
    if calibration is None:
        return None
    runs = client.search_runs([calibration.experiment_id],
                              f"tags.device_model = '{model}' and tags.workload = '{workload}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    made = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).date().isoformat()
    source = f"store: {int(run.data.metrics['repeats'])} repeats of {run.data.tags['combination']}, {made}"
    return run.data.metrics["rerun_sd"], source
