"""The torch.compile baseline (`baseline=compile`) on the CPU with inductor: four sides timed in the same rounds,
the kernels inside the compiled model where they declare it, compile time kept out of the timed rounds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SHORT_PROMPT, local_kernel
from kernel_repos import EXACT_RMSNORM, EXACT_SILU, write_kernel_repo

from sweep.job import job_name, run_job
from sweep.results import RunStatus

# One small layer: inductor compiles it on the CPU in seconds.
SMALL = ["model.architecture.num_hidden_layers=1", "model.architecture.hidden_size=64",
         "model.architecture.intermediate_size=128", "model.architecture.num_attention_heads=4",
         "model.architecture.num_key_value_heads=4", "numerics.gen_tokens=2"]
# Rounds its output to multiples of 1/256. (ROUNDED_SILU's round trip through bfloat16 would not do: inductor
# fuses it away, since it does not emulate precision casts by default.)
QUANTIZED_SILU = """
    return torch.round(torch.nn.functional.silu(input) * 256) / 256
"""
COMPARISONS = ("speedup", "compile_speedup", "kernel_vs_compile", "compiled_kernel_speedup",
               "compiled_kernel_vs_eager")


@pytest.fixture(scope="module")
def compilable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Kernel repositories whose layers declare `can_torch_compile = True`."""
    root = tmp_path_factory.mktemp("compilable")
    return {
        "exact_rms": write_kernel_repo(root, "exact_rms", "ExactRMSNorm", EXACT_RMSNORM, can_torch_compile=True),
        "quantized_silu": write_kernel_repo(root, "quantized_silu", "QuantizedSilu", QUANTIZED_SILU,
                                            argument="input", can_torch_compile=True),
        "exact_silu": write_kernel_repo(root, "exact_silu", "ExactSilu", EXACT_SILU, argument="input",
                                        can_torch_compile=True),
    }


def compiled_job(make_config, models, *overrides: str):
    return run_job(make_config(*SHORT_PROMPT, *SMALL, "kernels=none", "baseline=compile", *overrides), models)


def test_exact_kernels_inside_the_compiled_model(make_config, models, compilable):
    result = compiled_job(make_config, models, "dtype=fp32",
                          *local_kernel("RMSNorm", compilable["exact_rms"], "ExactRMSNorm"),
                          *local_kernel("SiLU", compilable["exact_silu"], "ExactSilu"))
    assert result.status == RunStatus.measured, result.reason
    metrics = result.metrics
    for name in COMPARISONS:
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
        assert metrics[name] > 0 and f"{name}_significant" in metrics
    for side in ("baseline", "kernel", "compiled", "compiled_kernel"):
        assert metrics[f"latency_ms_{side}"] > 0
    # The kernels compute what eager computes, so inside the compiled model they change nothing.
    assert metrics["max_abs_diff_compiled_kernel"] == 0.0
    assert metrics["err_ratio_compiled_kernel"] == metrics["err_ratio_compiled"]
    assert metrics["ref_err_compiled"] > 0 and metrics["max_abs_diff_compiled"] >= 0
    assert "compiled_kernel_note" not in result.tags
    # Compiled on each side's first call, before the numerics and the rounds; nothing compiles after it.
    assert metrics["compile_s_baseline"] > 0 and metrics["compile_s_kernel"] > 0
    assert metrics["compiled_graphs_baseline"] >= 1 and metrics["compiled_graphs_kernel"] >= 1
    assert metrics["graph_breaks_baseline"] >= 0 and metrics["graph_breaks_kernel"] >= 0
    assert metrics["recompiles"] == 0
    assert metrics["latency_ms_compiled"] / 1e3 < metrics["compile_s_baseline"]
    params = result.params
    assert params["baseline"] == "compile" and params["compile_mode"] == "default"
    assert params["compile_dynamic"] == "False" and params["compile_backend"] == "inductor"


def test_a_kernel_inside_the_compiled_model_is_traced(make_config, models, compilable):
    """The compiled side with kernels runs the kernel: its rounding shows, as in eager."""
    result = compiled_job(make_config, models, "dtype=fp32",
                          *local_kernel("SiLU", compilable["quantized_silu"], "QuantizedSilu"))
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["max_abs_diff"] > 0 and result.metrics["max_abs_diff_compiled_kernel"] > 0
    assert result.metrics["err_ratio_compiled_kernel"] != result.metrics["err_ratio_compiled"]


def test_a_kernel_without_compile_support_skips_that_side_only(make_config, models, kernel_repos):
    result = compiled_job(make_config, models, "dtype=fp32",
                          *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
    assert result.status == RunStatus.measured, result.reason
    note = result.tags["compiled_kernel_note"]
    assert "can_torch_compile = True" in note and "RMSNorm" in note and "not timed" in note
    metrics = result.metrics
    for name in ("speedup", "compile_speedup", "kernel_vs_compile"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    assert metrics["compile_s_baseline"] > 0 and metrics["latency_ms_compiled"] > 0
    assert not [key for key in metrics if "compiled_kernel" in key or key.endswith("_s_kernel")]


def test_kernels_none_compares_compile_with_eager(make_config, models):
    result = compiled_job(make_config, models, "dtype=fp32")
    assert result.status == RunStatus.measured, result.reason
    assert "compile_speedup" in result.metrics and "speedup" not in result.metrics
    assert "kernel_vs_compile" not in result.metrics and "err_ratio_compiled" in result.metrics


def test_eager_baseline_jobs_are_unchanged(make_config, models, kernel_repos):
    cfg = make_config(*SHORT_PROMPT, *SMALL, "dtype=fp32", "kernels=none",
                      *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.measured, result.reason
    assert result.params["baseline"] == "eager" and not [p for p in result.params if p.startswith("compile")]
    assert not [key for key in result.metrics if "compile" in key or key == "recompiles"]
    assert {key.removeprefix("latency_ms_") for key in result.metrics if key.startswith("latency_ms_")} == {
        "baseline", "kernel"}
    assert result.metrics["speedup_ci_low"] <= result.metrics["speedup"] <= result.metrics["speedup_ci_high"]
    assert "compile" not in job_name(cfg)


def test_compile_baseline_is_for_prefill(make_config, models):
    result = compiled_job(make_config, models, "workload=decode")
    assert result.status == RunStatus.failed
    assert "baseline=compile" in result.reason and "workload=decode with baseline=eager" in result.reason


def test_cli_sweeps_the_baseline_axis(tmp_path, cpu_kernel_configs):
    """`-m baseline=eager,compile`: typed options (a typo stops it), one run per baseline, the summary's
    four-way table."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    common = [sys.executable, "-m", "sweep", "--config-dir", str(cpu_kernel_configs),
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
              "dtype=fp32", *SHORT_PROMPT, *SMALL]
    typo = subprocess.run([*common, "baseline=compile", "baseline.mdoe=max-autotune"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert typo.returncode != 0 and "mdoe" in typo.stderr
    sweep = subprocess.run([*common[:3], "-m", *common[3:], "baseline=eager,compile", "kernels=silu_cpu"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert "compile_speedup" in sweep.stdout or "compiled" in sweep.stdout
