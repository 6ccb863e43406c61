"""Speed of light: each kernelized layer timed alone at the model's own shapes, eager against its kernel, beside a
device copy of the bytes the op must move (no memory-bound implementation of the op can beat that copy), and what
the layers' shares of the step predict for the model's speedup (Amdahl). docs/speed-of-light.md says how bytes are
counted and how to read the prediction's gap."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from statistics import median
from typing import Any

import torch
from omegaconf import OmegaConf

from sweep.config import TimingConfig, TimingMode
from sweep.measure.kernelization import KernelSwitch, layer_name
from sweep.measure.statistics import SpeedupEstimate
from sweep.measure.timing import (
    BASELINE,
    KERNEL,
    Clock,
    EagerRunner,
    GraphPlacement,
    GraphRunner,
    Runner,
    timed_sides,
)
from sweep.records.results import OPS_PLOT, JobResult

COPY = "copy"
# Where the device's copy bandwidth is measured: this many bytes moved (half read, half written), or 16 times the
# L2 cache where CUDA says how large it is, whichever is larger, so that the copy runs from and to device memory.
DEVICE_COPY_BYTES = 2**28
_L2_MULTIPLE = 16
# A device copy is not the fastest possible mover of bytes by a few percent (a kernel's own loads and stores may beat
# the copy's path), so an op is taken to move fewer bytes than counted only where its whole interval of copy time
# over op time lies above 1 + COPY_MARGIN.
COPY_MARGIN = 0.1


@dataclass
class OpCall:
    """One distinct input signature of a layer in the forward: the first module called with it, its inputs (copied
    when captured), and how many of the forward's calls of that layer had it."""

    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    count: int = 1


def captured_calls(modules: Iterable[torch.nn.Module], forward: Callable[[], object]) -> dict[str, list[OpCall]]:
    """Runs `forward` once with a forward pre-hook on each of `modules`: per layer name, its calls grouped by input
    signature (shapes, dtypes and the other arguments), each signature's first inputs copied."""
    calls: dict[str, dict[tuple, OpCall]] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        signatures = calls.setdefault(layer_name(module), {})
        key = _signature(args, kwargs)
        if key in signatures:
            signatures[key].count += 1
        else:
            signatures[key] = OpCall(module, tuple(_copied(a) for a in args),
                                     {name: _copied(value) for name, value in kwargs.items()})

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return {layer: list(signatures.values()) for layer, signatures in calls.items()}


def _signature(args: tuple, kwargs: dict) -> tuple:
    def describe(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype, value.device
        return repr(value)

    return tuple(map(describe, args)), tuple((name, describe(value)) for name, value in sorted(kwargs.items()))


def _copied(value: object) -> object:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _tensors(values: object) -> list[torch.Tensor]:
    """The tensors of an op's output or arguments: a tensor, or those of a tuple, list or mapping (one level)."""
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, Mapping):
        values = list(values.values())
    if isinstance(values, (tuple, list)):
        return [value for value in values if isinstance(value, torch.Tensor)]
    return []


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.nbytes for tensor in tensors)


def compute_bound(module: torch.nn.Module) -> bool:
    """The op multiplies by a weight matrix (a parameter of two or more dimensions, as a linear layer's): its time
    is bound by arithmetic, and a fraction of the copy bandwidth would mean nothing."""
    return any(parameter.ndim >= 2 for parameter in module.parameters())


class ForwardStep:
    """Every call the forward makes to one layer, each at its captured inputs, in inference mode: the op's timed
    unit in prefill and decode. Returns the last call's first output tensor (what a graph replay is checked on)."""

    def __init__(self, calls: list[OpCall]):
        self.calls = calls
        self.sizes = [(self._bytes(call), call.count) for call in calls]  # (bytes moved by one call, calls)

    def __call__(self, _: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            for call in self.calls:
                for _ in range(call.count):
                    output = call.module(*call.args, **call.kwargs)
        return _tensors(output)[0]

    @staticmethod
    def _bytes(call: OpCall) -> int:
        """Its inputs, parameters and buffers read once, its outputs written once."""
        with torch.inference_mode():
            output = call.module(*call.args, **call.kwargs)
        inputs = _tensors(call.args) + _tensors(call.kwargs)
        return _nbytes(inputs) + _state_bytes(call.module) + _nbytes(_tensors(output))


class TrainingStep:
    """Every call the forward makes to one layer, each forward and backward: the op's timed unit in train. Each
    backward gets a fresh copy of one fixed incoming gradient, since a kernel may write its input's gradient into
    the incoming one (Liger's RMSNorm does). Returns the last call's first gradient."""

    def __init__(self, calls: list[OpCall], generator: torch.Generator):
        self.calls = [_TrainingCall(call, generator) for call in calls]
        self.sizes = [(call.bytes, call.count) for call in self.calls]  # (bytes moved by one call, calls)

    def __call__(self, _: torch.Tensor) -> torch.Tensor:
        for call in self.calls:
            for _ in range(call.count):
                gradients = call.step()
        return next(gradient for gradient in gradients if gradient is not None)


class _TrainingCall:
    def __init__(self, call: OpCall, generator: torch.Generator):
        self.call, self.count = call, call.count
        self.args = tuple(_leaf(value) for value in call.args)
        self.kwargs = {name: _leaf(value) for name, value in call.kwargs.items()}
        inputs = _tensors(self.args) + _tensors(self.kwargs)
        parameters = [p for p in call.module.parameters() if p.requires_grad]
        self.leaves = [tensor for tensor in inputs if tensor.requires_grad] + parameters
        outputs = _tensors(call.module(*self.args, **self.kwargs))
        self.upstream = [torch.randn(output.shape, dtype=output.dtype, device=output.device, generator=generator)
                         for output in outputs if output.requires_grad]
        state, incoming = _state_bytes(call.module), _nbytes(self.upstream)
        forward = _nbytes(inputs) + state + _nbytes(outputs)
        copy_incoming = 2 * incoming  # read and written
        backward = _nbytes(inputs) + state + incoming + _nbytes(self.leaves)  # the leaves' gradients written
        self.bytes = forward + copy_incoming + backward  # RMSNorm: 7 tensors of x's size, 3 of the weight's

    def step(self) -> tuple[torch.Tensor | None, ...]:
        fresh = [gradient.clone() for gradient in self.upstream]
        outputs = [o for o in _tensors(self.call.module(*self.args, **self.kwargs)) if o.requires_grad]
        return torch.autograd.grad(outputs, self.leaves, fresh, allow_unused=True)


def _leaf(value: object) -> object:
    """A captured floating-point input as a leaf that asks for its gradient."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


def _state_bytes(module: torch.nn.Module) -> int:
    return _nbytes(module.parameters()) + _nbytes(module.buffers())


class CopyStep:
    """A device copy of the bytes each call of the layer moves, once per call: half of them read, half written.
    An elementwise kernel (`torch.neg` into a preallocated output), not torch's `clone` or `copy_`: on CUDA those
    are a cudaMemcpy, a memcpy node in a graph, which on an H200 took up to 1.9x as long as a kernel moving the same
    bytes (benchmarks/copy_limit.py), so Liger's RMSNorm came out faster than "the limit"."""

    def __init__(self, sizes: list[tuple[int, int]], device: torch.device, generator: torch.Generator):
        """`sizes`: (bytes moved by one call, calls) per signature."""
        self.copies = [(source, torch.empty_like(source), count)
                       for source, count in ((torch.rand(max(1, size // 8), device=device, generator=generator),
                                              count) for size, count in sizes)]

    def __call__(self, _: torch.Tensor) -> torch.Tensor:
        for source, target, count in self.copies:
            for _ in range(count):
                torch.neg(source, out=target)
        return target


@dataclass
class LayerOps:
    """What one layer's timed unit is: its steps, how many calls of the forward it holds and their bytes."""

    layer: str
    step: ForwardStep | TrainingStep
    calls: int
    bytes_per_call: float
    compute_bound: bool
    copy: CopyStep | None  # None where compute-bound


def layer_ops(calls: dict[str, list[OpCall]], training: bool, device: torch.device) -> list[LayerOps]:
    """Each layer's timed unit (`captured_calls`' signatures): forwards, or in `training` forwards and backwards.
    Their random tensors come from a generator of their own: a CUDA-graph capture that failed (the job then timed
    eagerly) leaves the process's default CUDA generator unusable, as torch ends its capture only on success."""
    generator = torch.Generator(device).manual_seed(0)
    layers = []
    for layer, signatures in calls.items():
        step = TrainingStep(signatures, generator) if training else ForwardStep(signatures)
        total = sum(call.count for call in signatures)
        bytes_per_call = sum(size * count for size, count in step.sizes) / total
        bound = any(compute_bound(call.module) for call in signatures)
        layers.append(LayerOps(layer, step, total, bytes_per_call, bound,
                               None if bound else CopyStep(step.sizes, device, generator)))
    return layers


def _side(side: str, layer: str) -> str:
    return f"{side}_{layer}"


def op_runners(layers: list[LayerOps], switch: KernelSwitch, mode: TimingMode,
               device: torch.device) -> dict[str, Runner]:
    """Per layer: its baseline and kernel steps (the kernels switched off or on before each, never while timed)
    and, where memory-bound, the copy of its bytes; graph sides share each block's memory pool. The steps read the
    inputs they captured: the runners' one input set is a placeholder they ignore."""
    sides = sum(3 if ops.copy is not None else 2 for ops in layers)
    placement = GraphPlacement(sides=sides)
    placeholder = [torch.empty(0, device=device)]

    def make(side: str, step: Callable[[torch.Tensor], torch.Tensor], select: Callable[[], None]) -> Runner:
        if mode == TimingMode.graph:
            return GraphRunner(step, placeholder, select, placement, side=side)
        return EagerRunner(step, placeholder, select)

    runners: dict[str, Runner] = {}
    for ops in layers:
        runners[_side(BASELINE, ops.layer)] = make(_side(BASELINE, ops.layer), ops.step, lambda: switch.select(False))
        runners[_side(KERNEL, ops.layer)] = make(_side(KERNEL, ops.layer), ops.step, lambda: switch.select(True))
        if ops.copy is not None:
            runners[_side(COPY, ops.layer)] = make(_side(COPY, ops.layer), ops.copy, lambda: None)
    return runners


def op_comparisons(layers: list[LayerOps]) -> dict[str, tuple[str, str]]:
    """`op_speedup_<Layer>` (baseline / kernel) and, where memory-bound, `op_sol_<Layer>` (copy / kernel) and
    `op_sol_baseline_<Layer>` (copy / baseline): 1 is at the limit."""
    comparisons = {}
    for ops in layers:
        baseline, kernel, copy = (_side(side, ops.layer) for side in (BASELINE, KERNEL, COPY))
        comparisons[f"op_speedup_{ops.layer}"] = (baseline, kernel)
        if ops.copy is not None:
            comparisons[f"op_sol_{ops.layer}"] = (copy, kernel)
            comparisons[f"op_sol_baseline_{ops.layer}"] = (copy, baseline)
    return comparisons


def measure_ops(switch: KernelSwitch, forward: Callable[[], object], training: bool, timing: TimingConfig,
                mode: TimingMode, device: torch.device, seed: int, result: JobResult) -> None:
    """Captures the kernelized layers' inputs from one run of `forward` (the baseline's step), times each layer
    alone in `mode` with `timing.ops_budget_s`, and logs the op, speed-of-light and Amdahl metrics and tags into
    `result` (its `latency_ms_baseline` and `speedup` already measured), with the plot of time against bytes."""
    switch.select(False)
    layers = layer_ops(captured_calls(switch.modules, forward), training, device)
    if not layers:
        return
    try:
        runners = op_runners(layers, switch, mode, device)
        budget = OmegaConf.merge(timing, {"budget_s": timing.ops_budget_s})
        rounds = timed_sides(runners, op_comparisons(layers), 1, budget, device, seed)
    finally:
        switch.select(False)
    del runners
    metrics, tags = result.metrics, result.tags
    metrics["device_copy_gbps"] = device_copy_gbps(device)
    if (peak := device_peak_gbps(device)) is not None:
        metrics["device_peak_gbps"] = peak
    shares = {}
    for ops in layers:
        ms = {side: median(rounds.ms[_side(side, ops.layer)]) / ops.calls
              for side in (BASELINE, KERNEL, COPY) if _side(side, ops.layer) in rounds.ms}
        metrics |= _layer_metrics(ops, ms, rounds.estimates, tags)
        shares[ops.layer] = ops.calls * ms[BASELINE] / metrics["latency_ms_baseline"]
        metrics[f"op_share_{ops.layer}"] = shares[ops.layer]
    speedups = {layer: metrics[f"op_speedup_{layer}"] for layer in shares}
    predicted = predicted_speedup(shares, speedups)
    if predicted is None:
        tags["prediction_note"] = (f"the layers timed alone take {sum(shares.values()):.2f} of the baseline step's "
                                   "time: more than the step itself, so Amdahl predicts nothing")
    else:
        metrics["predicted_speedup"] = predicted
        metrics["prediction_gap"] = metrics["speedup"] / predicted
    title = f"{result.name}: each layer alone, against a copy of its bytes"
    result.artifacts[OPS_PLOT] = ops_png(layers, metrics, title)


def _layer_metrics(ops: LayerOps, ms: dict[str, float], estimates: dict[str, SpeedupEstimate],
                   tags: dict[str, str]) -> dict[str, float]:
    layer = ops.layer
    metrics = {f"op_calls_{layer}": float(ops.calls), f"op_bytes_{layer}": ops.bytes_per_call,
               f"op_ms_baseline_{layer}": ms[BASELINE], f"op_ms_kernel_{layer}": ms[KERNEL]}
    metrics |= _estimate(f"op_speedup_{layer}", estimates[f"op_speedup_{layer}"])
    tags[f"op_bound_{layer}"] = "compute" if ops.compute_bound else "memory"
    if ops.copy is None:
        return metrics
    metrics[f"op_ms_copy_{layer}"] = ms[COPY]
    sides = {KERNEL: estimates[f"op_sol_{layer}"], BASELINE: estimates[f"op_sol_baseline_{layer}"]}
    above = {side: estimate for side, estimate in sides.items() if estimate.low > 1.0 + COPY_MARGIN}
    if above:  # faster than a copy of its bytes: it moves fewer bytes than counted
        tags[f"op_bytes_miscounted_{layer}"] = "; ".join(
            f"the {side} measured {estimate.speedup:.2f}x [{estimate.low:.2f}, {estimate.high:.2f}] as fast as a copy "
            f"of the {ops.bytes_per_call / 1e6:.3g} MB it was counted to move" for side, estimate in above.items()
        ) + ": it moves fewer bytes than counted (or skips work), so no share of the limit or GB/s is reported"
        return metrics
    metrics |= _estimate(f"op_sol_{layer}", sides[KERNEL]) | _estimate(f"op_sol_baseline_{layer}", sides[BASELINE])
    for side in (BASELINE, KERNEL):
        metrics[f"op_gbps_{side}_{layer}"] = ops.bytes_per_call / ms[side] / 1e6
    return metrics


def _estimate(name: str, estimate: SpeedupEstimate) -> dict[str, float]:
    return {name: estimate.speedup, f"{name}_ci_low": estimate.low, f"{name}_ci_high": estimate.high}


def predicted_speedup(shares: Mapping[str, float], speedups: Mapping[str, float]) -> float | None:
    """Amdahl: the step's speedup if each layer's share of the baseline step ran `speedups` times faster and the
    rest unchanged, 1 / (1 - sum(share) + sum(share / speedup)). None where the shares add up to the whole step or
    more: the layers alone took longer than the step they are part of."""
    total = sum(shares.values())
    if total >= 1.0:
        return None
    return 1.0 / (1.0 - total + sum(share / speedups[layer] for layer, share in shares.items()))


@cache
def device_copy_gbps(device: torch.device) -> float:
    """GB/s of a device copy well past the L2 cache (bytes read plus bytes written), measured once per process."""
    moved = DEVICE_COPY_BYTES
    if device.type == "cuda":
        moved = max(moved, _L2_MULTIPLE * torch.cuda.get_device_properties(device).L2_cache_size)
    source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    runner = EagerRunner(lambda _: target.copy_(source), [source])
    runner.run()  # the pages' first touch
    clock = Clock(device)
    ms = median(clock.measure(runner, 2) for _ in range(3))
    return moved / ms / 1e6


@cache
def device_peak_gbps(device: torch.device) -> float | None:
    """The theoretical memory bandwidth, 2 transfers per clock x memory clock x bus width, where CUDA reports them
    (the clock and the width NVML gives); None on the CPU and where they are not reported."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    clock_khz = getattr(properties, "memory_clock_rate", 0)
    bus_bits = getattr(properties, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def ops_png(layers: list[LayerOps], metrics: Mapping[str, float], title: str) -> bytes:
    """Time per call against bytes moved per call: one point per layer and side, the copies of the same bytes
    joined as the limit, and the device's copy bandwidth past L2 as a dotted line."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    copies = sorted((ops.bytes_per_call / 1e6, metrics[f"op_ms_copy_{ops.layer}"] * 1e3) for ops in layers
                    if f"op_ms_copy_{ops.layer}" in metrics)
    if copies:
        ax.plot(*zip(*copies), "k--", marker="s", label="copy of the same bytes (the limit)")
    for index, ops in enumerate(layers):
        colour, bound = f"C{index % 10}", " (compute-bound)" if ops.compute_bound else ""
        for side, marker in ((BASELINE, "o"), (KERNEL, "x")):
            ax.plot(ops.bytes_per_call / 1e6, metrics[f"op_ms_{side}_{ops.layer}"] * 1e3, marker, color=colour,
                    markersize=9, linestyle="none", label=f"{ops.layer} {side}{bound}")
    megabytes = [ops.bytes_per_call / 1e6 for ops in layers]
    span = [min(megabytes) / 2, max(megabytes) * 2]
    gbps = metrics["device_copy_gbps"]
    ax.plot(span, [size / gbps * 1e3 for size in span], "k:", label=f"copy past L2: {gbps:.0f} GB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Plain numbers at 1, 2, 3 and 5 of each decade: matplotlib's 10^k labels go through its slow TeX parser.
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "1235" else "")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.set_xlabel("MB moved per call")
    ax.set_ylabel("time per call (µs)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    figure.subplots_adjust(left=0.12, right=0.97, top=0.92, bottom=0.11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
