"""The decode and train workloads through the real kernels path on the CPU, with kernel repositories the tests
write; a smaller Llama than tiny-llama keeps backward passes fast."""

from __future__ import annotations

import copy
import csv
import gc
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SHORT_PROMPT, local_kernel

from sweep.config import KernelSourceMode, KernelSpec
from sweep.measure.kernelization import KernelSwitch, resolve_kernel
from sweep.measure.numerics import forward_logits
from sweep.measure.timing import EagerRunner
from sweep.measure.workloads.decode import DecodeStep
from sweep.measure.workloads.train import Train, trainable
from sweep.records.results import RunStatus
from sweep.run.job import job_name, run_job

SMALL_LLAMA = ["model.architecture.hidden_size=256", "model.architecture.intermediate_size=512",
               "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=4"]


def job(make_config, models, *overrides: str):
    return run_job(make_config(*SHORT_PROMPT, *SMALL_LLAMA, "kernels=none", *overrides), models)


@pytest.mark.parametrize("workload", ["decode", "train"])
def test_exact_kernels_change_nothing(make_config, models, kernel_repos, workload):
    result = job(make_config, models, f"workload={workload}", "dtype=fp32",
                 *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"),
                 *local_kernel("SiLU", kernel_repos["exact_silu"], "ExactSilu"))
    assert result.status == RunStatus.measured, result.reason
    assert result.params["workload"] == workload
    assert result.metrics["kernelized_RMSNorm"] == 9 and result.metrics["kernelized_SiLU"] == 4
    assert result.metrics["latency_ms_baseline"] > 0 and result.metrics["latency_ms_kernel"] > 0
    if workload == "decode":
        assert result.metrics["max_abs_diff"] == 0.0 and result.metrics["kl_div"] == 0.0
        assert result.metrics["err_ratio"] == 1.0 and result.metrics["ref_err_baseline"] > 0
        assert result.metrics["tokens_per_s_kernel"] == pytest.approx(1e3 / result.metrics["latency_ms_kernel"])
    else:
        assert result.metrics["loss_diff"] == 0.0 and result.metrics["grad_max_rel_diff"] == 0.0
        assert result.metrics["grad_err_ratio"] == 1.0 and result.metrics["grad_err_baseline"] > 0
        assert "reference_note" not in result.tags and "dropout" not in result.tags


@pytest.mark.parametrize(("workload", "ratio"), [("decode", "err_ratio"), ("train", "grad_err_ratio")])
def test_low_precision_rmsnorm_is_less_accurate(make_config, models, kernel_repos, workload, ratio):
    result = job(make_config, models, f"workload={workload}", "dtype=bf16",
                 *local_kernel("RMSNorm", kernel_repos["low_rms"], "LowRMSNorm"))
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics[ratio] > 1.0
    diff = "max_abs_diff" if workload == "decode" else "grad_max_rel_diff"
    assert result.metrics[diff] > 0


def test_kernel_without_backward_is_skipped_in_train_and_measured_in_prefill(make_config, models, kernel_repos):
    kernel = local_kernel("RMSNorm", kernel_repos["forward_only_rms"], "ForwardOnlyRMSNorm")
    trained = job(make_config, models, "workload=train", "dtype=fp32", *kernel)
    assert trained.status == RunStatus.skipped
    assert "has_backward = False" in trained.reason and "workload=prefill" in trained.reason
    prefilled = job(make_config, models, "workload=prefill", "dtype=fp32", *kernel)
    assert prefilled.status == RunStatus.measured, prefilled.reason
    assert prefilled.metrics["kernelized_RMSNorm"] == 9 and prefilled.params["workload"] == "prefill"


def test_decode_step_is_the_last_position_of_a_prefill_one_token_longer(make_config, models):
    cfg = make_config(*SMALL_LLAMA, "dtype=fp32")
    model = models.get(cfg.model, torch.float32, torch.device("cpu")).model
    ids = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(0))
    step = DecodeStep(model, ids[:, :40])
    logits = step(ids[:, 40:])
    assert logits.shape == (2, 1, 256)
    torch.testing.assert_close(logits[:, 0], forward_logits(model, ids)[:, -1], rtol=1e-4, atol=1e-5)
    other = ids[:, 40:] + 1
    assert not torch.allclose(step(other), logits)
    assert torch.equal(step(ids[:, 40:]), logits)  # repeatable at the same position, whatever ran before


def test_each_block_renews_the_decode_cache_with_its_side_selected(make_config, models, kernel_repos):
    """Where a side's cache lands is fixed for a whole job unless each block places it anew: then the blocks sample
    it, and the interval covers what changes from one job to the next. The kernel side's cache is refilled by the
    kernel (selected before the renewal), so its step computes what it computed before."""
    cfg = make_config(*SMALL_LLAMA, "dtype=fp32")
    model = models.get(cfg.model, torch.float32, torch.device("cpu")).model
    spec = KernelSpec(layer_name="LowRMSNorm", path=str(kernel_repos["low_rms"]))
    switch = KernelSwitch.apply(model, [resolve_kernel("RMSNorm", spec, KernelSourceMode.auto)], torch.device("cpu"))
    ids = torch.randint(0, 256, (1, 41), generator=torch.Generator().manual_seed(0))
    try:
        with switch.active():
            step = DecodeStep(model, ids[:, :40])
            expected = step(ids[:, 40:])
        switch.select(False)
        cache = step.cache
        EagerRunner(step, [ids[:, 40:]], lambda: switch.select(True)).renew()
        assert step.cache is not cache
        assert torch.equal(step(ids[:, 40:]), expected)  # the kernel refilled it, and is still selected
    finally:
        switch.select(False)


def test_decode_needs_a_position_for_the_new_token(make_config, models):
    result = job(make_config, models, "workload=decode", "dtype=fp32", "prompt.length=48",
                 "model.architecture.max_position_embeddings=48")
    assert result.status == RunStatus.failed
    assert "49 positions with workload=decode" in result.reason and "48 positions" in result.reason


def test_training_leaves_the_model_as_it_found_it(make_config, models, kernel_repos):
    cfg = make_config(*SMALL_LLAMA, "dtype=fp32")
    model = models.get(cfg.model, torch.float32, torch.device("cpu")).model
    pristine = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    result = job(make_config, models, "workload=train", "dtype=fp32",
                 *local_kernel("SiLU", kernel_repos["rounded_silu"], "RoundedSilu"))
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["loss_diff"] > 0  # the kernel did run in the backward's forward
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(forward_logits(model, ids), forward_logits(pristine, ids))


def test_kernels_for_training_run_their_backward(make_config, models, kernel_repos):
    cfg = make_config(*SMALL_LLAMA, "dtype=fp32")
    model = models.get(cfg.model, torch.float32, torch.device("cpu")).model
    kernel = resolve_kernel("SiLU", KernelSpec(layer_name="RoundedSilu", path=str(kernel_repos["rounded_silu"])),
                            KernelSourceMode.auto)
    switch = KernelSwitch.apply(model, [kernel], torch.device("cpu"), Train.kernel_mode)
    assert switch.replaced == {"SiLU": 4}
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    with trainable(model):
        with switch.active():
            kernel_grad = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, model.lm_head.weight)[0]
        baseline_grad = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, model.lm_head.weight)[0]
    assert not torch.equal(kernel_grad, baseline_grad)
    assert not model.lm_head.weight.requires_grad


def test_job_names_say_the_workload(make_config):
    assert job_name(make_config("workload=decode", "prompt.length=2048")) == "bf16 rms T=2048 decode"
    assert job_name(make_config()) == "bf16 rms T=118"


def test_bundled_silu_backward_matches_torch_in_tritons_interpreter():
    """The bundled SiLU is a CUDA kernel; Triton's interpreter runs it on the CPU (tests/test_gpu.py: on CUDA)."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from conftest import load_bundled_silu
        silu = load_bundled_silu()
        for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
            x = (torch.randn(3, 1500, generator=torch.Generator().manual_seed(0)) * 4).to(dtype).requires_grad_()
            upstream = torch.randn(3, 1500, generator=torch.Generator().manual_seed(1)).to(dtype)
            (kernel_grad,) = torch.autograd.grad(silu(x), x, upstream)
            (torch_grad,) = torch.autograd.grad(torch.nn.functional.silu(x), x, upstream)
            torch.testing.assert_close(kernel_grad, torch_grad, rtol=tolerance, atol=tolerance)
            assert not torch.equal(kernel_grad, upstream)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                          env=os.environ | {"TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_train_per_layer_table_has_gradients(make_config, models, kernel_repos):
    result = job(make_config, models, "workload=train", "dtype=fp32",
                 *local_kernel("SiLU", kernel_repos["rounded_silu"], "RoundedSilu"),
                 *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
    assert result.status == RunStatus.measured, result.reason
    rows = list(csv.DictReader(io.StringIO(result.artifacts["layers/layers.csv"])))
    assert len(rows) == 13
    ratios = {row["layer"]: [] for row in rows}
    for row in rows:
        ratios[row["layer"]].append(float(row["grad_err_ratio"]))
        assert float(row["eager_grad_err"]) > 0
    assert all(r == 1.0 for r in ratios["RMSNorm"])  # exact: the same backward as eager
    assert all(r > 1.0 for r in ratios["SiLU"])  # rounded through bfloat16: a less accurate gradient
    assert result.metrics["layer_grad_err_ratio_max"] == max(ratios["SiLU"])
    norm_weights = [row for row in rows if row["layer"] == "RMSNorm"]
    assert all(float(row["eager_weight_grad_err"]) > 0 and float(row["weight_grad_err_ratio"]) == 1.0
               for row in norm_weights)
    assert all(row["weight_grad_err_ratio"] == "" for row in rows if row["layer"] == "SiLU")  # no parameters
    assert result.metrics["layer_weight_grad_err_ratio_max"] == 1.0


ONE_LAYER = "model.architecture.num_hidden_layers=1"
GRADIENT_COLUMNS = ("eager_grad_err", "kernel_grad_err", "grad_err_ratio", "eager_weight_grad_err",
                    "kernel_weight_grad_err", "weight_grad_err_ratio")


def test_a_backward_writing_into_its_upstream_gradient_leaves_the_per_layer_reference_intact(
        make_config, models, kernel_repos):
    """Liger's RMSNorm writes dX into dY in place. The same exact arithmetic with and without that gets the same
    per-layer gradient errors: the float64 backward does not run on what the kernel's backward left."""
    tables = {}
    for repo, layer in (("exact_rms", "ExactRMSNorm"), ("in_place_rms", "InPlaceRMSNorm")):
        result = job(make_config, models, "workload=train", "dtype=fp32", ONE_LAYER,
                     *local_kernel("RMSNorm", kernel_repos[repo], layer))
        assert result.status == RunStatus.measured, result.reason
        rows = list(csv.DictReader(io.StringIO(result.artifacts["layers/layers.csv"])))
        tables[repo] = [{column: float(row[column]) for column in GRADIENT_COLUMNS} for row in rows]
    assert len(tables["in_place_rms"]) == 3
    assert tables["in_place_rms"] == tables["exact_rms"]
    assert all(row["grad_err_ratio"] == 1.0 and row["weight_grad_err_ratio"] == 1.0 for row in tables["exact_rms"])


def test_a_wrong_weight_gradient_shows_in_the_per_layer_table(make_config, models, kernel_repos):
    """dX right, dW twice what it should be: the input gradients cannot tell, the weight gradients do."""
    result = job(make_config, models, "workload=train", "dtype=fp32", ONE_LAYER,
                 *local_kernel("RMSNorm", kernel_repos["wrong_weight_grad_rms"], "WrongWeightGradRMSNorm"))
    assert result.status == RunStatus.measured, result.reason
    rows = list(csv.DictReader(io.StringIO(result.artifacts["layers/layers.csv"])))
    assert result.metrics["layer_grad_err_ratio_max"] == 1.0
    assert all(float(row["weight_grad_err_ratio"]) > 1e3 for row in rows)
    assert result.metrics["layer_weight_grad_err_ratio_max"] == max(float(row["weight_grad_err_ratio"])
                                                                     for row in rows)


def test_dropout_is_off_in_training_so_an_exact_kernel_changes_nothing(make_config, models, kernel_repos):
    result = job(make_config, models, "workload=train", "dtype=fp32", ONE_LAYER,
                 "+model.architecture.attention_dropout=0.5",
                 *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["loss_diff"] == 0.0 and result.metrics["grad_max_rel_diff"] == 0.0
    assert result.metrics["grad_err_ratio"] == 1.0 and result.metrics["grad_err_baseline"] < 1e-5
    assert "LlamaAttention.attention_dropout=0.5" in result.tags["dropout"]


@pytest.mark.parametrize("workload", ["decode", "train"])
def test_non_finite_kernel_output_fails_with_where_and_logs_no_numerics(make_config, models, kernel_repos, workload):
    result = job(make_config, models, f"workload={workload}", "dtype=fp32",
                 *local_kernel("RMSNorm", kernel_repos["nan_rms"], "NanRMSNorm"))
    assert result.status == RunStatus.failed
    assert "kernel output has" in result.reason and "non-finite values, first at model.layers.0.input_layernorm" \
        in result.reason
    bookkeeping = {k for k in result.metrics if not k.startswith("phase_s_")}
    assert bookkeeping == {"kernelized_RMSNorm", "kernelized_total", "job_wall_s"}


@pytest.mark.parametrize("workload", ["decode", "train"])
def test_a_model_that_overflows_at_its_dtype_is_skipped_in_every_workload(make_config, models, workload):
    # Weights 50x too large: fp16 overflows inside the first layer, the float32 reference does not.
    result = run_job(make_config(*SHORT_PROMPT, "kernels=none", f"workload={workload}", "dtype=fp16",
                                 "+model.architecture.initializer_range=1.0", "model.architecture.num_hidden_layers=1"),
                     models)
    assert result.status == RunStatus.skipped, result.reason
    assert "the model itself overflows in torch.float16 at T=40: baseline output has" in result.reason
    assert "non-finite values, first at model.layers.0" in result.reason
    assert {k for k in result.metrics if not k.startswith("phase_s_")} == {"job_wall_s"}
    assert result.tags["forward_path"] == {"decode": "static_cache_step", "train": "training_step"}[workload]


@pytest.mark.parametrize("workload", ["prefill", "decode", "train"])
def test_a_job_leaves_no_tensor_in_cyclic_garbage(make_config, models, kernel_repos, workload):
    # On a GPU such garbage holds device memory until Python's collector happens to run: the next job's memory
    # figures (peak_mem_mb_<side>) would count it.
    gc.collect()
    gc.disable()  # only the job's own collections run
    try:
        result = job(make_config, models, f"workload={workload}", "dtype=fp32",
                     *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm"))
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert result.status == RunStatus.measured, result.reason
    assert left == []
