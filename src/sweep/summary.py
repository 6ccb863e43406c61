"""The end-of-sweep table, like the original report's: one row per combination."""

from __future__ import annotations

import math
import sys

from rich.table import Table

from .results import JobResult, RunStatus


def format_number(value: float | None, fmt: str) -> str:
    """`-` for a missing value; ∞ for an infinite one, also as MLflow stores it (the largest float64)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= sys.float_info.max:
        return "∞" if value > 0 else "-∞"
    return format(value, fmt)


def _number(result: JobResult, metric: str, fmt: str) -> str:
    return format_number(result.metrics.get(metric), fmt)


def _speedup(result: JobResult) -> str:
    if "speedup" not in result.metrics:
        return "-"
    m = result.metrics
    marker = "" if m.get("speedup_significant", 0.0) else " ~"
    return f"{m['speedup']:.3f}x [{m['speedup_ci_low']:.3f}, {m['speedup_ci_high']:.3f}]{marker}"


def _status(result: JobResult) -> str:
    if result.status == RunStatus.measured:
        return "measured"
    reason = result.reason if len(result.reason) <= 80 else result.reason[:77] + "..."
    return f"{result.status.value}: {reason}"


def accuracy_table(results: list[JobResult], title: str = "accuracy") -> Table:
    """Is the kernel worse than eager or just different, where does it start, does it change generation?"""
    table = Table(title=title, caption="err_ratio > 1: the kernel is further from the float32/64 reference than eager")
    for column in ("dtype", "kernels", "T", "max diff", "max diff (ulp)", "err_ratio", "layer_err_ratio_max",
                   "first divergent layer", "kl_div", "top5", "gen_match", "status"):
        table.add_column(column, overflow="fold")
    for result in results:
        table.add_row(
            result.params["dtype"], result.params["kernels"], result.params["prompt_len"],
            _number(result, "max_abs_diff", ".4g"), _number(result, "max_abs_diff_ulp", ".3g"),
            _number(result, "err_ratio", ".3f"), _number(result, "layer_err_ratio_max", ".3f"),
            _number(result, "first_divergent_layer", ".0f"), _number(result, "kl_div", ".2e"),
            _number(result, "top5_overlap", ".3f"), _number(result, "gen_match", ".3f"), result.status.value,
        )
    return table


def summary_table(results: list[JobResult], title: str = "sweep") -> Table:
    table = Table(title=title, caption="~ : the speedup's 95% interval includes 1 (no measurable difference)")
    for column in ("dtype", "kernels", "T", "baseline ms", "kernel ms", "speedup [95% CI]", "max diff",
                   "argmax", "err_ratio", "status"):
        table.add_column(column, overflow="fold")
    for result in results:
        table.add_row(
            result.params["dtype"], result.params["kernels"], result.params["prompt_len"],
            _number(result, "latency_ms_baseline", ".4f"), _number(result, "latency_ms_kernel", ".4f"),
            _speedup(result), _number(result, "max_abs_diff", ".4g"), _number(result, "argmax_match", ".3f"),
            _number(result, "err_ratio", ".3f"), _status(result),
        )
    return table
