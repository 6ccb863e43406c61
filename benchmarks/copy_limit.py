"""Which device copy is the limit an op is held to? At tiny-llama's RMSNorm shapes (bf16, hidden 1024), one set of
paired rounds with sweep's own timing (CUDA graphs, fresh captures per block, intervals) times transformers' eager
RMSNorm, Liger's, and copies of the bytes the op was counted to move (`sweep.measure.ops`: input read, weight read,
output written), made four ways:
- clone: torch's `clone` (same dtype and contiguous: a cudaMemcpy, a memcpy node in a graph), allocating as an op does;
- copy_: `copy_` into a preallocated tensor (the same memcpy);
- elementwise: `torch.neg` into a preallocated tensor (an ATen elementwise kernel: vector loads and stores on the SMs);
- triton: a Triton kernel that loads and stores blocks of 16 KiB.
With `--calls 9` each graph runs the op 9 times (the model's 9 RMSNorm calls, as sweep times a layer), with
`--calls 1` once (one module per replay: a graph launch per call).

    python benchmarks/copy_limit.py --lengths 118 2048 8192 --calls 9 1
"""

from __future__ import annotations

import argparse
from statistics import median

import torch
import triton
import triton.language as tl
from liger_kernel.transformers.rms_norm import LigerRMSNorm
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sweep.config import TimingConfig
from sweep.measure.ops import ForwardStep, OpCall
from sweep.measure.timing import GraphPlacement, GraphRunner, timed_sides

HIDDEN = 1024
BLOCK = 8192  # elements of 2 bytes


@triton.jit
def _copy_kernel(source, target, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(target + offsets, tl.load(source + offsets, mask=mask), mask=mask)


def copies(moved: int, calls: int, device: torch.device) -> dict[str, object]:
    """Steps that move `moved` bytes per call (half read, half written), `calls` times."""
    source = torch.rand(moved // 4, device=device).to(torch.bfloat16)
    target = torch.empty_like(source)
    grid = (triton.cdiv(source.numel(), BLOCK),)

    def repeated(copy):
        def step(_: torch.Tensor) -> torch.Tensor:
            for _ in range(calls):
                out = copy()
            return out
        return step

    return {"clone": repeated(source.clone), "copy_": repeated(lambda: target.copy_(source)),
            "elementwise": repeated(lambda: torch.neg(source, out=target)),
            "triton": repeated(lambda: (_copy_kernel[grid](source, target, source.numel(), BLOCK=BLOCK), target)[1])}


def measure(length: int, calls: int, budget_s: float, device: torch.device) -> dict[str, object]:
    x = torch.randn(1, length, HIDDEN, device=device, dtype=torch.bfloat16)
    modules = {"eager": LlamaRMSNorm(HIDDEN, 1e-6), "liger": LigerRMSNorm(HIDDEN, 1e-6)}
    steps = {}
    for name, module in modules.items():
        module.to(device, torch.bfloat16)
        step = ForwardStep([OpCall(module, (x,), {}, count=calls)])
        steps[name] = step
    moved = step.sizes[0][0]
    steps |= copies(moved, calls, device)
    placement = GraphPlacement(sides=len(steps))
    placeholder = [torch.zeros(1, device=device)]
    runners = {name: GraphRunner(step, placeholder, placement=placement, side=name) for name, step in steps.items()}
    comparisons = {f"sol_{copy}": (copy, "liger") for copy in ("clone", "copy_", "elementwise", "triton")}
    comparisons["op_speedup"] = ("eager", "liger")
    timing = OmegaConf.merge(OmegaConf.structured(TimingConfig), {"budget_s": budget_s})
    rounds = timed_sides(runners, comparisons, 1, timing, device)
    us = {name: median(ms) / calls * 1e3 for name, ms in rounds.ms.items()}
    return {"T": length, "calls": calls, "MB": moved / 1e6, **us,
            **{name: f"{e.speedup:.2f} [{e.low:.2f}, {e.high:.2f}]" for name, e in rounds.estimates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[118, 2048, 8192])
    parser.add_argument("--calls", type=int, nargs="+", default=[9, 1])
    parser.add_argument("--budget-s", type=float, default=1.0)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = [measure(length, calls, args.budget_s, device) for calls in args.calls for length in args.lengths]
    columns = list(rows[0])
    print("µs per call; sol_<copy>: the copy's time over Liger's (1: Liger at that copy's speed)\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
