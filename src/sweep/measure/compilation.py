"""The torch.compile baseline (`baseline=compile`): the model compiled with and without the kernels, each side's
compile time, graph breaks and recompilations, and the sides and comparisons that timing measures."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch._dynamo
import torch._inductor
from kernels import Mode
from torch._dynamo.utils import counters

from sweep.config import BaselineKind, UndeclaredKernels
from sweep.measure.kernelization import KernelSwitch, ResolvedKernel
from sweep.measure.timing import BASELINE, KERNEL, SPEEDUP, Comparison, TimedSide
from sweep.records.errors import JobConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]

COMPILED, COMPILED_KERNEL = "compiled", "compiled_kernel"

# name -> (side whose time is the numerator, side whose time is the denominator); > 1: the denominator is faster.
COMPARISONS: dict[str, Comparison] = {
    SPEEDUP: (BASELINE, KERNEL),  # the kernels against eager, as with baseline=eager
    "compile_speedup": (BASELINE, COMPILED),  # torch.compile against eager
    "kernel_vs_compile": (COMPILED, KERNEL),  # > 1: the kernels (in eager) beat torch.compile
    "compiled_kernel_speedup": (COMPILED, COMPILED_KERNEL),  # the kernels inside the compiled model
    "compiled_kernel_vs_eager": (BASELINE, COMPILED_KERNEL),  # the compiled model with the kernels against eager
}

COMPILABLE_WORKLOADS = ("prefill",)


def compiles(cfg: Any) -> bool:
    return BaselineKind(cfg.baseline.name) == BaselineKind.compile


def baseline_params(cfg: Any) -> dict[str, str]:
    """The param `baseline`, and torch.compile's options when it is `compile`."""
    params = {"baseline": BaselineKind(cfg.baseline.name).value}
    if compiles(cfg):
        options = cfg.baseline
        params |= {"compile_mode": str(options.mode), "compile_dynamic": str(options.dynamic),
                   "compile_fullgraph": str(options.fullgraph), "compile_backend": str(options.backend),
                   "compile_undeclared_kernels": UndeclaredKernels(options.undeclared_kernels).value}
    return params


def check_baseline(cfg: Any) -> None:
    """Before a model is touched: the compile baseline exists for the workloads that support it."""
    if problems := baseline_problems(cfg):
        raise JobConfigError("; ".join(problems))


def baseline_problems(cfg: Any) -> list[str]:
    """What is wrong with `baseline` for this job (checked at start-up, for every job of a sweep)."""
    if not compiles(cfg):
        return []
    problems = []
    if cfg.workload.name not in COMPILABLE_WORKLOADS:
        problems.append(f"baseline=compile is measured for workload={', '.join(COMPILABLE_WORKLOADS)}; "
                        f"run workload={cfg.workload.name} with baseline=eager")
    modes = list(torch._inductor.list_mode_options())
    if cfg.baseline.mode not in modes:
        problems.append(f"baseline.mode={cfg.baseline.mode} is not one of torch.compile's modes: {', '.join(modes)}")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.baseline.backend not in backends:
        problems.append(f"baseline.backend={cfg.baseline.backend} is not a torch.compile backend here: "
                        f"{', '.join(backends)}")
    elif cfg.baseline.backend != "inductor" and cfg.baseline.mode != "default":
        problems.append(f"baseline.mode={cfg.baseline.mode} is inductor's; use baseline.mode=default with "
                        f"baseline.backend={cfg.baseline.backend}")
    return problems


@dataclass
class DynamoCounts:
    """torch._dynamo's process-wide counters at one moment: graphs compiled and graph breaks."""

    graphs: int
    graph_breaks: int

    @classmethod
    def now(cls) -> DynamoCounts:
        return cls(int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values())))

    def since(self, earlier: DynamoCounts) -> DynamoCounts:
        return DynamoCounts(self.graphs - earlier.graphs, self.graph_breaks - earlier.graph_breaks)


def compile_kernel_switch(
    model: torch.nn.Module, kernels: list[ResolvedKernel], device: torch.device, eager_switch: KernelSwitch,
    undeclared: UndeclaredKernels,
) -> tuple[KernelSwitch | None, str]:
    """The kernels applied through kernelize's `INFERENCE | TORCH_COMPILE` mode, and a note; None when they cannot
    be. kernelize keeps the original forward of a layer that does not declare `can_torch_compile = True`: such a
    side would time the compiled model without kernels under another name, so it is not timed, unless
    `undeclared` is `compile`: then the inference forwards (`eager_switch`) are compiled, and the note says so."""
    undeclared_layers = []
    for kernel in kernels:
        layer = replace(kernel.repository, backend=device.type).load()  # as KernelSwitch.apply loads it
        if not getattr(layer, "can_torch_compile", False):
            undeclared_layers.append(f"{kernel.layer} ({kernel.identity})")
    if undeclared_layers and undeclared == UndeclaredKernels.compile:
        return eager_switch, (f"compiled although the kernel of {', '.join(undeclared_layers)} does not declare "
                              "can_torch_compile = True (baseline.undeclared_kernels=compile): its inference forward")
    if undeclared_layers:
        return None, (f"not timed: the kernel of {', '.join(undeclared_layers)} does not declare "
                      "can_torch_compile = True, so kernelize's TORCH_COMPILE mode keeps the original forward "
                      "(baseline.undeclared_kernels=compile compiles it anyway)")
    switch = KernelSwitch.apply(model, kernels, device, Mode.INFERENCE | Mode.TORCH_COMPILE)
    missing = [layer for layer, count in switch.replaced.items() if count == 0]
    if missing:
        return None, f"not timed: kernelize's TORCH_COMPILE mode replaced no {', '.join(missing)}"
    return switch, ""


@dataclass
class CompiledSides:
    """The compiled model's sides, compiled (first call, timed as `compile_s_*`) when they are made: the compiled
    model without kernels, and with the kernels where they can be compiled."""

    sides: list[TimedSide]
    deselect: Callable[[], None]  # every kernel forward off
    metrics: dict[str, float] = field(default_factory=dict)  # compile_s_*, compiled_graphs_*, graph_breaks_*
    tags: dict[str, str] = field(default_factory=dict)  # compile_triton_analysis_<side>, where it failed
    after_compile: DynamoCounts = field(default_factory=DynamoCounts.now)

    @property
    def names(self) -> list[str]:
        return [side.name for side in self.sides]

    def output(self, name: str, input_ids: torch.Tensor) -> torch.Tensor:
        """One side's output, with its kernels selected for the call only."""
        side = next(side for side in self.sides if side.name == name)
        side.select()
        try:
            return side.forward(input_ids)
        finally:
            self.deselect()

    def recompiles(self) -> int:
        """Graphs compiled since every side's first call: each is a recompilation (a guard failed)."""
        return DynamoCounts.now().since(self.after_compile).graphs

    @property
    def comparisons(self) -> dict[str, Comparison]:
        """The comparisons whose compiled sides exist (the conductor drops those without a kernel side)."""
        timed = {BASELINE, KERNEL, *self.names}
        return {name: pair for name, pair in COMPARISONS.items() if set(pair) <= timed}


def compile_sides(
    call: Callable[[torch.Tensor], torch.Tensor],
    call_with_kernels: Callable[[torch.Tensor], torch.Tensor],
    switch: KernelSwitch | None,
    compiled_kernel_switch: KernelSwitch | None,
    example: torch.Tensor,
    options: Any,
) -> CompiledSides:
    """Compiles `call` (the model without kernels) and, given a switch, `call_with_kernels` (the same call, a
    distinct function so that dynamo keeps each side's graphs apart) with torch.compile's `options`; each is
    called once on `example` under inference mode, its compile time and dynamo's counts logged per side."""
    torch._dynamo.reset()  # each job compiles afresh: its compile time is its own, and old graphs are freed
    compile_options = {"mode": None if options.mode == "default" else options.mode, "dynamic": options.dynamic,
                       "fullgraph": options.fullgraph, "backend": options.backend}

    def without_kernels() -> None:
        if switch is not None:
            switch.select(False)
        if compiled_kernel_switch is not None:
            compiled_kernel_switch.select(False)

    def with_kernels() -> None:
        without_kernels()
        assert compiled_kernel_switch is not None
        compiled_kernel_switch.select(True)

    made: list[TimedSide] = []
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    plan = [(COMPILED, call, without_kernels, "baseline")]
    if compiled_kernel_switch is not None:
        plan.append((COMPILED_KERNEL, call_with_kernels, with_kernels, "kernel"))
    for name, function, select, suffix in plan:
        compiled = torch.compile(function, **compile_options)
        forward = _inference(compiled)
        select()
        before = DynamoCounts.now()
        started = _clock(example.device)
        try:
            with triton_analysis_failures() as failures:
                forward(example)
        finally:
            without_kernels()
        metrics[f"compile_s_{suffix}"] = started()
        if failures:
            tags[f"compile_triton_analysis_{suffix}"] = triton_analysis_note(failures)
        counts = DynamoCounts.now().since(before)
        metrics[f"compiled_graphs_{suffix}"] = counts.graphs
        metrics[f"graph_breaks_{suffix}"] = counts.graph_breaks
        made.append(TimedSide(name, forward, select))
    return CompiledSides(made, without_kernels, metrics, tags)


# torch's warning when it cannot read a user-defined Triton kernel's accesses (the CompilationError).
TRITON_ANALYSIS_FAILED = "assuming every input is mutated"


@contextmanager
def triton_analysis_failures() -> Iterator[list[str]]:
    """The exceptions torch.compile met while analysing user-defined Triton kernels in the block, one line each.
    torch only logs them (logger `torch._dynamo`) and compiles on."""
    failures: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if TRITON_ANALYSIS_FAILED in record.getMessage():
                error = record.exc_info[1] if record.exc_info else None
                failures.append(_error_line(error) if error else record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        yield failures
    finally:
        logger.removeHandler(handler)


def triton_analysis_note(failures: list[str]) -> str:
    """The tag for the Triton kernel calls torch.compile could not analyse: each distinct error once."""
    return (f"torch.compile could not analyse {len(failures)} Triton kernel call(s) "
            f"({'; '.join(sorted(set(failures)))}): it kept them, but treats every input as mutated, which can "
            "cost copies")


def _error_line(error: BaseException) -> str:
    """One line for an exception whose message may quote source lines (Triton's CompilationError: the place
    first, the source, then what went wrong): its type, its first line and its last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{type(error).__name__} {lines[0]} {lines[-1]}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _inference(compiled: Forward) -> Forward:
    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(input_ids)

    return forward


def _clock(device: torch.device) -> Callable[[], float]:
    """Seconds from now to the call of the returned function, the device's work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()

    def stop() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return stop
