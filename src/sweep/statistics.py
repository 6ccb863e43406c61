"""The speedup and its confidence interval, from paired timings grouped in blocks (one capture per block)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Student's t quantile; scipy.stats would add ~0.5 s of imports to every sweep's start.
from scipy.special import stdtrit


@dataclass(frozen=True)
class SpeedupEstimate:
    speedup: float  # baseline time / kernel time; above 1 means the kernel is faster
    low: float
    high: float

    @property
    def relative_half_width(self) -> float:
        return (self.high - self.low) / 2 / self.speedup

    @property
    def significant(self) -> bool:
        """The interval excludes 1: the kernel is measurably faster (or slower)."""
        return self.low > 1.0 or self.high < 1.0


def blocked_speedup(
    baseline_ms: Sequence[float], kernel_ms: Sequence[float], blocks: Sequence[int], confidence: float = 0.95
) -> SpeedupEstimate:
    """Geometric mean of the per-round ratios baseline/kernel, with a Student-t interval over the blocks' means.

    Pairing cancels what drifts between rounds (clocks, temperature, other tenants): each round's ratio compares
    two measurements taken back to back. Rounds within a block share one capture (graphs, buffers, allocations),
    so they are not independent of each other; the blocks are, and the interval is computed from them.
    """
    if not len(baseline_ms) == len(kernel_ms) == len(blocks):
        raise ValueError(f"need one block index per paired round, got {len(baseline_ms)}, {len(kernel_ms)}, "
                         f"{len(blocks)}")
    log_ratios = np.log(np.asarray(baseline_ms, dtype=np.float64) / np.asarray(kernel_ms, dtype=np.float64))
    block_ids = np.asarray(blocks)
    means = np.array([log_ratios[block_ids == block].mean() for block in np.unique(block_ids)])
    if len(means) < 2:
        raise ValueError(f"need two or more blocks of rounds, got {len(means)}")
    mean = means.mean()
    half_width = stdtrit(len(means) - 1, 0.5 + confidence / 2) * means.std(ddof=1) / np.sqrt(len(means))
    return SpeedupEstimate(float(np.exp(mean)), float(np.exp(mean - half_width)), float(np.exp(mean + half_width)))
