"""One job through the real kernels path, on the CPU, with kernel repositories the tests write."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SHORT_PROMPT, local_kernel

from sweep.config import KernelSourceMode, KernelSpec
from sweep.job import run_job
from sweep.kernelization import KernelSwitch, resolve_kernel
from sweep.numerics import forward_logits
from sweep.results import RunStatus


def test_exact_rmsnorm_replaces_all_nine_and_changes_nothing(make_config, models, kernel_repos):
    cfg = make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT,
                      *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["kernelized_RMSNorm"] == 9
    assert result.metrics["kernelized_total"] == 9
    assert result.metrics["max_abs_diff"] == 0.0
    assert result.metrics["argmax_match"] == 1.0
    assert result.metrics["err_ratio"] == pytest.approx(1.0)
    assert result.tags["kernel_source_RMSNorm"] == f"local:{kernel_repos['exact_rms'].resolve()}"
    assert result.metrics["latency_ms_baseline"] > 0 and result.metrics["latency_ms_kernel"] > 0
    assert result.metrics["speedup_ci_low"] <= result.metrics["speedup"] <= result.metrics["speedup_ci_high"]


def test_low_precision_rmsnorm_differs_and_is_less_accurate(make_config, models, kernel_repos):
    cfg = make_config("dtype=bf16", "kernels=none", *SHORT_PROMPT,
                      *local_kernel("RMSNorm", kernel_repos["low_rms"], "LowRMSNorm"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["kernelized_RMSNorm"] == 9
    assert result.metrics["max_abs_diff"] > 0
    assert result.metrics["ref_err_kernel"] > result.metrics["ref_err_baseline"] > 0
    assert result.metrics["err_ratio"] > 1.0


def test_rounded_silu_in_fp32_is_attributed_to_four_silus(make_config, models, kernel_repos):
    cfg = make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT,
                      *local_kernel("SiLU", kernel_repos["rounded_silu"], "RoundedSilu"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["kernelized_SiLU"] == 4
    assert result.metrics["max_abs_diff"] > 0
    assert result.metrics["err_ratio"] > 1.0


def test_kernels_none_logs_the_baseline_only(make_config, models):
    result = run_job(make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT), models)
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["latency_ms_baseline"] > 0
    assert result.metrics["ref_err_baseline"] > 0
    assert "speedup" not in result.metrics and "kernelized_total" not in result.metrics


def test_cuda_only_kernel_is_skipped_on_cpu(make_config, models, kernel_repos):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can run it")
    for overrides in (["kernels=rms"], local_kernel("RMSNorm", kernel_repos["cuda_only"], "ExactRMSNorm")):
        result = run_job(make_config("dtype=fp32", *SHORT_PROMPT, *overrides), models)
        assert result.status == RunStatus.skipped
        assert "cpu" in result.reason and "build variant" in result.reason


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["+kernels.Foo={path: /tmp, layer_name: X}"], "Foo"),
        (["+kernels.RMSNorm={path: /does/not/exist, layer_name: X}"], "is not a directory"),
        (["prompt.length=9000"], "exceeds the model's 8192 positions"),
        (["+kernels.RMSNorm={layer_name: X}"], "needs one of path, repo_id or bundled"),
        (["timing.mode=graph"], "needs CUDA graphs"),
    ],
)
def test_bad_combinations_fail_with_the_reason(make_config, models, overrides, reason):
    if "timing.mode=graph" in overrides and torch.cuda.is_available():
        pytest.skip("graphs work here")
    result = run_job(make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT, *overrides), models)
    assert result.status == RunStatus.failed
    assert reason in result.reason
    if "Foo" in overrides[0]:
        assert "RMSNorm (9)" in result.reason and "SiLU (4)" in result.reason


def test_wrong_layer_name_in_repository_fails(make_config, models, kernel_repos):
    cfg = make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT,
                      *local_kernel("RMSNorm", kernel_repos["exact_rms"], "NoSuchLayer"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.failed
    assert "NoSuchLayer" in result.reason
    assert "traceback.txt" in result.artifacts


def test_switching_restores_the_baseline_bit_for_bit(make_config, models, kernel_repos):
    cfg = make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT)
    model = models.get(cfg.model, torch.float32, torch.device("cpu")).model
    pristine = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 40))
    kernel = resolve_kernel("SiLU", KernelSpec(layer_name="RoundedSilu", path=str(kernel_repos["rounded_silu"])),
                            KernelSourceMode.auto)
    switch = KernelSwitch.apply(model, [kernel], torch.device("cpu"))
    assert switch.replaced == {"SiLU": 4}
    with switch.active():
        kernelized = forward_logits(model, ids)
    restored = forward_logits(model, ids)
    assert torch.equal(restored, forward_logits(pristine, ids))
    assert not torch.equal(kernelized, restored)
    assert all("forward" not in module.__dict__ for module in switch.modules)


def test_reference_is_computed_once_per_prompt(make_config, models):
    cfg = make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT)
    calls = []
    models.get(cfg.model, torch.float32, torch.device("cpu"))
    first = models.reference(("p", 1), lambda: calls.append(1) or torch.ones(1))
    again = models.reference(("p", 1), lambda: calls.append(1) or torch.zeros(1))
    assert calls == [1] and torch.equal(first, again)


@pytest.mark.parametrize(("length", "generated"), [(40, 8), (48, 0)])
def test_generation_stays_within_the_models_positions(make_config, models, kernel_repos, length, generated):
    cfg = make_config("dtype=fp32", "kernels=none", "timing=quick", f"prompt.length={length}",
                      "numerics.gen_tokens=16", "model.architecture.max_position_embeddings=48",
                      *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
    result = run_job(cfg, models)
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["gen_tokens"] == generated
    assert "clipped to" in result.tags["gen_note"] and "48 positions" in result.tags["gen_note"]
    assert ("gen_match" in result.metrics) == (generated > 0)
