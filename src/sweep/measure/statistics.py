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
    baseline_ms: Sequence[float], kernel_ms: Sequence[float], blocks: Sequence[int], confidence: float = 0.95,
    rerun_sd: float = 0.0,
) -> SpeedupEstimate:
    """Geometric mean of the per-round ratios baseline/kernel, with a Student-t interval over the blocks' means,
    widened by `rerun_sd`.

    Pairing cancels what drifts between rounds (clocks, temperature, other tenants): each round's ratio compares
    two measurements taken back to back. Rounds within a block share one capture (graphs, buffers, allocations),
    so they are not independent of each other; the blocks are, and their scatter is the within-job error.
    `rerun_sd` is the relative standard deviation of a speedup from one job to the next that no job samples
    (the GPU's clock and thermal state over seconds): its variance is added to the blocks' (`calibrate_rerun_sd`
    estimates it from repeated jobs), so that the interval says where a rerun would land.
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
    standard_error = np.sqrt(means.var(ddof=1) / len(means) + np.log1p(rerun_sd) ** 2)
    half_width = t_quantile(len(means) - 1, confidence) * standard_error
    return SpeedupEstimate(float(np.exp(mean)), float(np.exp(mean - half_width)), float(np.exp(mean + half_width)))


def t_quantile(degrees_of_freedom: int, confidence: float) -> float:
    """The two-sided Student-t quantile of a `confidence` interval."""
    return float(stdtrit(degrees_of_freedom, 0.5 + confidence / 2))


def calibrate_rerun_sd(estimates: Sequence[SpeedupEstimate], blocks: int, confidence: float,
                       rerun_sd: float) -> float:
    """The `rerun_sd` that repeated jobs of one combination show: the variance of their log speedups beyond what
    their own blocks explain (method of moments, at least 0). Each job's within-job error is recovered from its
    interval, which was computed with `blocks` blocks at `confidence`, widened by the `rerun_sd` it ran with."""
    if len(estimates) < 3:
        raise ValueError(f"need three or more repeated jobs to estimate a rerun spread, got {len(estimates)}")
    logs = np.log([estimate.speedup for estimate in estimates])
    quantile = t_quantile(blocks - 1, confidence)
    within = [max(0.0, (np.log(e.high / e.low) / 2 / quantile) ** 2 - np.log1p(rerun_sd) ** 2) for e in estimates]
    return float(np.expm1(np.sqrt(max(0.0, logs.var(ddof=1) - np.mean(within)))))
