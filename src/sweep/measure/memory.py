"""Peak CUDA memory of one block of work, from a reset peak, so that it never depends on what ran before it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sweep.measure.timing import Runner


@dataclass
class PeakMemory:
    peak_mb: float = 0.0  # the most torch's allocator held during the block
    above_held_mb: float = 0.0  # the same, less what was allocated when the block began (weights, caches)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Filled in when the block ends; stays zero off CUDA."""
    measured = PeakMemory()
    if device.type != "cuda":
        yield measured
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    held_before = torch.cuda.memory_allocated(device)
    yield measured
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    measured.peak_mb, measured.above_held_mb = peak / 2**20, (peak - held_before) / 2**20


def peak_memory_per_side(runners: Mapping[str, Runner], device: torch.device) -> dict[str, float]:
    """`peak_mem_mb_<side>`: what one eager step of each side needs above what was allocated before it
    (activations, gradients, workspaces; not the weights, caches or graphs), measured on a second step so that
    autotuning and lazily built workspaces are set up by the first and never counted. The same for every job of a
    group, whatever ran before it. Empty off CUDA."""
    if device.type != "cuda":
        return {}
    peaks = {}
    for side, runner in runners.items():
        runner.prepare(0)
        runner.run()
        with peak_memory(device) as measured:
            runner.run()
        peaks[f"peak_mem_mb_{side}"] = measured.above_held_mb
    return peaks
