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


# What the main table compares, per workload: (column, metric, format).
COMPARED = {
    "train": (("loss diff", "loss_diff", ".3g"), ("grad rel diff", "grad_max_rel_diff", ".3g"),
              ("grad_err_ratio", "grad_err_ratio", ".3f"), ("peak MB baseline", "peak_mem_mb_baseline", ".0f"),
              ("peak MB kernel", "peak_mem_mb_kernel", ".0f")),
    "decode": (("tokens/s kernel", "tokens_per_s_kernel", ".4g"), ("max diff", "max_abs_diff", ".4g"),
               ("argmax", "argmax_match", ".3f"), ("err_ratio", "err_ratio", ".3f")),
}
COMPARED_BY_DEFAULT = (("max diff", "max_abs_diff", ".4g"), ("argmax", "argmax_match", ".3f"),
                       ("err_ratio", "err_ratio", ".3f"))


def workload_of(result: JobResult) -> str:
    return result.params.get("workload", "prefill")


def summary_table(results: list[JobResult], title: str = "sweep") -> Table:
    """One workload's results: a prefill, a decode step and a training step are never mixed in one column."""
    compared = COMPARED.get(workload_of(results[0]), COMPARED_BY_DEFAULT) if results else COMPARED_BY_DEFAULT
    table = Table(title=title, caption="~ : the speedup's 95% interval includes 1 (no measurable difference)")
    for column in ("dtype", "kernels", "T", "baseline ms", "kernel ms", "speedup [95% CI]",
                   *(c for c, _, _ in compared), "status"):
        table.add_column(column, overflow="fold")
    for result in results:
        table.add_row(
            result.params["dtype"], result.params["kernels"], result.params["prompt_len"],
            _number(result, "latency_ms_baseline", ".4f"), _number(result, "latency_ms_kernel", ".4f"),
            _speedup(result), *(_number(result, metric, spec) for _, metric, spec in compared), _status(result),
        )
    return table


def sweep_tables(results: list[JobResult], title: str) -> list[Table]:
    """The end-of-sweep tables: per workload, the summary and, where logits were compared, the accuracy."""
    workloads = {workload_of(r): None for r in results} or {"prefill": None}
    tables = []
    for workload in workloads:
        mine = [r for r in results if workload_of(r) == workload]
        tables.append(summary_table(mine, title=f"{title}: {workload}" if len(workloads) > 1 else title))
        if any("err_ratio" in r.metrics for r in mine):
            tables.append(accuracy_table(mine, title=f"accuracy: {workload}" if len(workloads) > 1 else "accuracy"))
    return tables
