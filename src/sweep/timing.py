"""Timing: baseline and kernel interleaved in rounds (A B / B A at random), rotated over input sets, in blocks that
each start from a fresh capture, until the speedup's interval is narrow enough or the budget is spent. CUDA-graph
replay or eager forwards."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .config import TimingConfig
from .numerics import relative_error
from .statistics import SpeedupEstimate, blocked_speedup

Forward = Callable[[torch.Tensor], torch.Tensor]  # input ids -> logits, with its side's kernels switched


class Runner(Protocol):
    def prepare(self, input_index: int) -> None:
        """Untimed set-up before a measurement (e.g. copy the input into a graph's static buffer)."""

    def run(self) -> None:
        """The timed work: one forward."""

    def renew(self) -> None:
        """Untimed: start again from what a new job would get (a new CUDA graph on fresh buffers)."""


class EagerRunner:
    def __init__(self, forward: Forward, inputs: list[torch.Tensor]):
        self._forward = forward
        self._inputs = inputs
        self._current = inputs[0]

    def renew(self) -> None:
        """An eager forward allocates afresh every time: nothing to renew."""

    def prepare(self, input_index: int) -> None:
        self._current = self._inputs[input_index]

    def run(self) -> None:
        self._forward(self._current)


class GraphCheckError(RuntimeError):
    """A graph replay disagreed with the eager forward: its timing would measure something else."""


# cuBLAS may pick other algorithms under capture, so a replay can differ from eager by rounding, and a deep
# random-init model amplifies rounding (seen: relative error 0.03 on the 8B shape in bf16). A replay that read
# a wrong or freed input is as far from its own eager output as from another input's (order 1).
REPLAY_TOLERANCE = 1e-2
REPLAY_SEPARATION = 0.1
PLACEMENT_STEP = 2**21  # the caching allocator's large-segment granularity (2 MiB)


class GraphRunner:
    """A CUDA graph of one forward. The static input and output stay referenced for the graph's lifetime:
    a replay reads the buffers it captured, and a freed input makes it read garbage."""

    def __init__(self, forward: Forward, inputs: list[torch.Tensor]):
        self._forward = forward
        self._inputs = inputs
        self._placement = random.Random()
        self.replay_error = 0.0
        self.renew()

    def renew(self) -> None:
        """Captures the forward again on fresh buffers: where a capture's buffers and memory pool land is part of
        what a rerun changes, so every block of rounds times a capture of its own, somewhere else in memory."""
        forward = self._forward
        self.graph = self.static_output = None  # the previous capture's memory pool goes before the next one
        # Without an offset the allocator would hand every capture the addresses the previous one freed.
        self._offset = torch.empty(self._placement.randrange(64) * PLACEMENT_STEP, dtype=torch.uint8, device="cuda")
        self._inputs = [ids.clone() for ids in self._inputs]
        self.static_input = self._inputs[0].clone()
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):  # warm-up outside capture: compilation, cuBLAS handles, autotuning
            for _ in range(2):
                forward(self.static_input)
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = forward(self.static_input)
        self.replay_error = max(self.replay_error, self._check_against(forward))

    def _check_against(self, forward: Forward) -> float:
        """Replays every input set; returns the largest relative error against the eager forward."""
        eager = [forward(ids) for ids in self._inputs]
        worst = 0.0
        for index, expected in enumerate(eager):
            self.prepare(index)
            self.run()
            error = relative_error(self.static_output, expected)
            others = [relative_error(self.static_output, e) for i, e in enumerate(eager) if i != index]
            separated = bool(others) and error < REPLAY_SEPARATION * min(others)
            if error > REPLAY_TOLERANCE and not separated:
                raise GraphCheckError(
                    f"graph replay of input set {index} differs from the eager forward (relative error {error:.3g})"
                )
            worst = max(worst, error)
        return worst

    def prepare(self, input_index: int) -> None:
        self.static_input.copy_(self._inputs[input_index])

    def run(self) -> None:
        self.graph.replay()


class Clock:
    """Milliseconds per forward of a runner: device events on CUDA, the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def measure(self, runner: Runner, reps: int) -> float:
        if self._cuda:
            self._start.record()
            for _ in range(reps):
                runner.run()
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / reps
        start = time.perf_counter()
        for _ in range(reps):
            runner.run()
        return (time.perf_counter() - start) * 1e3 / reps


@dataclass
class RoundsResult:
    baseline_ms: list[float] = field(default_factory=list)
    kernel_ms: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # the block (capture) each round was timed in
    estimate: SpeedupEstimate | None = None
    reps: int = 1
    seconds: float = 0.0  # timed work only: the sum of every measurement, both sides

    @property
    def rounds(self) -> int:
        return len(self.baseline_ms)


ProgressHook = Callable[[RoundsResult], None]


def timed_rounds(
    baseline: Runner,
    kernel: Runner | None,
    n_inputs: int,
    cfg: TimingConfig,
    device: torch.device,
    seed: int = 0,
    progress: ProgressHook | None = None,
    clock: Clock | None = None,
) -> RoundsResult:
    """Blocks of `cfg.block_rounds` paired rounds, each block on renewed runners, until `cfg.target_ci` is met
    (checked after each block, from `cfg.min_rounds` on), `cfg.budget_s` of timed work is spent, or
    `cfg.max_rounds` is reached.

    Without a kernel runner the baseline alone is timed for `cfg.min_rounds` rounds.
    """
    clock = clock or Clock(device)
    sides = [baseline] if kernel is None else [baseline, kernel]
    for runner in sides:
        for index in range(n_inputs):
            runner.prepare(index)
            for _ in range(cfg.warmup):
                runner.run()
    baseline.prepare(0)
    single_ms = clock.measure(baseline, 1)
    result = RoundsResult(reps=max(1, min(100, math.ceil(cfg.min_measure_ms / max(single_ms, 1e-6)))))
    order_rng = random.Random(seed)
    max_rounds = cfg.min_rounds if kernel is None else cfg.max_rounds
    block = 0
    while result.rounds < max_rounds:
        if block > 0:
            _renew(order_rng.sample(sides, len(sides)), cfg.warmup)
        for _ in range(min(cfg.block_rounds, max_rounds - result.rounds)):
            index = result.rounds % n_inputs
            order = list(range(len(sides)))
            order_rng.shuffle(order)
            times = [0.0] * len(sides)
            for side in order:
                sides[side].prepare(index)
                times[side] = clock.measure(sides[side], result.reps)
            result.baseline_ms.append(times[0])
            if kernel is not None:
                result.kernel_ms.append(times[1])
            result.blocks.append(block)
            result.seconds += sum(times) * result.reps / 1e3
        block += 1
        if progress is not None:
            progress(result)
        if kernel is not None and _should_stop(result, cfg):
            break
        if kernel is None and result.seconds > cfg.budget_s:
            break
    if kernel is not None and result.estimate is None:
        result.estimate = blocked_speedup(result.baseline_ms, result.kernel_ms, result.blocks, cfg.confidence)
    return result


def _renew(sides: list[Runner], warmup: int) -> None:
    for runner in sides:
        runner.renew()
        runner.prepare(0)
        for _ in range(warmup):
            runner.run()


def _should_stop(result: RoundsResult, cfg: TimingConfig) -> bool:
    enough_blocks = len(set(result.blocks)) >= 2
    out_of_budget = result.seconds > cfg.budget_s and enough_blocks
    if not (out_of_budget or (result.rounds >= cfg.min_rounds and enough_blocks) or result.rounds >= cfg.max_rounds):
        return False
    result.estimate = blocked_speedup(result.baseline_ms, result.kernel_ms, result.blocks, cfg.confidence)
    return out_of_budget or result.estimate.relative_half_width <= cfg.target_ci
