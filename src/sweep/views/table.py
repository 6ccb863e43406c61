"""The one results table: the runs of any number of stores and sweeps, one row each, and what makes two runs the
same measurement (IDENTITY), defined once for every view: the end-of-sweep tables, the sweep's page and chart, the
report, its plots, the compile tables and the machine-vs-machine table."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from sweep.records.results import JobResult, RunStatus
from sweep.store.copy import COPIED_FROM_TAG
from sweep.store.tracking import RESUMED_BY_TAG

# The step a run timed; one report part per workload, in this order.
WORKLOADS = ("prefill", "decode", "train")
# What every view names of a configuration.
CONFIG = ("model", "dtype", "prompt_len", "batch_size", "timing_mode")
COMPILE_OPTIONS = ("compile_mode", "compile_dynamic", "compile_fullgraph", "compile_backend",
                   "compile_undeclared_kernels")  # params of baseline=compile runs only
# The rest of a configuration, rarely varied: the views show them (`details`) only where they vary.
DETAILS = ("reference_dtype", "prompt_text", "forward_path", "attn_implementation", *COMPILE_OPTIONS)
KERNEL = ("kernels", "kernel_identity")  # the subset's name, and which kernel each of its layers ran
CONFIGURATION = ("workload", "baseline", *CONFIG, *DETAILS, *KERNEL)
# The machine: runs whose fingerprints differ in any of these are never compared as if they came from one machine.
FINGERPRINT = (
    "gpu_name", "device_capability", "gpu_memory_gb", "gpu_memory_integrated", "sm_count", "driver_version",
    "cuda_version", "cpu_model", "cpu_arch", "host", "torch_version", "transformers_version", "kernels_version",
    "triton_version", "liger_kernel_version", "sweep_version", "git_commit", "git_dirty",
)
# Two runs of one identity measured the same thing on the same machine: the newest measurement stands for both.
# The timing mode is the one the run asked for (`timing_mode`); one timed eagerly because its CUDA graph could not
# be captured is marked where its speedup is shown (`formatting.timing_marker`).
IDENTITY = (*CONFIGURATION, *FINGERPRINT)
# What a run logged before a param existed: the sweep then measured prefills against eager. Any other column of
# the identity that a run lacks (logged before it was recorded, or ended before its model loaded) is NOT_RECORDED.
DEFAULTS = {"workload": "prefill", "baseline": "eager"}
NOT_RECORDED = ""

NUMERIC_PARAMS = ("prompt_len", "batch_size")
OPTIONAL_METRICS = ("layer_err_ratio_max", "gen_match")
WORKLOAD_METRICS = (
    "tokens_per_s_baseline", "tokens_per_s_kernel", "loss_diff", "grad_max_rel_diff", "grad_err_ratio",
    "peak_mem_mb_baseline", "peak_mem_mb_kernel",
)
METRICS = (
    "latency_ms_baseline", "latency_ms_kernel", "speedup", "speedup_ci_low", "speedup_ci_high",
    "max_abs_diff", "mean_abs_diff", "argmax_match", "ref_err_baseline", "ref_err_kernel", "err_ratio",
    "kernelized_total", *OPTIONAL_METRICS, *WORKLOAD_METRICS,
)
TEXT = ("device", "run_status", "status_reason", "sweep_id", "timing_mode_used", RESUMED_BY_TAG, "run_name")
KERNEL_PARAM_PREFIX = "kernel_"  # kernel_<Layer>: which kernel ran (hub:repo@commit, local:path@hash, ...)


def job_row(job: JobResult) -> dict[str, object]:
    """One job as a row: its tags, params and metrics by bare name, with its name, status, reason, when it ended
    and `kernel_identity`."""
    kernels = sorted((k.removeprefix(KERNEL_PARAM_PREFIX), v) for k, v in job.params.items()
                     if k.startswith(KERNEL_PARAM_PREFIX))
    return {**job.tags, **job.params, **job.metrics, "run_name": job.name, "run_status": job.status.value,
            "status_reason": job.reason, "ended_at": pd.Timestamp(job.ended_ms, unit="ms"),
            "kernel_identity": "; ".join(f"{layer}={identity}" for layer, identity in kernels)}


def results_table(stores: Mapping[str, Mapping[str, JobResult]]) -> pd.DataFrame:
    """Every run of `stores` (a store's uri: its jobs by run id) once, one row each: `job_row` with `run_id` and
    `store`, every column of IDENTITY filled (DEFAULTS, NOT_RECORDED), and the labels the views show: `gpu` (the
    machine), `kernel_label` and `details`. A run read twice (one store given twice, or a copy beside its original,
    tag COPIED_FROM_TAG) is kept once."""
    rows, metrics = [], set(METRICS)
    for store, jobs in stores.items():
        for run_id, job in jobs.items():
            rows.append(job_row(job) | {"run_id": run_id, "store": store})
            metrics |= job.metrics.keys()
    frame = pd.DataFrame(rows)
    known = [*IDENTITY, *TEXT, *METRICS, "run_id", "store", "ended_at"]
    frame = frame.reindex(columns=[*known, *(c for c in frame.columns if c not in known)])
    frame = pd.DataFrame({name: _typed(name, column, name in metrics) for name, column in frame.items()})
    origin = frame[COPIED_FROM_TAG] if COPIED_FROM_TAG in frame else pd.Series(NOT_RECORDED, index=frame.index)
    frame = frame[~origin.where(origin != NOT_RECORDED, frame["run_id"]).duplicated()].reset_index(drop=True)
    return frame.assign(gpu=hardware_labels(frame), kernel_label=kernel_labels(frame), details=detail_labels(frame))


def _typed(name: str, column: pd.Series, is_metric: bool) -> pd.Series:
    if is_metric:
        return column.astype(float)
    if name in NUMERIC_PARAMS:
        return _numeric_if_possible(column)
    if name == "ended_at":
        return column
    return column.astype(object).fillna(NOT_RECORDED).replace(NOT_RECORDED, DEFAULTS.get(name, NOT_RECORDED))


def _numeric_if_possible(column: pd.Series) -> pd.Series:
    """Whole numbers as integers (missing ones <NA>), so that every view prints `128`; text where it is not a
    number."""
    try:
        numbers = pd.to_numeric(column)
    except (ValueError, TypeError):
        return column.astype(object).fillna(NOT_RECORDED)
    whole = numbers.dropna()
    return numbers.astype("Int64") if (whole == whole.round()).all() else numbers


def latest_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per identity: the newest measured one (by `ended_at`), else the newest; `other_runs` counts the
    others. In display order: workloads as WORKLOADS, then configuration, machine, kernels (`none` first)."""
    measured = runs["run_status"] == RunStatus.measured.value
    runs = runs.assign(_measured=measured).sort_values(["_measured", "ended_at"], kind="stable")
    others = runs.groupby(list(IDENTITY), dropna=False, sort=False)["run_id"].transform("size") - 1
    runs = runs.assign(other_runs=others).drop_duplicates(list(IDENTITY), keep="last").drop(columns="_measured")
    rank = {name: index for index, name in enumerate(WORKLOADS)}
    order = runs.assign(_not_none=runs["kernels"] != "none",
                        _workload=runs["workload"].map(lambda w: rank.get(w, len(rank))))
    order = order.sort_values(["_workload", "workload", *CONFIG, "details", "gpu", "_not_none", "kernel_label"],
                              kind="stable")
    return order.drop(columns=["_not_none", "_workload"]).reset_index(drop=True)


def hardware_labels(runs: pd.DataFrame) -> pd.Series:
    """The machine: `gpu_name` (or "cpu"); where one name covers several fingerprints, the differing fields are
    appended."""
    names = runs["gpu_name"].where(runs["gpu_name"] != NOT_RECORDED, "cpu")
    labels = names.copy()
    for name, index in names.groupby(names).groups.items():
        prints = runs.loc[index, list(FINGERPRINT)]
        varying = [c for c in FINGERPRINT if prints[c].nunique() > 1]
        if varying:
            details = prints[varying].apply(lambda r: ", ".join(f"{c}={v}" for c, v in r.items()), axis=1)
            labels.loc[index] = f"{name} (" + details + ")"
    return labels


def kernel_labels(runs: pd.DataFrame) -> pd.Series:
    """The subset's name; where one name covers runs of different kernels, the kernels themselves are added."""
    labels = runs["kernels"].astype(object).copy()
    for _, index in runs.groupby("kernels").groups.items():
        identities = runs.loc[index, "kernel_identity"]
        if identities.nunique() > 1:
            named = identities.replace(NOT_RECORDED, "kernels not recorded")
            labels.loc[index] = runs.loc[index, "kernels"] + " [" + named + "]"
    return labels


def detail_labels(runs: pd.DataFrame) -> pd.Series:
    """Per run, the DETAILS that vary among the runs of its workload and baseline, as `name=value` (`name not
    recorded` where the run lacks it); empty where none vary."""
    labels = pd.Series("", index=runs.index, dtype=object)
    for _, group in runs.groupby(["workload", "baseline"], sort=False):
        varying = [c for c in DETAILS if group[c].nunique() > 1]
        if varying:
            labels.loc[group.index] = group[varying].apply(lambda r: ", ".join(
                f"{c}={v}" if v != NOT_RECORDED else f"{c} not recorded" for c, v in r.items()), axis=1)
    return labels
