"""How the tables write a metric: `-` when it is missing, ∞ for an infinite one, also as MLflow stores it; and
how every view marks a speedup that was not timed as its job asked."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping

import pandas as pd

from sweep.config import TimingMode

TIMING_MARKER_NOTE = "(eager): timed eagerly, as its CUDA graph could not be captured, unlike the unmarked speedups"

Row = Mapping[str, object]  # one run of the results table (`sweep.views.table`): its columns by name


def present(value: object) -> object:
    """None for a value that is missing (absent, or NaN or <NA> in a data frame)."""
    return None if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) else value


def metric(row: Row, name: str) -> float | None:
    """The run's metric `name`; None where it has none."""
    value = present(row.get(name))
    return None if value is None else float(value)  # type: ignore[arg-type]


def format_number(value: float | None, fmt: str) -> str:
    """`-` for a missing value; ∞ for an infinite one, also as MLflow stores it (the largest float64)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= sys.float_info.max:
        return "∞" if value > 0 else "-∞"
    return format(value, fmt)


def timing_marker(run: Mapping[str, object]) -> str:
    """` (eager)` after the speedups of a run whose tag `timing_mode_used` is not the mode its param `timing_mode`
    planned on its machine (tag `gpu_name`): a run whose CUDA graph could not be captured is timed eagerly, and a
    column must not mix it unmarked with the runs timed with graphs. Empty where the run does not say."""
    used, requested = run.get("timing_mode_used"), run.get("timing_mode")
    if not isinstance(used, str) or not used or requested not in {mode.value for mode in TimingMode}:
        return ""
    device_type = "cpu" if run.get("gpu_name") in (None, "", "cpu") else "cuda"
    planned = TimingMode(requested).planned(device_type)[0]
    return "" if used == planned.value else f" ({used})"


def timing_notes(rows: Iterable[Mapping[str, object]]) -> list[str]:
    """TIMING_MARKER_NOTE where any of `rows` carries the `timing_marker`, else nothing: a caption explains only the
    marks its table shows."""
    return [TIMING_MARKER_NOTE] if any(timing_marker(row) for row in rows) else []


def speedup_text(row: Row, name: str = "speedup", digits: int = 2) -> str:
    """`1.23x [1.20, 1.26]` from the metric `name` and its 95% interval (`_ci_low`, `_ci_high`): ` ~` after an
    interval that includes 1, `[no interval]` where the row has none, then the row's `timing_marker`; `-` where the
    row has no such metric."""
    value, low, high = (metric(row, name + suffix) for suffix in ("", "_ci_low", "_ci_high"))
    if value is None:
        return "-"
    if low is None or high is None:  # a record without its interval says so rather than inventing one
        return f"{value:.{digits}f}x [no interval]{timing_marker(row)}"
    marker = " ~" if low <= 1.0 <= high else ""
    return f"{value:.{digits}f}x [{low:.{digits}f}, {high:.{digits}f}]{marker}{timing_marker(row)}"
