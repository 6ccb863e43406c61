"""Repeated jobs: measured runs of one identity whose configurations differ only in `seed`, and the rerun spread
(`timing.rerun_sd`) they show, one estimate per device model and workload (docs/timing.md)."""

from __future__ import annotations

import pandas as pd

from sweep.config import TimingConfig
from sweep.measure.statistics import SpeedupEstimate, calibrate_rerun_sd
from sweep.records.results import RunStatus
from sweep.store.calibration import REPEAT_TAG, RerunSdEstimate, device_model
from sweep.store.tracking import RESUMED_BY_TAG
from sweep.views.table import IDENTITY, NOT_RECORDED

MIN_REPEATS = 3  # calibrate_rerun_sd's least


def rerun_sd_estimates(runs: pd.DataFrame) -> list[RerunSdEstimate]:
    """From `runs` (a `results_table`), each group of MIN_REPEATS or more measured runs (not read back for a sweep
    that resumed them) of one identity and one `repeat_hash`: its `calibrate_rerun_sd`. Per device model and
    workload, the largest of its groups'."""
    # Missing on runs logged before they were: no repeat hash (grouped by identity alone), the default confidence,
    # no rerun_sd in their intervals.
    defaults = {REPEAT_TAG: NOT_RECORDED, "timing_confidence": TimingConfig.confidence, "timing_rerun_sd": 0.0}
    missing = [c for c in (*defaults, "timing_blocks") if c not in runs]
    runs = runs.reindex(columns=[*runs.columns, *missing]).fillna(defaults)
    timed = runs[(runs["run_status"] == RunStatus.measured.value) & (runs[RESUMED_BY_TAG] == NOT_RECORDED)
                 & runs[["speedup", "speedup_ci_low", "speedup_ci_high", "timing_blocks"]].notna().all(axis=1)]
    largest: dict[tuple[str, str], RerunSdEstimate] = {}
    for _, group in timed.groupby([*IDENTITY, REPEAT_TAG], dropna=False):
        if len(group) < MIN_REPEATS:
            continue
        first = group.iloc[0]
        speedups = [SpeedupEstimate(*row) for row in group[["speedup", "speedup_ci_low", "speedup_ci_high"]].values]
        estimate = RerunSdEstimate(
            device_model=device_model(first.to_dict()),
            workload=first["workload"],
            rerun_sd=calibrate_rerun_sd(speedups, int(first["timing_blocks"]), first["timing_confidence"],
                                        first["timing_rerun_sd"]),
            repeats=len(group),
            combination=f"{first['model']} {first['dtype']} {first['kernel_label']} T={first['prompt_len']} "
                        f"B={first['batch_size']} baseline={first['baseline']}",
            sweep_id=first["sweep_id"] if group["sweep_id"].nunique() == 1 else "",
        )
        key = (estimate.device_model, estimate.workload)
        if key not in largest or estimate.rerun_sd > largest[key].rerun_sd:
            largest[key] = estimate
    return list(largest.values())


def estimate_note(estimate: RerunSdEstimate) -> str:
    """What a sweep (or benchmarks/timing_precision.py) prints of an estimate it stores."""
    return (f"timing.rerun_sd={estimate.rerun_sd:.5f} for {estimate.workload} on {estimate.device_model}, from "
            f"{estimate.repeats} repeats of {estimate.combination}: stored for later sweeps")
