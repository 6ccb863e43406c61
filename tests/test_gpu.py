"""On a CUDA machine: the bundled kernels through the real kernels path, graph timing, and the metrics it adds."""

from __future__ import annotations

import csv
import io
import math
import platform

import pytest
import torch
from conftest import SHORT_PROMPT, gpu, load_bundled_silu, local_kernel
from kernel_repos import EXACT_RMSNORM, write_kernel_repo
from test_cli import rerun_a_finished_sweep
from test_ops import PASS_THROUGH_FUNCTION

from sweep.config import kernel_selection
from sweep.measure.kernelization import KernelSwitch, resolve_kernel
from sweep.measure.models import ModelCache
from sweep.measure.numerics import forward_logits
from sweep.measure.timing import GraphPlacement, GraphRunner
from sweep.records.results import RunStatus
from sweep.run.job import run_job
from sweep.views.summary import job_description

pytestmark = [pytest.mark.gpu, gpu]


def test_bundled_kernels_replace_every_layer_and_time_in_both_modes(make_config, models):
    result = run_job(make_config("dtype=bf16", "kernels=both", "kernels.source=bundled", "timing=quick",
                                 "timing.mode=both"), models)
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["kernelized_RMSNorm"] == 9 and result.metrics["kernelized_SiLU"] == 4
    assert result.tags["kernel_source_RMSNorm"] == "bundled:liger_rmsnorm"
    assert result.tags["kernel_source_SiLU"] == "bundled:triton_silu"
    for metric in ("gpu_ms_baseline", "gpu_ms_kernel", "eager_ms_baseline", "eager_ms_kernel", "launch_overhead",
                   "peak_mem_mb_baseline", "peak_mem_mb_kernel",
                   "timing_rounds", "job_wall_s", "layer_err_ratio_max", "gen_match", "kl_div"):
        assert metric in result.metrics, metric
    assert result.metrics["latency_ms_baseline"] == result.metrics["gpu_ms_baseline"]
    assert result.metrics["launch_overhead"] > 1.0  # a 67M model is launch bound in eager mode
    assert "timing_note" not in result.tags


def test_graph_replay_reads_its_static_input(make_config, models):
    cfg = make_config("dtype=bf16", "kernels=none")
    model = models.get(cfg.model, torch.bfloat16, torch.device("cuda")).model
    inputs = [torch.randint(0, 256, (1, 64), device="cuda") for _ in range(2)]
    runner = GraphRunner(lambda ids: forward_logits(model, ids), inputs, side="baseline")  # checked against eager
    runner.prepare(1)
    runner.run()
    assert torch.equal(runner.static_output, forward_logits(model, inputs[1]))
    assert not torch.equal(runner.static_output, forward_logits(model, inputs[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bundled_silu_backward_matches_torch(dtype):
    silu = load_bundled_silu()
    x = (torch.randn(5, 3000, device="cuda") * 4).to(dtype).requires_grad_(True)
    upstream = torch.randn(5, 3000, device="cuda").to(dtype)
    (kernel_grad,) = torch.autograd.grad(silu(x), x, upstream)
    (torch_grad,) = torch.autograd.grad(torch.nn.functional.silu(x), x, upstream)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(kernel_grad, torch_grad, **tolerance)


def test_bundled_kernels_in_decode_and_train(make_config, models):
    for workload in ("decode", "train"):
        result = run_job(make_config("dtype=bf16", "kernels=both", "kernels.source=bundled", "timing=quick",
                                     f"workload={workload}", "prompt.length=512", "prompt.batch_size=2"), models)
        assert result.status == RunStatus.measured, result.reason
        assert result.metrics["kernelized_RMSNorm"] == 9 and result.metrics["kernelized_SiLU"] == 4
        assert result.tags["timing_mode_used"] == "graph" and "timing_note" not in result.tags
        assert "graph_replay_rel_err" in result.metrics
        if workload == "decode":
            assert result.metrics["tokens_per_s_kernel"] > 0 and result.metrics["err_ratio"] < 2
        else:
            assert result.metrics["peak_mem_mb_baseline"] > 0 and result.metrics["peak_mem_mb_kernel"] > 0
            assert result.metrics["grad_err_ratio"] < 2 and "reference_note" not in result.tags


def test_train_per_layer_reference_is_not_what_ligers_in_place_backward_left(make_config, models, kernel_repos):
    """Liger's RMSNorm backward writes dX into dY (in_place=True). Each module's float64 reference backward runs
    on the upstream gradient eager had, so eager's per-layer errors are those of a job whose exact RMSNorm kernel
    leaves dY alone: they do not depend on the kernel."""
    eager_errors = {}
    for name, kernel in (("liger", ["kernels=rms", "kernels.source=bundled"]),
                         ("exact", ["kernels=none", *local_kernel("RMSNorm", kernel_repos["cuda_only"],
                                                                  "ExactRMSNorm")])):
        result = run_job(make_config("dtype=bf16", *kernel, "timing=quick", "workload=train", "prompt.length=128",
                                     "numerics.gen_tokens=4"), models)
        assert result.status == RunStatus.measured, result.reason
        rows = list(csv.DictReader(io.StringIO(result.artifacts["layers/layers.csv"])))
        assert len(rows) == 9
        eager_errors[name] = [(float(row["eager_grad_err"]), float(row["eager_weight_grad_err"])) for row in rows]
        assert math.isfinite(result.metrics["layer_grad_err_ratio_max"])
        assert math.isfinite(result.metrics["layer_weight_grad_err_ratio_max"])
    for liger, exact in zip(eager_errors["liger"], eager_errors["exact"], strict=True):
        assert liger == pytest.approx(exact, rel=1e-3)


def test_a_compiled_forward_is_captured_in_a_cuda_graph(make_config, models):
    """baseline=compile times the compiled model in an outer CUDA graph (mode default): the replay reads its
    static input and matches the compiled forward."""
    cfg = make_config("dtype=bf16", "kernels=none")
    model = models.get(cfg.model, torch.bfloat16, torch.device("cuda")).model
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: model(input_ids=ids).logits, dynamic=False)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(ids)

    inputs = [torch.randint(0, 256, (1, 64), device="cuda") for _ in range(2)]
    runner = GraphRunner(forward, inputs, side="compiled")  # warm-up compiles, then capture, then the replay check
    runner.prepare(1)
    runner.run()
    torch.testing.assert_close(runner.static_output, forward(inputs[1]), rtol=1e-2, atol=1e-2)
    assert runner.replay_error < 1e-2
    torch._dynamo.reset()


@pytest.mark.parametrize("undeclared", ["skip", "compile"])
def test_compile_baseline_job_times_every_side_with_graphs(make_config, models, undeclared):
    """Liger's RMSNorm declares no compile support: its compiled side is skipped, or compiled anyway on request."""
    result = run_job(make_config("dtype=bf16", "kernels=rms", "kernels.source=bundled", "timing=quick",
                                 "baseline=compile", f"baseline.undeclared_kernels={undeclared}",
                                 "numerics.gen_tokens=4"), models)
    assert result.status == RunStatus.measured, result.reason
    assert result.tags["timing_mode_used"] == "graph" and "timing_note" not in result.tags
    compared = ["speedup", "compile_speedup", "kernel_vs_compile"]
    compared += ["compiled_kernel_speedup", "compiled_kernel_vs_eager"] if undeclared == "compile" else []
    for name in compared:
        assert result.metrics[f"{name}_ci_low"] <= result.metrics[name] <= result.metrics[f"{name}_ci_high"]
    for metric in ("gpu_ms_compiled", "compile_s_baseline", "err_ratio_compiled", "max_abs_diff_compiled",
                   "graph_replay_rel_err", "recompiles"):
        assert metric in result.metrics, metric
    if undeclared == "skip":
        assert result.tags["compiled_kernel_note"].startswith("not timed")
        assert result.metrics["recompiles"] == 0  # nothing compiled after each side's first call
        assert "gpu_ms_compiled_kernel" not in result.metrics
    else:
        assert "compiled although" in result.tags["compiled_kernel_note"]
        assert "gpu_ms_compiled_kernel" in result.metrics and "compile_s_kernel" in result.metrics


def test_train_peak_memory_per_side_does_not_depend_on_the_jobs_before(make_config, models):
    def baseline_peak(kernels: str, length: int) -> float:
        result = run_job(make_config("dtype=bf16", f"kernels={kernels}", "kernels.source=bundled", "timing=quick",
                                     "workload=train", f"prompt.length={length}", "prompt.batch_size=4",
                                     "numerics.per_layer=false"), models)
        assert result.status == RunStatus.measured, result.reason
        return result.metrics["peak_mem_mb_baseline"]

    first = baseline_peak("rms", 256)
    baseline_peak("rms", 2048)  # a larger job in between
    again = baseline_peak("silu", 256)  # the same baseline step as the first job's
    assert again == pytest.approx(first, rel=0.02), (first, again)


@pytest.mark.parametrize("workload", ["prefill", "decode", "train"])
def test_a_jobs_peak_memory_is_the_same_whether_it_runs_first_or_second_in_its_group(make_config, workload):
    """The first job of a group also computes the cached float64 reference (and Triton autotunes the kernel's first
    step); the second reuses them. Neither may change what the job reports as its peak."""
    models = ModelCache()
    cfg = make_config("dtype=bf16", "kernels=rms", "kernels.source=bundled", "timing=quick", f"workload={workload}",
                      "prompt.length=2048")
    first, second = run_job(cfg, models), run_job(cfg, models)
    for result in (first, second):
        assert result.status == RunStatus.measured, result.reason
    peaks = [m for m in first.metrics if m.startswith("peak_mem_mb")]
    assert sorted(peaks) == ["peak_mem_mb_baseline", "peak_mem_mb_kernel"], peaks
    for metric in peaks:
        assert second.metrics[metric] == pytest.approx(first.metrics[metric], rel=0.02), metric


def test_paired_graphs_share_each_blocks_pool_and_each_replay_computes_its_own_input(make_config, models):
    """Both sides of a block are captured into one memory pool; a replay may overwrite
    the other side's output but must compute its own input, block after block."""
    cfg = make_config("dtype=bf16", "kernels=both", "kernels.source=bundled")
    model = models.get(cfg.model, torch.bfloat16, torch.device("cuda")).model
    selection = kernel_selection(cfg.kernels)
    kernels = [resolve_kernel(layer, spec, selection.source) for layer, spec in selection.specs.items()]
    switch = KernelSwitch.apply(model, kernels, torch.device("cuda"))
    inputs = [torch.randint(0, 256, (1, 64), device="cuda") for _ in range(3)]
    placement = GraphPlacement(sides=2)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, ids)

    try:
        sides = [GraphRunner(forward, inputs, lambda: switch.select(False), placement, side="baseline"),
                 GraphRunner(forward, inputs, lambda: switch.select(True), placement, side="kernel")]
        for block in range(4):
            if block:
                for runner in (sides if block % 2 else sides[::-1]):
                    runner.renew()
            assert sides[0].graph.pool() == sides[1].graph.pool()
            for enabled, runner in zip((False, True), sides):
                switch.select(enabled)
                for index, ids in enumerate(inputs):
                    runner.prepare(index)
                    runner.run()
                    assert torch.equal(runner.static_output, forward_logits(model, ids)), (block, enabled, index)
    finally:
        switch.select(False)


# RMSNorm kernels that are exact when run eagerly and break only inside a CUDA-graph capture.
CAPTURE_BREAKS = {
    "non_finite": """
    if torch.cuda.is_current_stream_capturing():
        hidden_states = hidden_states * float("nan")
""",
    "wrong": """
    if torch.cuda.is_current_stream_capturing():
        hidden_states = -hidden_states
""",
}
# A host sync: capture raises.
HOST_SYNC = """
    hidden_states.sum().item()
"""


@pytest.mark.parametrize("breaks", CAPTURE_BREAKS)
def test_a_kernel_whose_graph_replay_is_wrong_fails_naming_its_side(make_config, models, tmp_path, breaks):
    """Its eager forward is exact, so timing it eagerly instead would call a kernel measured that is broken
    under capture."""
    repo = write_kernel_repo(tmp_path, f"capture_{breaks}", "ExactRMSNorm", CAPTURE_BREAKS[breaks] + EXACT_RMSNORM,
                             variant="torch-cuda")
    result = run_job(make_config("dtype=bf16", "kernels=none", *SHORT_PROMPT,
                                 *local_kernel("RMSNorm", repo, "ExactRMSNorm")), models)
    assert result.status == RunStatus.failed, result.reason
    assert result.reason.startswith("GraphCheckError: the kernel side's graph replay"), result.reason
    assert result.tags["failure_phase"] == "capture" and "timing_note" not in result.tags
    assert "speedup" not in result.metrics


def test_a_kernel_that_cannot_be_captured_is_timed_eagerly_and_marked(make_config, models, tmp_path):
    """Capture raises (a host sync in the forward): the job is timed eagerly, and says so."""
    repo = write_kernel_repo(tmp_path, "host_sync", "ExactRMSNorm", HOST_SYNC + EXACT_RMSNORM,
                             variant="torch-cuda")
    result = run_job(make_config("dtype=bf16", "kernels=none", *SHORT_PROMPT,
                                 *local_kernel("RMSNorm", repo, "ExactRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    assert result.tags["timing_mode_used"] == "eager" and result.params["timing_mode"] == "auto"
    assert result.tags["timing_note"].startswith("CUDA graph unusable, timed eagerly instead")
    assert job_description(result).startswith("speedup ") and " (eager)" in job_description(result)


# Asks for twice what the GPU has: CUDA refuses at once, also where the GPU's memory is the system's.
ALLOCATES_TWICE_THE_GPU = """
    torch.empty(2 * torch.cuda.get_device_properties(hidden_states.device).total_memory, dtype=torch.uint8,
                device=hidden_states.device)
"""


def test_a_real_out_of_memory_says_whether_the_gpus_memory_is_the_systems(make_config, models, tmp_path):
    """On integrated memory (a GB10) the reason adds that the operating system's OOM killer may end a job instead;
    the fingerprint records which kind of GPU memory the run had."""
    repo = write_kernel_repo(tmp_path, "allocates", "ExactRMSNorm", ALLOCATES_TWICE_THE_GPU + EXACT_RMSNORM,
                             variant="torch-cuda")
    result = run_job(make_config("dtype=bf16", "kernels=none", *SHORT_PROMPT,
                                 *local_kernel("RMSNorm", repo, "ExactRMSNorm")), models)
    assert result.tags["failure_kind"] == "out_of_memory", result.reason
    assert result.reason.startswith("out of GPU memory in "), result.reason
    integrated = bool(torch.cuda.get_device_properties(0).is_integrated)
    assert result.tags["gpu_memory_integrated"] == str(integrated).lower()
    assert result.tags["cpu_arch"] == platform.machine()
    assert ("OOM killer" in result.reason) == integrated, result.reason


def test_a_rerun_of_a_finished_sweep_on_the_gpu_ends_with_the_way_into_the_ui(tmp_path):
    """As on the CPU, with CUDA and Triton started in the background as well (one visible GPU)."""
    rerun_a_finished_sweep(tmp_path, "device=cuda", "dtype=fp32", "kernels=none", "timing=quick", "prompt.length=16",
                           "numerics.gen_tokens=2")


# Speed of light: each kernelized layer timed alone with CUDA graphs, against a copy of its bytes.
OPS_JOB = ["numerics.gen_tokens=0", "numerics.per_layer=false"]


def test_ligers_rmsnorm_alone_is_as_fast_as_a_copy_of_its_bytes_and_predicts_the_model(make_config, models):
    """At 2048 tokens on an H200 Liger's RMSNorm alone is 11x faster than eager and at 0.79 of a copy of its bytes
    (benchmarks/copy_limit.py), 21% of the forward, and the model's speedup (1.24x) within a few percent of what that
    share predicts."""
    result = run_job(make_config("dtype=bf16", "kernels=rms", "kernels.source=bundled", "prompt.length=2048",
                                 *OPS_JOB), models)
    assert result.status == RunStatus.measured, result.reason
    m, x = result.metrics, 2048 * 1024 * 2
    assert m["op_calls_RMSNorm"] == 9 and m["op_bytes_RMSNorm"] == 2 * x + 1024 * 2
    assert m["op_speedup_RMSNorm_ci_low"] > 3, m
    assert result.tags["op_bound_RMSNorm"] == "memory" and "op_bytes_miscounted_RMSNorm" not in result.tags
    assert 0.7 < m["op_sol_RMSNorm"] and m["op_sol_baseline_RMSNorm"] < 0.5, m
    assert 0.1 < m["op_share_RMSNorm"] < 0.4 and 0.85 < m["prediction_gap"] < 1.2, m
    assert m["device_copy_gbps"] > 100
    if "device_peak_gbps" in m:
        assert m["device_copy_gbps"] < m["device_peak_gbps"], m
    assert result.artifacts["ops/ops.png"].startswith(b"\x89PNG")


def test_an_exact_kernel_alone_is_as_fast_as_eager_in_cuda_graphs(make_config, models, tmp_path):
    repo = write_kernel_repo(tmp_path, "exact_cuda_rms", "ExactRMSNorm", EXACT_RMSNORM, variant="torch-cuda")
    result = run_job(make_config("dtype=bf16", "kernels=none", "prompt.length=2048", *OPS_JOB,
                                 *local_kernel("RMSNorm", repo, "ExactRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    assert result.tags["timing_mode_used"] == "graph"
    m = result.metrics
    assert m["op_speedup_RMSNorm_ci_low"] <= 1.0 <= m["op_speedup_RMSNorm_ci_high"], m


@pytest.mark.parametrize(("workload", "prompt"), [("prefill", ["prompt.length=2048"]),
                                                  ("decode", ["prompt.length=118", "prompt.batch_size=8"]),
                                                  ("train", ["prompt.length=4096"])])
def test_a_kernel_that_skips_its_work_is_never_reported_above_the_limit(make_config, models, tmp_path, workload,
                                                                         prompt):
    """It returns its input unchanged (train: and passes the incoming gradient through): far faster than a copy
    of the bytes an RMSNorm must move, so the bytes are reported as counted wrong instead of a share above 1."""
    repo = write_kernel_repo(tmp_path, "pass_through_rms", "PassThroughRMSNorm",
                             "return PassThrough.apply(hidden_states, self.weight)", variant="torch-cuda",
                             module_source=PASS_THROUGH_FUNCTION)
    result = run_job(make_config("dtype=bf16", "kernels=none", f"workload={workload}", *prompt, *OPS_JOB,
                                 *local_kernel("RMSNorm", repo, "PassThroughRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    assert result.tags["timing_mode_used"] == "graph"
    assert "it moves fewer bytes than counted" in result.tags["op_bytes_miscounted_RMSNorm"], result.metrics
    assert not {"op_sol_RMSNorm", "op_gbps_kernel_RMSNorm"} & result.metrics.keys()
