"""CPU kernel repositories in the `kernels` library's local layout, written by the tests."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

# Same arithmetic as transformers' LlamaRMSNorm: bit-identical outputs.
EXACT_RMSNORM = """
    hidden = hidden_states.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden.to(hidden_states.dtype)
"""

# Different arithmetic: normalises in the input dtype, without the float32 upcast.
LOW_PRECISION_RMSNORM = """
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
"""

# Broken kernels: every output is NaN, or +inf.
NAN_RMSNORM = """
    return self.weight * hidden_states * float("nan")
"""

INF_RMSNORM = """
    return self.weight * hidden_states.abs() * float("inf") + 1.0
"""

EXACT_SILU = """
    return torch.nn.functional.silu(input)
"""

# Rounds its output through bfloat16: visibly different in float32 runs.
ROUNDED_SILU = """
    return torch.nn.functional.silu(input).to(torch.bfloat16).to(input.dtype)
"""


def rmsnorm_function(dx_into_upstream: bool = False, weight_grad_scale: float = 1.0) -> str:
    """Module source of `RMSNormFunction`: LlamaRMSNorm's arithmetic in an autograd Function whose backward is
    autograd's own of that forward, so exact both ways. `dx_into_upstream`: the backward writes the input's
    gradient into the incoming gradient and returns that tensor, like Liger's RMSNorm (in_place=True).
    `weight_grad_scale`: the weight's gradient comes back scaled (a wrong dW with a right dX)."""
    dx = "grad_output.copy_(dx)" if dx_into_upstream else "dx"
    dw = "dw" if weight_grad_scale == 1.0 else f"dw * {weight_grad_scale}"
    return f"""
def _rms_norm(hidden_states, weight, eps):
    hidden = hidden_states.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(hidden_states.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, weight, eps):
        ctx.save_for_backward(hidden_states, weight)
        ctx.eps = eps
        return _rms_norm(hidden_states, weight, eps)

    @staticmethod
    def backward(ctx, grad_output):
        leaves = tuple(t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            dx, dw = torch.autograd.grad(_rms_norm(*leaves, ctx.eps), leaves, grad_output)
        return {dx}, {dw}, None
"""


RMSNORM_FUNCTION_CALL = """
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
"""


def write_kernel_repo(root: Path, name: str, layer: str, body: str, argument: str = "hidden_states",
                      variant: str = "torch-cpu", has_backward: bool | None = None,
                      can_torch_compile: bool | None = None, module_source: str = "",
                      python_depends: tuple[str, ...] = ()) -> Path:
    """A kernel repository at root/name whose layer `layer` has `forward(self, argument)` running `body`;
    `has_backward` and `can_torch_compile` are declared on the layer when given; `module_source` (e.g.
    `rmsnorm_function()`) is defined above the layer; `python_depends` are the dependencies its metadata declares
    (names `kernels` knows, e.g. "einops"), which `kernels` checks are installed before importing it."""
    variant_dir = root / name / "build" / variant
    variant_dir.mkdir(parents=True)
    backend = "cpu" if variant == "torch-cpu" else variant.removeprefix("torch-")
    metadata = {"name": name.replace("_", "-"), "id": f"test_{name}", "version": 1, "license": "MIT",
                "python-depends": list(python_depends), "backend": {"type": backend}}
    (variant_dir / "metadata.json").write_text(json.dumps(metadata))
    flags = {"has_backward": has_backward, "can_torch_compile": can_torch_compile}
    declaration = "".join(f"    {flag} = {value}\n\n" for flag, value in flags.items() if value is not None)
    forward_body = textwrap.indent(textwrap.dedent(body).strip(), " " * 8)
    source = (
        f"import torch\n\n{module_source}\n\n"
        f"class {layer}(torch.nn.Module):\n{declaration}    def forward(self, {argument}):\n"
        f"{forward_body}\n\n\n"
        f"class layers:\n    {layer} = {layer}\n"
    )
    (variant_dir / "__init__.py").write_text(source)
    return root / name


def failing_rmsnorm(error: str, at_call: int) -> str:
    """Exact RMSNorm whose `at_call`-th forward (counted over the process, from 1) raises `error`, a Python
    expression such as `torch.OutOfMemoryError("...")`; later calls raise it too. The counter lives in the
    kernel's module, which `kernels` imports once per process."""
    return f"""
    global _calls
    _calls = globals().get("_calls", 0) + 1
    if _calls >= {at_call}:
        raise {error}
""" + EXACT_RMSNORM
