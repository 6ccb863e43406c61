"""Numerical forensics: which kernelized module a difference comes from, whether the kernel or eager is the
less accurate one, and whether the difference changes what the model generates."""

from __future__ import annotations

import copy
import csv
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch.utils.hooks import RemovableHandle

from sweep.measure.kernelization import KernelSwitch, layer_name
from sweep.measure.numerics import KeepPrecision, error_ratio, forward_logits


@dataclass(frozen=True)
class LayerRecord:
    index: int  # order of execution in the forward
    name: str
    layer: str
    eager_max_err: float  # isolated: the module's eager forward vs float64, on the same input
    eager_mean_err: float
    kernel_max_err: float  # isolated: the kernel forward vs float64, on the same input
    kernel_mean_err: float
    err_ratio: float  # kernel_mean_err / eager_mean_err
    propagated_max_diff: float  # output in the kernelized forward vs in the baseline forward


@dataclass
class _Calls:
    """The first input and output of each module, in the order the forward called them."""

    inputs: dict[torch.nn.Module, torch.Tensor]
    outputs: dict[torch.nn.Module, torch.Tensor]


@contextmanager
def _recording(modules: list[torch.nn.Module]) -> Iterator[_Calls]:
    calls = _Calls({}, {})

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module not in calls.outputs and args and isinstance(output, torch.Tensor):
            calls.inputs[module] = args[0]
            calls.outputs[module] = output

    handles: list[RemovableHandle] = [m.register_forward_hook(hook) for m in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def traced_logits(
    model: torch.nn.Module, switch: KernelSwitch, input_ids: torch.Tensor, use_cache: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[LayerRecord]]:
    """Baseline and kernel logits of one input, and the per-module attribution from the same two forwards."""
    modules = switch.modules
    with _recording(modules) as baseline_calls:
        baseline = forward_logits(model, input_ids, use_cache)
    with switch.active(), _recording(modules) as kernel_calls:
        kernel = forward_logits(model, input_ids, use_cache)
    names = {module: name for name, module in model.named_modules()}
    records = []
    for index, module in enumerate(baseline_calls.outputs):
        eager_err, kernel_err = _isolated_errors(module, switch, baseline_calls.inputs[module])
        propagated = _max_abs(kernel_calls.outputs[module], baseline_calls.outputs[module])
        records.append(LayerRecord(
            index=index, name=names.get(module, type(module).__name__), layer=layer_name(module),
            eager_max_err=eager_err[0], eager_mean_err=eager_err[1],
            kernel_max_err=kernel_err[0], kernel_mean_err=kernel_err[1],
            err_ratio=error_ratio(kernel_err[1], eager_err[1]), propagated_max_diff=propagated,
        ))
    return baseline, kernel, records


def first_nonfinite_module(
    model: torch.nn.Module, forward: Callable[[], object], after_forward: str = "the logits"
) -> str:
    """The first module, in the order modules finish during `forward()`, whose output holds NaN or Inf;
    `after_forward` when none does (the NaN comes later, e.g. from the loss or the backward)."""
    names = {module: name for name, module in model.named_modules()}
    found: list[str] = []

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        tensor = output[0] if isinstance(output, tuple) and output else output
        if not found and isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(
                torch.isfinite(tensor).all()):
            found.append(names[module] or type(module).__name__)

    handles = [module.register_forward_hook(hook) for module in names]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else after_forward


def _isolated_errors(
    module: torch.nn.Module, switch: KernelSwitch, module_input: torch.Tensor
) -> tuple[tuple[float, float], tuple[float, float]]:
    with torch.inference_mode():
        eager = type(module).forward(module, module_input)
        with switch.active():
            kernel = module(module_input)
        reference_module = copy.deepcopy(module).to(torch.float64)
        with KeepPrecision(torch.float64):
            reference = type(module).forward(reference_module, module_input.to(torch.float64))
    return _errors(eager, reference), _errors(kernel, reference)


def _errors(values: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = (values.to(torch.float64) - reference).abs()
    return float(diff.max()), float(diff.mean())


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def layer_metrics(records: list[LayerRecord]) -> dict[str, float]:
    first = next((r.index for r in records if r.propagated_max_diff != 0), -1)  # NaN counts as differing
    worst = max((r.err_ratio for r in records), default=1.0)
    return {"layer_err_ratio_max": worst, "first_divergent_layer": float(first)}


def distribution_metrics(baseline: torch.Tensor, kernel: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Mean KL(baseline || kernel) of the next-token distributions, and the mean overlap of their top-k."""
    log_p = torch.log_softmax(baseline.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(kernel.to(torch.float64), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
    top_p = baseline.topk(k, dim=-1).indices
    top_q = kernel.topk(k, dim=-1).indices
    overlap = (top_p.unsqueeze(-1) == top_q.unsqueeze(-2)).any(-1).float().mean(-1)
    return {"kl_div": float(kl.mean()), "top5_overlap": float(overlap.mean())}


def generation_agreement(baseline_tokens: torch.Tensor, kernel_tokens: torch.Tensor) -> dict[str, float]:
    """Fraction of identical generated tokens, and the first position where they differ (-1: none)."""
    same = (baseline_tokens == kernel_tokens).all(dim=0) if baseline_tokens.dim() > 1 else (
        baseline_tokens == kernel_tokens)
    mismatches = (~same).nonzero()
    first = int(mismatches[0]) if len(mismatches) else -1
    return {"gen_match": float(same.float().mean()), "gen_first_divergence": float(first)}


def greedy_tokens(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens after the prompt, never stopping early; shape (batch, new_tokens)."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )
    return out[:, input_ids.shape[1]:]


def generation_metrics(
    model: torch.nn.Module, switch: KernelSwitch, input_ids: torch.Tensor, baseline: torch.Tensor
) -> dict[str, float]:
    """The kernels' greedy tokens against the baseline's (`greedy_tokens` of the same prompt, e.g. from a cache)."""
    with switch.active():
        kernel = greedy_tokens(model, input_ids, baseline.shape[1])
    return generation_agreement(baseline, kernel)


def layers_csv(records: list[LayerRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LayerRecord.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(r) for r in records)
    return buffer.getvalue()


_PLOT_RATIO_CAP = 1e6


def layers_png(records: list[LayerRecord], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    index = [r.index for r in records]
    fig, (isolated, propagated) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for layer in sorted({r.layer for r in records}):
        mine = [r for r in records if r.layer == layer]
        ratios = [min(r.err_ratio, _PLOT_RATIO_CAP) for r in mine]  # inf: eager exact, kernel not
        isolated.plot([r.index for r in mine], ratios, "o-", label=layer)
        propagated.plot([r.index for r in mine], [r.propagated_max_diff for r in mine], "o-", label=layer)
    isolated.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    isolated.set_ylabel("isolated error ratio\n(kernel / eager vs float64)")
    isolated.set_yscale("log")
    # Plain numbers on the log axis: matplotlib's 10^k labels go through its TeX parser, a third of the plot's time.
    isolated.yaxis.set_major_formatter(ticker.LogFormatter())
    isolated.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    isolated.legend()
    propagated.set_ylabel("propagated max |diff|\n(kernelized vs baseline forward)")
    propagated.set_xlabel("kernelized module, in forward order")
    propagated.set_xticks(index)
    propagated.set_xticklabels([r.name.removeprefix("model.") for r in records], rotation=60, fontsize=6,
                               ha="right")
    fig.suptitle(title)
    # Fixed margins that fit the rotated module names: tight_layout measured every label and took 40% of the plot's
    # time, which every job pays.
    fig.subplots_adjust(left=0.13, right=0.98, top=0.92, bottom=0.25, hspace=0.08)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


@dataclass(frozen=True)
class LayerGradientRecord:
    index: int  # order of execution in the forward, as in LayerRecord
    eager_grad_err: float  # isolated: the gradient for the module's input, eager backward vs float64
    kernel_grad_err: float  # the same through the kernel's backward
    grad_err_ratio: float  # kernel_grad_err / eager_grad_err
    # The same for the gradients of the module's own parameters (e.g. a norm's weight); None: it has none.
    eager_weight_grad_err: float | None
    kernel_weight_grad_err: float | None
    weight_grad_err_ratio: float | None


def layer_gradients(
    model: torch.nn.Module, switch: KernelSwitch, input_ids: torch.Tensor, seed: int = 0
) -> list[LayerGradientRecord]:
    """Per kernelized module, in forward order: the gradients for its input and for its own parameters through
    eager and through the kernel, each against a float64 backward of the eager module, on the input the baseline
    forward gave it and one random upstream gradient (the same values for all three, each backward on its own
    copy: Liger's RMSNorm writes its input's gradient into the upstream one). Mean absolute errors."""
    with _recording(switch.modules) as calls:
        forward_logits(model, input_ids)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    records = []
    for index, module in enumerate(calls.outputs):
        module_input = calls.inputs[module]
        upstream = torch.randn(calls.outputs[module].shape, generator=generator, device=input_ids.device,
                               dtype=calls.outputs[module].dtype)
        eager = _gradients(partial(type(module).forward, module), module, module_input, upstream)
        with switch.active():
            kernel = _gradients(module, module, module_input, upstream)
        reference_module = copy.deepcopy(module).to(torch.float64)
        with KeepPrecision(torch.float64):
            reference = _gradients(partial(type(module).forward, reference_module), reference_module,
                                   module_input.to(torch.float64), upstream.to(torch.float64))
        has_weights = reference[1].numel() > 0
        records.append(LayerGradientRecord(
            index, *_gradient_errors(eager[0], kernel[0], reference[0]),
            *(_gradient_errors(eager[1], kernel[1], reference[1]) if has_weights else (None, None, None)),
        ))
    return records


def _gradients(
    forward: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module, module_input: torch.Tensor,
    upstream: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient for `module_input`, and those for `module`'s parameters flattened into one tensor (empty: it
    has none), of `forward(module_input)` for the gradient `upstream`. The backward gets its own copies of the
    input and of `upstream`: a kernel may write into either in place."""
    leaf = module_input.clone().requires_grad_(True)  # a copy outside inference mode: a tensor autograd can use
    parameters = list(module.parameters())
    with torch.enable_grad():
        gradient, *weight_gradients = torch.autograd.grad(forward(leaf), [leaf, *parameters], upstream.clone(),
                                                          materialize_grads=True)
    return gradient, torch.cat([g.flatten() for g in weight_gradients]) if weight_gradients else gradient.new_empty(0)


def _gradient_errors(eager: torch.Tensor, kernel: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """The eager and the kernel gradient's mean absolute errors against the reference, and their ratio."""
    eager_err, kernel_err = _errors(eager, reference)[1], _errors(kernel, reference)[1]
    return eager_err, kernel_err, error_ratio(kernel_err, eager_err)


def layer_gradient_metrics(gradients: list[LayerGradientRecord]) -> dict[str, float]:
    """The worst module's ratios: `layer_grad_err_ratio_max` (input gradients) and, when a kernelized module has
    parameters, `layer_weight_grad_err_ratio_max` (their gradients)."""
    metrics = {"layer_grad_err_ratio_max": max((g.grad_err_ratio for g in gradients), default=1.0)}
    weight_ratios = [g.weight_grad_err_ratio for g in gradients if g.weight_grad_err_ratio is not None]
    if weight_ratios:
        metrics["layer_weight_grad_err_ratio_max"] = max(weight_ratios)
    return metrics


def layers_with_gradients_csv(records: list[LayerRecord], gradients: list[LayerGradientRecord]) -> str:
    """The per-layer table (`layers_csv`) with the gradient columns of each module."""
    by_index = {g.index: asdict(g) for g in gradients}
    buffer = io.StringIO()
    fields = [*LayerRecord.__dataclass_fields__, *(f for f in LayerGradientRecord.__dataclass_fields__ if f != "index")]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(asdict(r) | by_index.get(r.index, {}) for r in records)
    return buffer.getvalue()
