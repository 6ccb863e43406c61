"""Timing: baseline and kernel (or more sides) interleaved in rounds (A B / B A at random), rotated over input
sets, in a fixed number of blocks that each start from a fresh capture, with as many rounds as the budget allows,
decided before the first round. CUDA-graph replay or eager forwards."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from sweep.config import TimingConfig, rerun_sd_used
from sweep.measure.numerics import relative_error
from sweep.measure.statistics import SpeedupEstimate, blocked_speedup
from sweep.records.errors import GraphCheckError

Forward = Callable[[torch.Tensor], torch.Tensor]  # input ids -> logits of the side that is selected
Select = Callable[[], None]  # switches the model to one side (kernels on or off); never inside the timed region


class Runner(Protocol):
    def prepare(self, input_index: int) -> None:
        """Untimed set-up before a measurement (e.g. copy the input into a graph's static buffer)."""

    def run(self) -> None:
        """The timed work: one forward."""

    def renew(self) -> None:
        """Untimed: start again from what a new job would get (a new CUDA graph on fresh buffers)."""


def _no_switch() -> None:
    pass


@runtime_checkable
class Renewable(Protocol):
    """A forward that keeps state of its own between calls (decode's KV cache)."""

    def renew(self) -> None:
        """Untimed, with its side selected: build that state again, somewhere new in memory."""


def renew_state(forward: Forward) -> None:
    """Each block renews a `Renewable` forward's state, as a new job would: where that state lands would otherwise
    be fixed for the whole job, a difference between jobs that no block samples."""
    if isinstance(forward, Renewable):
        forward.renew()


class EagerRunner:
    def __init__(self, forward: Forward, inputs: list[torch.Tensor], select: Select = _no_switch):
        self._forward = forward
        self._inputs = inputs
        self._select = select
        self._current = inputs[0]

    def renew(self) -> None:
        """An eager forward allocates afresh every time: only a forward's own state is renewed."""
        self._select()
        renew_state(self._forward)

    def prepare(self, input_index: int) -> None:
        self._select()
        self._current = self._inputs[input_index]

    def run(self) -> None:
        self._forward(self._current)


# cuBLAS may pick other algorithms under capture, so a replay can differ from eager by rounding, and a deep
# random-init model amplifies rounding (seen: relative error 0.033 on the 8B shape in bf16, where other inputs'
# outputs were only ~0.33 away). The old rule (error < 1e-2, or < 0.1 x the distance to the other inputs'
# outputs) put its bar exactly there: the same job passed in one sweep and failed in the next. The question the
# check answers is "did the replay compute *this* input?", so it decides by nearest neighbour with a margin:
# the replay must be REPLAY_MARGIN times closer to its own input's eager output than to any other input's.
# A correct replay sits at about a tenth of that distance (rounding noise), a replay of a stale or freed input
# at about 1x: both are far from the bar at 1/3, so neither flips with noise. Errors below REPLAY_TOLERANCE
# are accepted outright (inputs whose outputs are nearly identical); a non-finite replay never is.
REPLAY_TOLERANCE = 1e-2
REPLAY_MARGIN = 3.0
PLACEMENT_STEP = 2**21  # the caching allocator's large-segment granularity (2 MiB)
PLACEMENT_STEPS = 64


def replay_accepted(own_error: float, other_errors: list[float]) -> bool:
    """Did a replay compute its own input? `own_error`: its relative error against that input's eager output;
    `other_errors`: against the other input sets' eager outputs."""
    if not math.isfinite(own_error):
        return False
    nearest_own = bool(other_errors) and own_error * REPLAY_MARGIN <= min(other_errors)
    return own_error <= REPLAY_TOLERANCE or nearest_own


_REPLAY_FIX = (": captured in a CUDA graph it computes something else (host values read at capture, a stream "
               "sync or an allocation the graph does not own); fix that, or time it with timing.mode=eager")


def check_replay(side: str, index: int, replayed: torch.Tensor, expected: list[torch.Tensor]) -> float:
    """The relative error of `side`'s graph replay of input set `index` against that set's eager output
    (`expected`: every input set's); GraphCheckError naming the side when the replay is not finite or did not
    compute its own input (`replay_accepted`)."""
    bad = int((~torch.isfinite(replayed)).sum())
    if bad:
        raise GraphCheckError(f"the {side} side's graph replay of input set {index} has {bad} non-finite "
                              f"values{_REPLAY_FIX}")
    error = relative_error(replayed, expected[index])
    others = [relative_error(replayed, e) for i, e in enumerate(expected) if i != index]
    if not replay_accepted(error, others):
        nearest_other = f", {min(others):.3g} from another input's" if others else ""
        raise GraphCheckError(f"the {side} side's graph replay of input set {index} is {error:.3g} (relative) from "
                              f"its eager forward{nearest_other}: it did not compute this input{_REPLAY_FIX}")
    return error


class GraphPlacement:
    """Where a block's captures go: a graph memory pool placed after a random offset (a multiple of PLACEMENT_STEP;
    without it the allocator would hand every capture the addresses the previous one freed). Shared by the `sides`
    runners of a block: the first of them to capture in a block gets a new pool at a new offset, the others join it.
    With `sides=1` each capture is placed on its own."""

    def __init__(self, sides: int):
        self._sides = sides
        self._rng = random.Random()
        self._captures = 0
        self._offset: torch.Tensor | None = None
        self._pool: object = None

    def next_pool(self) -> object:
        """The memory pool for the next capture."""
        if self._captures % self._sides == 0:
            self._offset = self._pool = None  # the previous block's offset goes before the next one is placed
            self._offset = torch.empty(self._rng.randrange(PLACEMENT_STEPS) * PLACEMENT_STEP, dtype=torch.uint8,
                                       device="cuda")
            self._pool = torch.cuda.graph_pool_handle()
        self._captures += 1
        return self._pool


class GraphRunner:
    """A CUDA graph of one forward. The static input and output stay referenced for the graph's lifetime:
    a replay reads the buffers it captured, and a freed input makes it read garbage. Graphs that share a memory
    pool (`GraphPlacement` with both sides) are never replayed at the same time, and only the replay just made
    is read (in the check): a replay may overwrite the other side's output, never its own."""

    def __init__(self, forward: Forward, inputs: list[torch.Tensor], select: Select = _no_switch,
                 placement: GraphPlacement | None = None, *, side: str):
        self.side = side  # named by the replay check: baseline, kernel, ...
        self._forward = forward
        self._inputs = inputs
        self._select = select
        self._placement = placement or GraphPlacement(sides=1)
        self._expected: list[torch.Tensor] = []  # each input set's eager output, computed at the first capture
        self.replay_error = 0.0
        self.renew()

    def renew(self) -> None:
        """Captures the forward again on fresh buffers: where a capture's buffers and memory pool land is part of
        what a rerun changes, so every block of rounds times a capture of its own, somewhere else in memory."""
        forward = self._forward
        self.graph = self.static_output = None  # the previous capture's memory goes before the next one
        pool = self._placement.next_pool()
        self._inputs = [ids.clone() for ids in self._inputs]
        self.static_input = self._inputs[0].clone()
        self._select()  # captured into the graph: replays need no switching
        renew_state(forward)
        first = not self._expected
        if first:  # compilation, cuBLAS handles, autotuning happen before capture, not in it
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(2):
                    forward(self.static_input)
            torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_output = forward(self.static_input)
        if first:  # the same inputs' eager outputs serve every later capture's check
            self._expected = [forward(ids) for ids in self._inputs]
        self.replay_error = max(self.replay_error, self._check())

    def _check(self) -> float:
        """Replays every input set; returns the largest relative error against the eager forward."""
        worst = 0.0
        for index in range(len(self._expected)):
            self.prepare(index)
            self.run()
            worst = max(worst, check_replay(self.side, index, self.static_output, self._expected))
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
            # Untimed lead-in: the device is still busy with it when the start event is recorded, so the timed
            # forwards run back to back. Without it the first launch's latency (tens of microseconds, the same for
            # both sides) was timed too, divided by `reps`: it pulled the ratio towards 1 by an amount that changed
            # with `reps`, which each job chose anew.
            runner.run()
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
    """The paired rounds of any number of sides: each side's milliseconds per round, and one estimate per
    comparison (numerator side's time over denominator side's, e.g. baseline / kernel = `speedup`)."""

    ms: dict[str, list[float]] = field(default_factory=dict)  # side name -> one measurement per round
    blocks: list[int] = field(default_factory=list)  # the block (capture) each round was timed in
    estimates: dict[str, SpeedupEstimate] = field(default_factory=dict)  # comparison name -> estimate
    reps: int = 1
    seconds: float = 0.0  # timed work only: the sum of every measurement, every side

    @property
    def rounds(self) -> int:
        return len(self.blocks)

    @property
    def baseline_ms(self) -> list[float]:
        return self.ms.get(BASELINE, [])

    @property
    def kernel_ms(self) -> list[float]:
        return self.ms.get(KERNEL, [])

    @property
    def estimate(self) -> SpeedupEstimate | None:
        return self.estimates.get(SPEEDUP)


BASELINE, KERNEL, SPEEDUP = "baseline", "kernel", "speedup"
Comparison = tuple[str, str]  # (side whose time is the numerator, side whose time is the denominator)
ProgressHook = Callable[[RoundsResult], None]


@dataclass
class TimedSide:
    """A side to time beside baseline and kernel (e.g. the compiled model): its forward, and how to select it
    (kernels on or off) before running it, outside the timed region."""

    name: str
    forward: Forward
    select: Select


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
    """Baseline and kernel: `timed_sides` with the comparison `speedup` = baseline / kernel. Without a kernel
    runner the baseline alone is timed, in the same blocks."""
    runners = {BASELINE: baseline} if kernel is None else {BASELINE: baseline, KERNEL: kernel}
    comparisons = {} if kernel is None else {SPEEDUP: (BASELINE, KERNEL)}
    return timed_sides(runners, comparisons, n_inputs, cfg, device, seed, progress, clock)


def timed_sides(
    runners: dict[str, Runner],
    comparisons: dict[str, Comparison],
    n_inputs: int,
    cfg: TimingConfig,
    device: torch.device,
    seed: int = 0,
    progress: ProgressHook | None = None,
    clock: Clock | None = None,
) -> RoundsResult:
    """`cfg.blocks` blocks of rounds, every block after the first on renewed runners; in each round every side is
    timed once, in random order, on the same input. The rounds per block are fixed before the first one, from one
    pilot measurement of each side, so that the blocks together spend about `cfg.budget_s` of timed work (at least
    one round per block). Nothing the rounds measure decides when they stop: stopping once the interval looks
    narrow enough would stop when it happens to be too narrow. One estimate per comparison.
    """
    clock = clock or Clock(device)
    names = list(runners)
    sides = [runners[name] for name in names]
    pilot_ms = []
    for runner in sides:
        for index in range(n_inputs):
            runner.prepare(index)
            for _ in range(cfg.warmup):
                runner.run()
        runner.prepare(0)
        pilot_ms.append(clock.measure(runner, 1))
    reps = max(1, min(100, math.ceil(cfg.min_measure_ms / max(min(pilot_ms), 1e-6))))
    round_s = reps * sum(pilot_ms) / 1e3
    rounds_per_block = max(1, round(cfg.budget_s / (cfg.blocks * max(round_s, 1e-9))))
    result = RoundsResult(ms={name: [] for name in names}, reps=reps)
    order_rng = random.Random(seed)
    for block in range(cfg.blocks):
        if block > 0:
            _renew(order_rng.sample(sides, len(sides)), cfg.warmup)
        for _ in range(rounds_per_block):
            index = result.rounds % n_inputs
            order = list(range(len(sides)))
            order_rng.shuffle(order)
            times = [0.0] * len(sides)
            for side in order:
                sides[side].prepare(index)
                times[side] = clock.measure(sides[side], reps)
            for name, ms in zip(names, times):
                result.ms[name].append(ms)
            result.blocks.append(block)
            result.seconds += sum(times) * reps / 1e3
        if progress is not None:
            progress(result)
    result.estimates = {
        name: blocked_speedup(result.ms[numerator], result.ms[denominator], result.blocks, cfg.confidence,
                               rerun_sd_used(cfg)[0])
        for name, (numerator, denominator) in comparisons.items()
    }
    return result


def _renew(sides: list[Runner], warmup: int) -> None:
    for runner in sides:
        runner.renew()
        runner.prepare(0)
        for _ in range(warmup):
            runner.run()
