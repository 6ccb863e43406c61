"""The torch.compile baseline (`baseline=compile`) on the CPU with inductor: four sides timed in the same rounds,
the kernels inside the compiled model where they declare it, compile time kept out of the timed rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHORT_PROMPT, local_kernel
from kernel_repos import EXACT_RMSNORM, EXACT_SILU, write_kernel_repo
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from test_cli import child_runs, run_sweep

from sweep.records.results import RunStatus
from sweep.run.job import job_name, run_job
from sweep.views import report
from sweep.views.comparison import compile_tables, headline
from sweep.views.table import latest_runs

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
    assert metrics["max_abs_diff_compiled_kernel_vs_eager"] == metrics["max_abs_diff_compiled"]
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


def test_an_undeclared_kernel_is_compiled_on_request(make_config, models, kernel_repos):
    result = compiled_job(make_config, models, "dtype=fp32", "baseline.undeclared_kernels=compile",
                          *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
    assert result.status == RunStatus.measured, result.reason
    assert "compiled although" in result.tags["compiled_kernel_note"]
    assert result.params["compile_undeclared_kernels"] == "compile"
    assert result.metrics["max_abs_diff_compiled_kernel"] == 0.0 and "compiled_kernel_speedup" in result.metrics


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


def test_cli_sweeps_the_baseline_axis_into_tables_page_and_report(tmp_path, cpu_kernel_configs):
    """`-m baseline=eager,compile`: typed options (a typo stops it), one run per baseline, the four-way table in
    the terminal, on the sweep's page and in the report, beside the eager runs' own tables."""
    options = ["--config-dir", str(cpu_kernel_configs), "dtype=fp32", *SHORT_PROMPT, *SMALL]
    typo = run_sweep(tmp_path, *options, "baseline=compile", "baseline.mdoe=max-autotune")
    assert typo.returncode != 0 and "mdoe" in typo.stderr
    refused = run_sweep(tmp_path, *options, "baseline=compile", "baseline.mode=fastest", "workload=decode")
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    said = " ".join(refused.stderr.split())
    assert "baseline.mode=fastest is not one of torch.compile's modes: default," in said
    assert "run workload=decode with baseline=eager" in said
    assert not (tmp_path / "mlflow.db").exists()
    done = run_sweep(tmp_path, "-m", *options, "baseline=eager,compile", "kernels=silu_cpu")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "torch.compile against the kernels: tiny-llama fp32 T=40" in done.stdout
    assert "fastest: " in done.stdout

    client, (parent,), children = child_runs(tmp_path)
    assert sorted(child.data.params["baseline"] for child in children) == ["compile", "eager"]
    (compiled_run,) = [child for child in children if child.data.params["baseline"] == "compile"]
    assert "can_torch_compile" in compiled_run.data.tags["compiled_kernel_note"]
    description = parent.data.tags[MLFLOW_RUN_NOTE]
    assert "#### torch.compile against the kernels: tiny-llama fp32 T=40" in description
    assert "#### Timing" in description  # the eager run keeps its own table

    runs = latest_runs(report.load_runs([f"sqlite:///{tmp_path}/mlflow.db"], "kernel-sweep"))
    assert sorted(runs["baseline"]) == ["compile", "eager"]  # one run each: the baseline is part of the run's key
    text = report.render(runs, "md")
    compiled = text[text.index("### torch.compile against the kernels"):]
    assert "**fastest: " in compiled and "| silu_cpu |" in compiled and "compile+kernels not timed" in compiled
    pivot = text[text.index("### Speedup by GPU"):text.index("### Results")]
    assert pivot.count("| silu_cpu |") == 1  # the eager run's speedup only
    csv = report.render(runs, "csv")
    assert "compile_speedup" in csv.splitlines()[0]


def _row(kernels: str, **ratios: tuple[float, float, float]) -> dict[str, object]:
    row: dict[str, object] = {"baseline": "compile", "model": "tiny-llama", "dtype": "bf16", "prompt_len": 118,
                              "batch_size": "1", "kernels": kernels, "run_status": "measured"}
    for name, (value, low, high) in ratios.items():
        row |= {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high}
    return row


def test_headline_names_the_fastest_option_with_its_intervals():
    compile_wins = [_row("rms", compile_speedup=(2.0, 1.9, 2.1), speedup=(1.2, 1.1, 1.3),
                         kernel_vs_compile=(0.6, 0.5, 0.625))]
    assert headline(compile_wins) == ("fastest: torch.compile, 2.00x [1.90, 2.10] over eager, 1.67x [1.60, 2.00] "
                                      "over the best kernel option (rms)")
    both_win = [_row("rms", compile_speedup=(2.0, 1.9, 2.1), speedup=(1.2, 1.1, 1.3),
                     kernel_vs_compile=(0.6, 0.5, 0.625), compiled_kernel_speedup=(1.1, 1.05, 1.15),
                     compiled_kernel_vs_eager=(2.2, 2.1, 2.3))]
    assert headline(both_win) == ("fastest: torch.compile + rms, 2.20x [2.10, 2.30] over eager, "
                                  "1.10x [1.05, 1.15] over torch.compile")
    eager_wins = [_row("silu", compile_speedup=(0.85, 0.8, 0.9), speedup=(0.99, 0.98, 1.01),
                       kernel_vs_compile=(1.16, 1.1, 1.2))]
    assert headline(eager_wins).startswith("fastest: eager; the best other option is silu: 0.99x [0.98, 1.01] ~")


def test_torch_compile_is_represented_by_its_median_run():
    rows = [_row(kernels, compile_speedup=(value, value - 0.05, value + 0.05), speedup=(1.0, 0.9, 1.1))
            for kernels, value in (("rms", 2.1), ("silu", 1.9), ("both", 2.0))]
    assert headline(rows).startswith("fastest: torch.compile, 2.00x [1.95, 2.05] over eager")
    (table,) = compile_tables(rows)
    assert table.title == "tiny-llama bf16 T=118" and list(table.frame["kernels"]) == ["rms", "silu", "both"]
    assert list(table.frame["compile / eager"]) == ["2.10x [2.05, 2.15]", "1.90x [1.85, 1.95]", "2.00x [1.95, 2.05]"]


def test_a_triton_kernel_torch_compile_cannot_analyse_is_named():
    """torch only logs the failure (the issue's `'float' object has no attribute 'to'`) and compiles on."""
    import inspect
    import logging

    import torch._higher_order_ops.triton_kernel_wrap as triton_kernel_wrap

    from sweep.measure.compilation import TRITON_ANALYSIS_FAILED, triton_analysis_failures, triton_analysis_note

    assert TRITON_ANALYSIS_FAILED in inspect.getsource(triton_kernel_wrap)  # torch's wording, as installed
    logger = logging.getLogger("torch._dynamo")
    with triton_analysis_failures() as failures:
        logger.warning("a graph break")
        for error in (AttributeError("'float' object has no attribute 'to'"),  # how Triton words it:
                      SyntaxError("at 58:14:\n    X_row = X_row.to(tl.float32)\n    eps = eps.to(X_row_dtype)\n"
                                  "              ^\n'float' object has no attribute 'to'")):
            try:
                raise error
            except Exception:
                logger.warning(f"Encountered an exception in identify_accessed_tensors, {TRITON_ANALYSIS_FAILED}",
                               exc_info=True)
    logger.warning(f"after the block, {TRITON_ANALYSIS_FAILED}")
    assert failures == ["AttributeError: 'float' object has no attribute 'to'",
                        "SyntaxError at 58:14: 'float' object has no attribute 'to'"]
    # the H100's 36 calls of Liger's RMSNorm in one compiled forward, one error: named once
    note = triton_analysis_note(failures[1:] * 36)
    assert note.startswith("torch.compile could not analyse 36 Triton kernel call(s) (SyntaxError at 58:14: "
                           "'float' object has no attribute 'to'): it kept them")
    row = _row("rms", compile_speedup=(2.0, 1.9, 2.1)) | {"compile_triton_analysis_kernel": "torch.compile could..."}
    (table,) = compile_tables([row])
    assert "could not analyse its Triton kernel" in table.frame["note"][0]


@pytest.mark.parametrize("timing_mode_used", ["graph", "eager"])
def test_a_compile_tables_caption_explains_the_eager_mark_only_where_a_row_carries_it(timing_mode_used):
    row = {"baseline": "compile", "workload": "prefill", "model": "tiny-llama", "dtype": "bf16", "prompt_len": 118,
           "batch_size": 1, "timing_mode": "auto", "timing_mode_used": timing_mode_used, "gpu_name": "NVIDIA H200",
           "gpu": "NVIDIA H200", "details": "", "kernels": "rms", "kernel_label": "rms", "compile_speedup": 1.2,
           "compile_speedup_ci_low": 1.1, "compile_speedup_ci_high": 1.3}
    [table] = compile_tables([row])
    assert ("timed eagerly" in table.caption) == (timing_mode_used == "eager"), table.caption
