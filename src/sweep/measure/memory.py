"""Peak CUDA memory of one block of work, from a reset peak, so that it never depends on what ran before it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


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
