"""Numerics on identical inputs: kernel vs eager in the run's dtype, and both vs a higher-precision reference."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

from sweep.measure.kernelization import KernelSwitch


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
    """The call users make, `model(input_ids=...)`, with the model's own `use_cache` unless one is given.

    No attention mask: for an unpadded prompt transformers drops an all-ones mask (SDPA's causal path), except
    under CUDA-graph capture, where it cannot read the mask's values and would build a dense mask instead."""
    with torch.inference_mode():
        return model(input_ids=input_ids, **forward_options(use_cache)).logits


def forward_options(use_cache: bool | None) -> dict[str, bool]:
    """The keyword arguments of the forward users make besides the input: `use_cache` only when one is given."""
    return {} if use_cache is None else {"use_cache": use_cache}


def forward_path(use_cache: bool | None) -> str:
    """The tag naming the forward that `forward_logits` runs."""
    return "default" if use_cache is None else f"use_cache={use_cache}"


def nonfinite_count(values: torch.Tensor | Iterable[torch.Tensor]) -> int:
    tensors = [values] if isinstance(values, torch.Tensor) else values
    return sum(int((~torch.isfinite(tensor)).sum()) for tensor in tensors)


_LOWERING_METHODS = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
                     torch.Tensor.bfloat16: torch.bfloat16}


class KeepPrecision(TorchFunctionMode):
    """Evaluates code written for low precision entirely in `dtype`: casts of `dtype` tensors to a lower
    floating precision keep `dtype`, and so does an op on a `dtype` tensor asked for a lower precision result
    (`dtype=` keyword). transformers' RMSNorm casts its input to float32 and its eager attention takes
    `softmax(..., dtype=torch.float32)`, so without this a "float64" forward would still run those in float32."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype == self.dtype:
            kwargs = {k: self._keep(v) for k, v in kwargs.items()}
            if func is torch.Tensor.to:
                args = tuple(self._keep(a) for a in args)
            elif func in _LOWERING_METHODS and self._keep(_LOWERING_METHODS[func]) is self.dtype:
                return args[0]
        return func(*args, **kwargs)

    def _keep(self, value: object) -> object:
        if isinstance(value, torch.dtype) and value.is_floating_point and value.itemsize < self.dtype.itemsize:
            return self.dtype
        return value


@contextmanager
def reference_precision(model: torch.nn.Module, reference_dtype: torch.dtype) -> Iterator[None]:
    """Inside, the same weights run eagerly in `reference_dtype`, cast in place to keep one copy of the weights:
    the model is cast up, and on exit every parameter and buffer is cast back to its own dtype (an exact round
    trip: every low-precision value is representable in the higher precision; buffers that transformers keeps in
    float32, like RoPE's `inv_freq`, go back to float32, not to the run's dtype)."""
    dtypes = _tensor_dtypes(model)
    model.to(reference_dtype)
    try:
        with KeepPrecision(reference_dtype):
            yield
    finally:
        _restore_dtypes(model, dtypes)
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.empty_cache()


def reference_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, reference_dtype: torch.dtype, use_cache: bool | None = None
) -> torch.Tensor:
    """The eager forward of the same weights in `reference_dtype` (see `reference_precision`), returned as
    float64 on the host."""
    with reference_precision(model, reference_dtype):
        return forward_logits(model, input_ids, use_cache).to(device="cpu", dtype=torch.float64)


def _tensor_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: tensor.dtype for name, tensor in tensors}


def _restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.dtype != dtypes[name]:
            parameter.data = parameter.data.to(dtypes[name])
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if buffer.dtype != dtypes[name]:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, buffer.to(dtypes[name]))


def relative_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    values = values.to(device=reference.device, dtype=torch.float64)
    return float(torch.linalg.vector_norm(values - reference) / torch.linalg.vector_norm(reference))


def error_ratio(kernel_error: float, baseline_error: float) -> float:
    """kernel error / eager error; 1 when both are exact, inf when only the kernel is off."""
    if baseline_error == 0.0:
        return 1.0 if kernel_error == 0.0 else float("inf")
    return kernel_error / baseline_error


def ulp_distance(diff: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`diff` in units of `dtype`'s spacing at `magnitude`, element-wise: 0.125 at a logit of 20 in bf16 is one
    step. Magnitudes below the smallest normal number count at its spacing."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(magnitude.abs().clamp_min(info.smallest_normal)))
    return diff / (torch.exp2(exponent) * info.eps)


def compare_outputs(baseline: torch.Tensor, kernel: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The output metrics of the MLflow contract for one pair of logits of the same inputs."""
    diff = (kernel.double() - baseline.double()).abs()
    # The worst element in steps of its own baseline value's spacing, not the steps at the largest |diff|. A logit
    # near zero is a sum of terms of the logits' usual size, rounded at that size: it counts at the logits' root
    # mean square (at its own, tiny spacing a difference of 0.2 read as ~1e38 steps).
    usual = baseline.double().square().mean().sqrt()
    ulp = ulp_distance(diff, baseline.double().abs().clamp_min(usual), baseline.dtype).max()
    ref_err_baseline = relative_error(baseline, reference)
    ref_err_kernel = relative_error(kernel, reference)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff_ulp": float(ulp),
        "argmax_match": float((kernel.argmax(-1) == baseline.argmax(-1)).float().mean()),
        "ref_err_baseline": ref_err_baseline,
        "ref_err_kernel": ref_err_kernel,
        "err_ratio": error_ratio(ref_err_kernel, ref_err_baseline),
    }


def kernel_and_baseline_logits(
    model: torch.nn.Module, switch: KernelSwitch, input_ids: torch.Tensor, use_cache: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    baseline = forward_logits(model, input_ids, use_cache)
    with switch.active():
        kernel = forward_logits(model, input_ids, use_cache)
    return baseline, kernel
