"""`timing.rerun_sd` from the store: a sweep with `seed` repeats estimates it for its device model and workload,
later jobs add the newest estimate to their intervals unless the user sets one, and each job tags which it used."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from conftest import REPO_ROOT, local_kernel
from test_cli import child_runs, run_sweep
from test_survive import THIN_MODEL

from sweep.config import DEFAULT_RERUN_SD
from sweep.measure.statistics import SpeedupEstimate, calibrate_rerun_sd, t_quantile
from sweep.store.tracking import RESUMED_BY_TAG, job_result
from sweep.views.repeats import rerun_sd_estimates
from sweep.views.table import results_table

JOB = ["dtype=fp32", "kernels=none", "timing=quick", "timing.ops=false", "prompt.length=16", "numerics.gen_tokens=0",
       "numerics.per_layer=false", *THIN_MODEL]
EXPLICIT = 0.5  # wide enough that its share of an interval shows


def _estimates(client) -> list:
    experiment = client.get_experiment_by_name("kernel-sweep-rerun-sd")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _interval_covers(metrics: dict[str, float], rerun_sd: float) -> bool:
    """The interval is at least as wide as `rerun_sd` alone makes it."""
    half_width = math.log(metrics["speedup_ci_high"] / metrics["speedup_ci_low"]) / 2
    return half_width >= t_quantile(int(metrics["timing_blocks"]) - 1, 0.95) * math.log1p(rerun_sd) * (1 - 1e-9)


def test_seed_repeats_set_the_rerun_sd_of_later_jobs_unless_the_user_sets_it(tmp_path, kernel_repos):
    job = [*JOB, *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm")]
    repeats = run_sweep(tmp_path, "-m", "seed=1,2,3", *job)
    assert repeats.returncode == 0, repeats.stderr[-3000:]
    client, _, first = child_runs(tmp_path)
    assert len(first) == 3
    for run in first:  # the store held no estimate yet
        assert run.data.tags["timing_rerun_sd_source"] == "default"
        assert run.data.metrics["timing_rerun_sd"] == DEFAULT_RERUN_SD
    [stored] = _estimates(client)
    metrics = [run.data.metrics for run in first]
    expected = calibrate_rerun_sd([SpeedupEstimate(m["speedup"], m["speedup_ci_low"], m["speedup_ci_high"])
                                   for m in metrics], int(metrics[0]["timing_blocks"]), 0.95, DEFAULT_RERUN_SD)
    assert stored.data.metrics == {"rerun_sd": pytest.approx(expected), "repeats": 3}
    assert stored.data.tags["device_model"] == first[0].data.tags["cpu_model"]
    assert stored.data.tags["workload"] == "prefill"
    assert stored.data.tags["sweep_id"] == first[0].data.tags["sweep_id"]
    assert f"timing.rerun_sd={expected:.5f} for prefill" in repeats.stdout

    later = run_sweep(tmp_path, "-m", f"timing.rerun_sd=null,{EXPLICIT}", *job)
    assert later.returncode == 0, later.stderr[-3000:]
    _, _, runs = child_runs(tmp_path)
    earlier = {run.info.run_id for run in first}
    new = {run.data.tags["timing_rerun_sd_source"]: run.data.metrics for run in runs if run.info.run_id not in earlier}
    made = datetime.fromtimestamp(stored.info.start_time / 1000, tz=timezone.utc).date().isoformat()
    from_store = new.pop(f"store: 3 repeats of tiny-llama fp32 custom T=16 B=1 baseline=eager, {made}")
    assert from_store["timing_rerun_sd"] == pytest.approx(expected)
    assert _interval_covers(from_store, expected)
    assert new["config"]["timing_rerun_sd"] == EXPLICIT and _interval_covers(new["config"], EXPLICIT)
    assert len(_estimates(client)) == 1  # no repeats in the later sweep: nothing more stored

    # The benchmark reads every job of the store: the later two share the first three's identity, but not their
    # configuration apart from `seed`, so its estimate is theirs again.
    benchmark = subprocess.run([sys.executable, "benchmarks/timing_precision.py", "--store",
                                f"sqlite:///{tmp_path}/mlflow.db"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=300)
    assert benchmark.returncode == 0, benchmark.stderr[-3000:]
    again = _estimates(client)[-1]
    assert again.info.run_id != stored.info.run_id
    assert again.data.metrics == pytest.approx(stored.data.metrics)
    assert f"timing.rerun_sd={expected:.5f} for prefill" in benchmark.stdout

    # Read back for a sweep that resumed them, the same runs are not that sweep's repeats.
    resumed = {run.info.run_id: job_result(run) for run in first}
    for job in resumed.values():
        job.tags[RESUMED_BY_TAG] = "a later sweep"
    assert rerun_sd_estimates(results_table({"store": resumed})) == []
    assert rerun_sd_estimates(results_table({"store": {run.info.run_id: job_result(run) for run in first}}))
