"""The end of a sweep reads its jobs back from the MLflow store: terminal tables, the parent run's description and
artifacts; child run names and one-line descriptions. Real sqlite stores, a real second process, the real CLI."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
from conftest import REPO_ROOT
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from rich.console import Console
from test_cli import child_runs, run_sweep

from sweep.config import TrackingConfig
from sweep.records.results import JobResult, RunStatus
from sweep.run.session import SweepSession
from sweep.store.tracking import DESCRIPTION_LIMIT, Tracker
from sweep.views.summary import job_description, sweep_tables
from sweep.views.sweep_page import CHART, RESULTS_CSV, Links, report_files, sweep_page
from sweep.views.table import results_table

# A job logged by another process, as a local worker or a Slurm task would: the session never sees its result.
LOG_JOB_ELSEWHERE = textwrap.dedent("""
    import sys
    from sweep.config import TrackingConfig
    from sweep.records.results import JobResult
    from sweep.store.tracking import Tracker
    from sweep.views.summary import job_description

    uri, artifacts, sweep_id = sys.argv[1:]
    result = JobResult(
        name="fp16 rms T=4096",
        params={"model": "tiny-llama", "dtype": "fp16", "kernels": "rms", "prompt_len": "4096", "batch_size": "1",
                "device": "auto", "timing_mode": "auto"},
        metrics={"latency_ms_baseline": 2.5, "latency_ms_kernel": 2.0, "speedup": 1.25, "speedup_ci_low": 1.2,
                 "speedup_ci_high": 1.3, "speedup_significant": 1.0, "max_abs_diff": 0.0625, "argmax_match": 1.0,
                 "err_ratio": 1.004},
        tags={"gpu_name": "cpu"})
    Tracker(TrackingConfig(uri=uri, artifact_root=artifacts), describe=job_description).log_job(sweep_id, result)
""")


def test_the_end_of_sweep_tables_and_the_parent_run_come_from_the_store(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    out = io.StringIO()
    session = SweepSession(tracking, name="dtype=fp16 prompt.length=4096", total_jobs=1,
                           console=Console(file=out, width=250))
    logged = subprocess.run([sys.executable, "-c", LOG_JOB_ELSEWHERE, tracking.uri, tracking.artifact_root,
                             session.sweep_id], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr[-3000:]
    assert session.results == []  # nothing in this process's memory

    session.close()

    printed = out.getvalue()
    assert "1.250x [1.200, 1.300]" in printed and "4096" in printed
    assert "1 measured, 0 skipped, 0 failed" in printed
    client = MlflowClient(tracking_uri=tracking.uri)
    parent = client.get_run(session.sweep_id)
    assert parent.data.metrics["jobs_measured"] == 1
    description = parent.data.tags[MLFLOW_RUN_NOTE]
    (child,) = client.search_runs([parent.info.experiment_id], "tags.sweep_role = 'job'")
    row = next(line for line in description.splitlines() if "1.250x [1.200, 1.300]" in line)
    assert f"[fp16 rms T=4096](#/experiments/{parent.info.experiment_id}/runs/{child.info.run_id}" in row
    assert "| 0.0625 |" in row and "| 1.004 |" in row
    assert f"get-artifact?path=summary%2Fspeedup.png&run_uuid={session.sweep_id}" in description
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / CHART).read_bytes().startswith(b"\x89PNG")
    results = pd.read_csv(artifacts / RESULTS_CSV)
    assert results.loc[0, "run_id"] == child.info.run_id and results.loc[0, "speedup"] == 1.25
    report = (artifacts / "report" / "report.md").read_text()
    assert "# Kernel sweep report" in report and "1.25x [1.20, 1.30]" in report
    assert child.data.tags[MLFLOW_RUN_NOTE] == \
        "speedup 1.250x [1.200, 1.300], max diff 0.0625, err_ratio 1.004, measured"


def test_a_long_sweep_description_is_cut_to_what_mlflow_accepts(tmp_path):
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "a")),
                      describe=job_description)
    sweep_id = tracker.start_sweep("long", tags={})
    jobs = {f"run{i:03d}": JobResult(
        name=f"bf16 rms T={i}", status=RunStatus.skipped, reason="no build of the kernel for cpu " * 3,
        params={"model": "tiny-llama", "dtype": "bf16", "kernels": "rms", "prompt_len": str(i), "batch_size": "1",
                "device": "auto", "timing_mode": "auto"}) for i in range(120)}
    page = sweep_page(sweep_id, results_table({tracker.uri: jobs}), "long",
                      Links(tracker.run_link, tracker.artifact_link), DESCRIPTION_LIMIT, {})
    assert len(page.description) <= DESCRIPTION_LIMIT
    assert "of 120 jobs fit here" in page.description and RESULTS_CSV in page.description
    assert "120 jobs: 0 measured, 120 skipped, 0 failed" in page.description
    tracker.describe_sweep(sweep_id, page.description, page.artifacts)  # MLflow accepts it
    assert len(pd.read_csv(io.StringIO(page.artifacts[RESULTS_CSV]))) == 120


def test_child_run_names_say_what_differs_between_jobs(tmp_path):
    done = run_sweep(tmp_path, "-m", "dtype=fp32", "kernels=none", "timing=quick", "prompt.length=8",
                     "numerics.gen_tokens=0", "timing.mode=eager,auto")
    assert done.returncode == 0, done.stderr[-3000:]
    _, _, children = child_runs(tmp_path)
    assert sorted(r.info.run_name for r in children) == ["timing.mode=auto", "timing.mode=eager"]
    for run in children:  # the baseline alone: nothing to compare
        note = run.data.tags[MLFLOW_RUN_NOTE]
        assert note == f"baseline {run.data.metrics['latency_ms_baseline']:.4f} ms, measured"
    assert "browse the runs: mlflow ui --backend-store-uri sqlite:///" in done.stdout
    assert "this sweep's page: http://127.0.0.1:5000/#/experiments/1/runs/" in done.stdout


def _timed_job(kernels: str, gpu: str, timing_mode_used: str, speedup: float, baseline: str = "eager") -> JobResult:
    """A measured job of timing.mode=auto, by ratio name: its value and 95% interval."""
    ratios = {"speedup": speedup} | ({"compile_speedup": 1.20} if baseline == "compile" else {})
    metrics = {"latency_ms_baseline": 2.0, "latency_ms_kernel": 2.0 / speedup, "speedup_significant": 1.0}
    for name, value in ratios.items():
        metrics |= {name: value, f"{name}_ci_low": value - 0.01, f"{name}_ci_high": value + 0.01}
    return JobResult(
        name=f"bf16 {kernels} baseline={baseline} on {gpu}",
        params={"model": "tiny-llama", "dtype": "bf16", "kernels": kernels, "prompt_len": "128", "batch_size": "1",
                "device": "auto", "timing_mode": "auto", "workload": "prefill", "baseline": baseline},
        metrics=metrics, tags={"gpu_name": gpu, "timing_mode_used": timing_mode_used})


def test_a_speedup_not_timed_as_its_job_asked_is_marked_in_every_view(tmp_path):
    """timing.mode=auto times with CUDA graphs on a GPU and eagerly on the CPU: only the GPU jobs whose graphs could
    not be captured, timed eagerly, are marked, in the terminal's tables, on the sweep's page and in its report."""
    gpu = "NVIDIA H100 80GB HBM3"
    jobs = [_timed_job("rms", gpu, "graph", 1.30), _timed_job("silu", gpu, "eager", 1.10),
            _timed_job("both", "cpu", "eager", 1.05), _timed_job("rms", gpu, "eager", 1.15, baseline="compile")]
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "a")),
                      describe=job_description)
    sweep_id = tracker.start_sweep("auto", tags={})
    logged = results_table({tracker.uri: {tracker.log_job(sweep_id, job): job for job in jobs}})
    console = Console(file=io.StringIO(), width=400)
    for table in sweep_tables(logged, "auto"):
        console.print(table)
    page = sweep_page(sweep_id, logged, "auto", Links(tracker.run_link, tracker.artifact_link), DESCRIPTION_LIMIT,
                      report_files(tracker.uri, tracker.experiment, sweep_id))
    views = {"terminal": console.file.getvalue(), "sweep page": page.description,
             "report": page.artifacts["report/report.md"].decode()}

    def speedup(value: float) -> str:  # a speedup with its interval, in the 2 or 3 digits of the view
        low, high = (re.escape(f"{v:.2f}") + r"\d?" for v in (value - 0.01, value + 0.01))
        return re.escape(f"{value:.2f}") + r"\d?x \[" + low + ", " + high + r"\]"

    for view, text in views.items():
        for marked in (1.10, 1.15, 1.20):  # the fallback job, and the compile run's ratios
            assert re.search(speedup(marked) + re.escape(" (eager)"), text), (view, marked)
        for unmarked in (1.30, 1.05):  # graphs on the GPU; eager as planned on the CPU
            assert re.search(speedup(unmarked), text) and not re.search(speedup(unmarked) + " [(]", text), \
                (view, unmarked)
