"""`python -m sweep` end to end: Hydra multirun, the real kernels path, a real sqlite MLflow store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, local_kernel
from kernel_repos import EXACT_RMSNORM, write_kernel_repo
from mlflow.tracking import MlflowClient
from test_survive import THIN_MODEL

from sweep.views.report import load_runs, run_table
from sweep.views.table import latest_runs

CONTRACT_PARAMS = {"model", "dtype", "kernels", "prompt_len", "batch_size", "device", "timing_mode", "workload"}
CONTRACT_METRICS = {
    "latency_ms_baseline", "latency_ms_kernel", "speedup", "speedup_ci_low", "speedup_ci_high", "max_abs_diff",
    "mean_abs_diff", "argmax_match", "ref_err_baseline", "ref_err_kernel", "err_ratio", "kernelized_total",
}
CONTRACT_TAGS = {"gpu_name", "device_capability", "torch_version", "transformers_version", "kernels_version",
                 "run_status", "status_reason"}


def run_sweep(tmp_path: Path, *args: str, instrumentation: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m sweep *args` on the test's store; `instrumentation`: Python run first, in the same process."""
    sweep = ["-m", "sweep"]
    if instrumentation:
        script = tmp_path / "instrumented.py"
        script.write_text(instrumentation + 'sys.argv[0] = "sweep"\nfrom sweep.__main__ import main\nmain()\n')
        sweep = [str(script)]
    command = [sys.executable, *sweep, *args, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
               f"tracking.artifact_root={tmp_path}/artifacts", f"hydra.sweep.dir={tmp_path}/hydra",
               f"hydra.run.dir={tmp_path}/hydra"]
    env = os.environ | {"COLUMNS": "200"}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)


def child_runs(tmp_path: Path) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("kernel-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep_role") == "job"]
    return client, parents, children


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU skip path")
def test_mission_command_on_cpu_skips_the_cuda_kernels_and_logs_why(tmp_path):
    done = run_sweep(tmp_path, "-m", "dtype=bf16,fp32", "kernels=rms,silu,both", "timing=quick")
    assert done.returncode == 0, done.stderr[-3000:]
    client, parents, children = child_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 6
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["run_status"] == "skipped"
        assert "cpu" in run.data.tags["status_reason"]
        assert run.data.tags["gpu_name"] == "cpu"
        assert CONTRACT_PARAMS <= set(run.data.params)
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(f"{d} {k}" for d in ("bf16", "fp32") for k in ("rms", "silu", "both"))  # what differs
    assert "6 skipped" in done.stdout


def test_mission_sweep_with_cpu_kernels_logs_the_contract(tmp_path, cpu_kernel_configs):
    started = time.monotonic()
    done = run_sweep(tmp_path, "--config-dir", str(cpu_kernel_configs), "-m", "dtype=bf16,fp32",
                     "kernels=rms_cpu,silu_cpu,both_cpu", "timing=quick", "prompt.length=40")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    client, parents, children = child_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 6
    # The sweep's start-up on the parent run: seconds from process start to each milestone, in order.
    metrics = parents[0].data.metrics
    milestones = [metrics[f"startup_s_{name}"] for name in ("imports", "config", "store", "first_job", "table")]
    assert 0 < milestones[0] and milestones == sorted(milestones) and milestones[-1] < elapsed, metrics
    assert milestones[-1] - milestones[2] == pytest.approx(metrics["wall_s"], abs=1.0)  # the session's own clock
    assert "startup_s_cuda" not in metrics  # no CUDA device here: nothing started in the background
    for run in children:
        assert run.data.tags["run_status"] == "measured", run.data.tags["status_reason"]
        assert CONTRACT_PARAMS <= set(run.data.params)
        assert CONTRACT_METRICS <= set(run.data.metrics)
        assert CONTRACT_TAGS <= set(run.data.tags)
        kernels = run.data.params["kernels"]
        expected = {"rms_cpu": 9, "silu_cpu": 4, "both_cpu": 13}[kernels]
        assert run.data.metrics["kernelized_total"] == expected
        assert run.data.tags["kernel_source_RMSNorm" if kernels != "silu_cpu" else "kernel_source_SiLU"].startswith(
            "local:")
        if kernels == "silu_cpu":  # exact re-implementation
            assert run.data.metrics["max_abs_diff"] == 0.0
        if kernels != "silu_cpu" and run.data.params["dtype"] == "bf16":  # different arithmetic
            assert run.data.metrics["max_abs_diff"] > 0 and run.data.metrics["err_ratio"] > 1
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts
    assert "bf16  │ both_cpu" in done.stdout  # the summary table
    assert "6 measured, 0 skipped, 0 failed" in done.stdout


def test_workload_axis_logs_every_job_and_prints_one_table_per_workload(tmp_path, cpu_kernel_configs):
    small = ["model.architecture.hidden_size=256", "model.architecture.intermediate_size=512",
             "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=4"]
    done = run_sweep(tmp_path, "--config-dir", str(cpu_kernel_configs), "-m", "workload=prefill,decode,train",
                     "kernels=both_cpu", "dtype=fp32", "timing=quick", "prompt.length=40", "numerics.gen_tokens=4",
                     *small)
    assert done.returncode == 0, done.stderr[-3000:]
    _, _, children = child_runs(tmp_path)
    by_workload = {r.data.params["workload"]: r for r in children}
    assert set(by_workload) == {"prefill", "decode", "train"}
    assert all(r.data.tags["run_status"] == "measured" for r in children), [r.data.tags for r in children]
    assert {"tokens_per_s_baseline", "tokens_per_s_kernel", "err_ratio"} <= set(by_workload["decode"].data.metrics)
    assert {"loss_diff", "grad_max_rel_diff", "grad_err_ratio"} <= set(by_workload["train"].data.metrics)
    assert by_workload["train"].info.run_name == "train"  # what varies between the jobs
    for workload in ("prefill", "decode", "train"):
        assert f"s): {workload}" in done.stdout  # a summary table per workload
    assert "grad_err_ratio" in done.stdout and "3 measured, 0 skipped, 0 failed" in done.stdout


def test_a_failing_combination_does_not_stop_the_sweep_but_fails_the_exit_code(tmp_path, cpu_kernel_configs):
    done = run_sweep(tmp_path, "--config-dir", str(cpu_kernel_configs), "-m", "dtype=fp32",
                     "kernels=rms_cpu", "timing=quick", "prompt.length=9000,40")
    assert done.returncode == 1
    _, parents, children = child_runs(tmp_path)
    [parent] = parents
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["jobs_failed"] == 1 and parent.data.metrics["jobs_measured"] == 1
    assert all(r.info.status == ("FAILED" if r.data.tags["run_status"] == "failed" else "FINISHED")
               for r in children)
    statuses = {r.data.params["prompt_len"]: r.data.tags["run_status"] for r in children}
    assert statuses == {"9000": "failed", "40": "measured"}
    failed = next(r for r in children if r.data.params["prompt_len"] == "9000")
    assert "exceeds the model's 8192 positions" in failed.data.tags["status_reason"]


@pytest.mark.parametrize(
    ("override", "message"),
    [("prompt.lenght=5", "lenght"), pytest.param("dtype=bf17", "bf16", marks=pytest.mark.slow),
     pytest.param("timing.budget_s=narrow", "budget_s", marks=pytest.mark.slow),
     ("kernels.RMSNorm.pathh=/x", "pathh"), pytest.param("kernels.source=bundle", "kernels.source='bundle'",
                                                          marks=pytest.mark.slow),
     ("-m kernels.source=auto,bundle", "kernels.source='bundle'")],  # the slow tier has the rest: one start each
)
def test_config_typos_fail_at_start_up(tmp_path, override, message):
    done = run_sweep(tmp_path, *override.split())
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server_stops_the_sweep_at_once(tmp_path):
    command = [sys.executable, "-m", "sweep", "tracking.uri=http://127.0.0.1:9", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot reach MLflow server http://127.0.0.1:9" in done.stderr + done.stdout


# Instrumentation run before `python -m sweep` (`run_sweep`'s `instrumentation`); each reports on stderr at exit.
COUNT_COMPOSITIONS = """
import atexit, sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
compose, calls = ConfigLoaderImpl.load_sweep_config, []
def counted(self, *args, **kwargs):
    calls.append(kwargs.get("sweep_overrides", args[1] if len(args) > 1 else None))
    return compose(self, *args, **kwargs)
ConfigLoaderImpl.load_sweep_config = counted
def report():
    from sweep.run.session import _composed_for_launch
    print(f"compositions: {len(calls)}, left untaken: {len(_composed_for_launch)}", file=sys.stderr)
atexit.register(report)
"""


COUNT_COLLECTED = """
import atexit, gc, sys
collect, scanned, frozen = gc.collect, [], [0]
def counted(*args, **kwargs):
    scanned.append(len(gc.get_objects()))  # what a collection scans: the tracked objects not frozen
    frozen.append(gc.get_freeze_count())  # read here: sweep unfreezes them at exit
    return collect(*args, **kwargs)
gc.collect = counted
atexit.register(lambda: print(f"collections: {len(scanned)}, most scanned: {max(scanned, default=0)}, "
                              f"frozen: {max(frozen)}", file=sys.stderr))
"""


RECORD_DRAWS = """
import atexit, sys, threading, torch
from transformers import AutoModelForCausalLM
build, draws = AutoModelForCausalLM.from_config, []
def recorded(config, **kwargs):
    if kwargs.get("dtype") == torch.float32 and str(torch.get_default_device()) != "meta":
        draws.append(threading.current_thread().name)
    return build(config, **kwargs)
AutoModelForCausalLM.from_config = recorded
atexit.register(lambda: print(f"float32 draws: {draws}", file=sys.stderr))
"""


def _run_instrumented(tmp_path: Path, script_text: str, *overrides: str) -> subprocess.CompletedProcess:
    """The 4-job multirun `dtype=bf16,fp32 kernels=rms,silu`, run in-process after `script_text`."""
    done = run_sweep(tmp_path, "-m", "dtype=bf16,fp32", "kernels=rms,silu", "timing=quick", *overrides,
                     instrumentation=script_text)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    _, _, children = child_runs(tmp_path)
    ran = sorted((run.data.params["dtype"], run.data.params["kernels"]) for run in children)
    assert ran == [("bf16", "rms"), ("bf16", "silu"), ("fp32", "rms"), ("fp32", "silu")]
    return done


def test_a_multirun_composes_each_job_once(tmp_path):
    """In sweep's check of every job before any runs; the launch takes that configuration. Hydra's basic sweeper and
    launcher would compose every job twice more (`validate_batch_is_legal`, then the launch), 0.1 to 0.25 s a job."""
    done = _run_instrumented(tmp_path, COUNT_COMPOSITIONS)
    assert "compositions: 4, left untaken: 0" in done.stderr, done.stderr[-2000:]


def test_under_another_sweeper_no_composed_configuration_waits_for_a_launch(tmp_path):
    """Hydra's own basic sweeper composes each job itself: the check's configurations are not kept for it."""
    done = _run_instrumented(tmp_path, COUNT_COMPOSITIONS, "hydra/sweeper=basic")
    assert "compositions: 12, left untaken: 0" in done.stderr, done.stderr[-2000:]


def test_each_jobs_garbage_collection_scans_only_what_jobs_made(tmp_path):
    """Each job ends with a full collection. Start-up's objects (torch, transformers, MLflow: over 100,000) are
    frozen before the first job, so a job's collection scans a small part of them (it took 0.25 to 0.35 s a job)."""
    done = _run_instrumented(tmp_path, COUNT_COLLECTED)
    report = re.search(r"collections: (\d+), most scanned: (\d+), frozen: (\d+)", done.stderr)
    assert report, done.stderr[-2000:]
    collections, most_scanned, frozen = map(int, report.groups())
    assert collections >= 4
    assert frozen > 100_000
    assert most_scanned < frozen // 4


def test_repeats_and_kernel_subsets_of_one_shape_run_back_to_back(tmp_path):
    """Whatever the command line's order, `seed` and `kernels` vary fastest: Hydra's basic sweeper would alternate
    the prompt lengths here, each job then timed right after another length's."""
    done = run_sweep(tmp_path, "-m", "seed=1,2", "kernels=rms,silu", "prompt.length=16,24", "timing=quick")
    assert done.returncode in (0, 1), done.stderr[-3000:]
    _, _, children = child_runs(tmp_path)
    ran = [(run.data.params["prompt_len"], run.data.params["kernels"])
           for run in sorted(children, key=lambda run: run.info.start_time)]
    assert ran == [("16", "rms"), ("16", "silu")] * 2 + [("24", "rms"), ("24", "silu")] * 2


def test_the_first_model_is_drawn_while_the_store_opens_and_once_for_both_dtypes(tmp_path):
    """tiny-llama's float32 weights are drawn on the host in a thread started once the jobs are checked, while the
    store opens; the fp32 jobs cast a copy of the same draw."""
    done = _run_instrumented(tmp_path, RECORD_DRAWS)
    assert "float32 draws: ['sweep-model-draw']" in done.stderr, done.stderr[-2000:]
    _, parents, _ = child_runs(tmp_path)
    assert parents[0].data.metrics["startup_s_model_draw"] > 0


def test_a_job_that_does_not_compose_still_refuses_the_sweep(tmp_path):
    """Hydra's own check is skipped; sweep's refuses a sweep with a job Hydra cannot compose, before any run."""
    done = run_sweep(tmp_path, "-m", "dtype=bf16,fp99", "timing=quick")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "fp99" in done.stderr
    assert not (tmp_path / "mlflow.db").exists() or not child_runs(tmp_path)[2]


def test_resume_measures_an_edited_kernel_again_and_tables_a_resumed_job_with_its_numbers(tmp_path):
    """The resume key holds the kernel as it resolved (the hash of a local kernel's files, a Hub commit): a kernel
    edited at the same path is measured again. A job resumed unchanged shows its stored result, marked resumed."""
    kernel = write_kernel_repo(tmp_path, "edited_rms", "ExactRMSNorm", EXACT_RMSNORM)
    job = ["dtype=fp32", "kernels=none", *local_kernel("RMSNorm", kernel, "ExactRMSNorm"), "timing=quick",
           "prompt.length=16", "numerics.gen_tokens=2", "numerics.per_layer=false", *THIN_MODEL]
    first = run_sweep(tmp_path, *job)
    source = kernel / "build" / "torch-cpu" / "__init__.py"
    source.write_text(source.read_text() + "# edited: the same path, other files\n")
    edited = run_sweep(tmp_path, *job)
    unchanged = run_sweep(tmp_path, *job)
    for done in (first, edited, unchanged):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, parents, children = child_runs(tmp_path)
    parents, children = (sorted(runs, key=lambda run: run.info.start_time) for runs in (parents, children))
    assert "already measured" not in edited.stdout
    assert [run.data.tags["run_status"] for run in children] == ["measured", "measured"]
    assert [run.data.tags["sweep_id"] for run in children] == [parents[0].info.run_id, parents[1].info.run_id]
    before, after = (run.data.params["kernel_RMSNorm"] for run in children)
    assert before.startswith(f"local:{kernel}@") and after.startswith(f"local:{kernel}@") and before != after

    assert f"already measured in run {children[1].info.run_id}" in unchanged.stdout
    assert parents[2].data.metrics["jobs_resumed"] == 1 and parents[2].data.metrics["jobs_measured"] == 0
    assert "0 measured, 0 skipped, 0 failed, 0 killed, 1 resumed" in unchanged.stdout
    speedup = f"{children[1].data.metrics['speedup']:.3f}x ["
    [row] = [line for line in unchanged.stdout.splitlines() if "│ custom" in line and speedup in line]
    assert row.rstrip(" │").endswith("resumed"), unchanged.stdout[-3000:]
    assert "| resumed |" in parents[2].data.tags["mlflow.note.content"]  # the sweep's page
    runs = load_runs([f"sqlite:///{tmp_path}/mlflow.db"], "kernel-sweep", [parents[2].info.run_id])
    assert list(runs["run_id"]) == [children[1].info.run_id]  # the report on the resuming sweep
    assert list(run_table(latest_runs(runs))["status"]) == ["resumed"]


# The first model's draw outlasts the rest of a sweep with nothing to do, as a slower host's or a larger model's does;
# reports the start-up threads still alive when the interpreter starts to finalize.
SLOW_DRAW = """
import atexit, sys, threading, time
from transformers import AutoModelForCausalLM
build = AutoModelForCausalLM.from_config
def slow(config, **kwargs):
    time.sleep(4)
    return build(config, **kwargs)
AutoModelForCausalLM.from_config = slow
atexit.register(lambda: print("start-up threads alive at exit:",
                              [t.name for t in threading.enumerate() if t.name.startswith("sweep-")], file=sys.stderr))
"""


def rerun_a_finished_sweep(tmp_path: Path, *job: str) -> None:
    """Runs the one-job sweep `job` twice on one store, the second time with nothing to do (its job resumed). Each
    exits 0 with the ways into the UI as its last lines: the store's command, the sweep's page, every machine's
    runs. The second waits for the start-up threads (CUDA, the model's draw) that no job waited for: the
    interpreter would abandon them, and one abandoned inside torch aborts the process (`terminate called without an
    active exception`, exit 134). The objects frozen for the jobs' collections do not outlive Triton's module (from
    Triton 3.9, nanobind's leak report after the last line)."""
    first = run_sweep(tmp_path, *job)
    again = run_sweep(tmp_path, *job, instrumentation=SLOW_DRAW)
    assert "0 measured, 0 skipped, 0 failed, 0 killed, 1 resumed" in again.stdout, again.stdout[-3000:]
    assert "start-up threads alive at exit: []" in again.stderr, again.stderr[-3000:]
    for done in (first, again):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "terminate called" not in done.stderr and "nanobind" not in done.stderr, done.stderr[-3000:]
        last = done.stdout.splitlines()[-3:]
        assert last[0].startswith("browse the runs: mlflow ui") and last[1].startswith("this sweep's page: "), last
        assert last[2] == ("every machine's runs side by side: http://127.0.0.1:5000/#/experiments/1/runs?"
                           "viewStateShareKey=sweep-machines&workflowType=machine_learning"), last


def test_a_rerun_of_a_finished_sweep_ends_with_the_way_into_the_ui(tmp_path):
    rerun_a_finished_sweep(tmp_path, "device=cpu", "dtype=fp32", "kernels=none", "timing=quick", "prompt.length=16",
                           "numerics.gen_tokens=2")
