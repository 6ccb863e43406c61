"""The paired speedup and its confidence interval, from per-round timings of baseline and kernel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


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


def paired_speedup(
    baseline_ms: Sequence[float], kernel_ms: Sequence[float], confidence: float = 0.95, seed: int = 0
) -> SpeedupEstimate:
    """Geometric mean of the per-round ratios, with a BCa bootstrap interval over rounds.

    Pairing cancels what drifts between rounds (clocks, temperature, other tenants): each round's ratio
    compares two measurements taken back to back.
    """
    if len(baseline_ms) != len(kernel_ms) or len(baseline_ms) < 2:
        raise ValueError(f"need two or more paired rounds, got {len(baseline_ms)} and {len(kernel_ms)}")
    log_ratios = np.log(np.asarray(baseline_ms, dtype=np.float64) / np.asarray(kernel_ms, dtype=np.float64))
    center = float(np.exp(log_ratios.mean()))
    if np.ptp(log_ratios) == 0.0:
        return SpeedupEstimate(center, center, center)
    result = stats.bootstrap(
        (log_ratios,), np.mean, confidence_level=confidence, n_resamples=2000,
        method="BCa", vectorized=True, rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return SpeedupEstimate(center, float(np.exp(interval.low)), float(np.exp(interval.high)))
