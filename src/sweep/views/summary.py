"""The end-of-sweep tables (one row per job of the sweep, from the results table, jobs of one configuration
together) and a job's one-line result, for the terminal (rich) and for the MLflow run descriptions (markdown)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from rich.table import Table

from sweep.records.results import JobResult, RunStatus
from sweep.store.tracking import RESUMED_BY_TAG
from sweep.views.comparison import HEADER as COMPILE_HEADER
from sweep.views.comparison import compile_tables, is_compile_run, kernel_label
from sweep.views.formatting import Row, format_number, metric, present, speedup_text, timing_notes
from sweep.views.ops import has_ops, op_frame, ops_caption
from sweep.views.table import job_row

ACCURACY_CAPTION = "err_ratio > 1: the kernel is further from the float32/64 reference than eager"
# What makes a configuration: the jobs of one configuration differ only in their kernel subset.
CONFIGURATION_PARAMS = ("model", "dtype", "prompt_len", "batch_size", "device", "timing_mode")
_SHORT = {"prompt_len": "T={}", "batch_size": "B={}", "device": "{}", "timing_mode": "timing={}",
          "baseline": "baseline={}"}


def summary_caption(rows: Sequence[Row]) -> str:
    """The timing table's caption: what `~` means, and the `timing_marker` where a row carries it."""
    return "; ".join(["~ : the speedup's 95% interval includes 1 (no measurable difference)", *timing_notes(rows)])


def _number(row: Row, name: str, fmt: str) -> str:
    return format_number(metric(row, name), fmt)


def _text(row: Row, name: str) -> str:
    value = present(row.get(name))
    return "" if value is None else str(value)


RESUMED = "resumed"  # a job this sweep skipped (resume=true): an earlier sweep's run measured it


def status_word(row: Row) -> str:
    """The run's status, or `resumed` for a job an earlier sweep measured."""
    return RESUMED if present(row.get(RESUMED_BY_TAG)) else str(row["run_status"])


def status_counts(rows: Sequence[Row]) -> dict[str, int]:
    """How many jobs have each status; resumed ones counted apart from those this sweep measured."""
    words = [status_word(row) for row in rows]
    return {word: words.count(word) for word in (*(status.value for status in RunStatus), RESUMED)}


def _status(row: Row) -> str:
    if row["run_status"] == RunStatus.measured.value:
        return status_word(row)
    reason = " ".join(_text(row, "status_reason").split())  # one line, so a traceback cannot break a table
    reason = reason if len(reason) <= 80 else reason[:77] + "..."
    return f"{row['run_status']}: {reason}"


def configuration(row: Row, shown: Sequence[str] = CONFIGURATION_PARAMS) -> str:
    """The job's configuration without its kernel subset, e.g. `bf16 T=118`, from the columns in `shown`, and the
    identity's details where they vary (`sweep.views.table.detail_labels`)."""
    words = [_SHORT.get(name, "{}").format(_text(row, name)) for name in shown if _text(row, name)]
    return " ".join([*words, *filter(None, [_text(row, "details")])])


def varying_configuration(rows: Sequence[Row]) -> list[str]:
    """The configuration columns that differ between `rows`; dtype and prompt length when none do."""
    varying = [p for p in CONFIGURATION_PARAMS if len({_text(r, p) for r in rows}) > 1]
    return varying or ["dtype", "prompt_len"]


def grouped(rows: Sequence[Row]) -> list[Row]:
    """The jobs with each configuration's together, configurations in the order they first ran."""
    order: dict[str, int] = {}
    for row in rows:
        order.setdefault(configuration(row), len(order))
    return sorted(rows, key=lambda r: order[configuration(r)])


Column = tuple[str, Callable[[Row], str]]

JOB_COLUMNS: tuple[Column, ...] = (
    ("dtype", lambda r: _text(r, "dtype")),
    ("kernels", kernel_label),
    ("T", lambda r: _text(r, "prompt_len")),
)

SUMMARY_COLUMNS: tuple[Column, ...] = (
    *JOB_COLUMNS,
    ("baseline ms", lambda r: _number(r, "latency_ms_baseline", ".4f")),
    ("kernel ms", lambda r: _number(r, "latency_ms_kernel", ".4f")),
    ("speedup [95% CI]", lambda r: speedup_text(r, digits=3)),
    ("max diff", lambda r: _number(r, "max_abs_diff", ".4g")),
    ("argmax", lambda r: _number(r, "argmax_match", ".3f")),
    ("err_ratio", lambda r: _number(r, "err_ratio", ".3f")),
    ("status", _status),
)


def _metric(column: str, metric: str, fmt: str) -> Column:
    return column, lambda r: _number(r, metric, fmt)


# What the timing table compares besides the speedup, for workloads whose step is not a prefill.
_COMPARED_BY_WORKLOAD: dict[str, tuple[Column, ...]] = {
    "train": (_metric("loss diff", "loss_diff", ".3g"), _metric("grad rel diff", "grad_max_rel_diff", ".3g"),
              _metric("grad_err_ratio", "grad_err_ratio", ".3f"),
              _metric("peak MB baseline", "peak_mem_mb_baseline", ".0f"),
              _metric("peak MB kernel", "peak_mem_mb_kernel", ".0f")),
    "decode": (_metric("tokens/s kernel", "tokens_per_s_kernel", ".4g"), _metric("max diff", "max_abs_diff", ".4g"),
               _metric("argmax", "argmax_match", ".3f"), _metric("err_ratio", "err_ratio", ".3f")),
}


def workload_of(row: Row) -> str:
    """Runs logged before the workload axis existed were prefills."""
    return _text(row, "workload") or "prefill"


def summary_columns(workload: str) -> tuple[Column, ...]:
    """The timing table's columns for one workload: a prefill, a decode step and a training step never share one."""
    if workload not in _COMPARED_BY_WORKLOAD:
        return SUMMARY_COLUMNS
    return (*SUMMARY_COLUMNS[:6], *_COMPARED_BY_WORKLOAD[workload], SUMMARY_COLUMNS[-1])


def by_workload(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """The jobs per workload, workloads in the order they first ran."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(workload_of(row), []).append(row)
    return groups


ACCURACY_COLUMNS: tuple[Column, ...] = (
    *JOB_COLUMNS,
    ("max diff", lambda r: _number(r, "max_abs_diff", ".4g")),
    ("max diff (ulp)", lambda r: _number(r, "max_abs_diff_ulp", ".3g")),
    ("err_ratio", lambda r: _number(r, "err_ratio", ".3f")),
    ("layer_err_ratio_max", lambda r: _number(r, "layer_err_ratio_max", ".3f")),
    ("first divergent layer", lambda r: _number(r, "first_divergent_layer", ".0f")),
    ("kl_div", lambda r: _number(r, "kl_div", ".2e")),
    ("top5", lambda r: _number(r, "top5_overlap", ".3f")),
    ("gen_match", lambda r: _number(r, "gen_match", ".3f")),
    ("status", status_word),
)


def has_accuracy(rows: Sequence[Row]) -> bool:
    return any(metric(r, "err_ratio") is not None for r in rows)


def table_frame(rows: Sequence[Row], columns: Sequence[Column]) -> pd.DataFrame:
    """The table's cells as text, one row per job, in `grouped` order."""
    cells = [[cell(row) for _, cell in columns] for row in grouped(rows)]
    return pd.DataFrame(cells, columns=[name for name, _ in columns])


def _rich(frame: pd.DataFrame, title: str, caption: str) -> Table:
    table = Table(title=title, caption=caption)
    for column in frame.columns:
        table.add_column(column, overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*row)
    return table


def summary_table(rows: Sequence[Row], title: str = "sweep") -> Table:
    """One workload's jobs (see `sweep_tables` for several)."""
    workload = workload_of(rows[0]) if rows else "prefill"
    return _rich(table_frame(rows, summary_columns(workload)), title, summary_caption(rows))


def accuracy_table(rows: Sequence[Row], title: str = "accuracy") -> Table:
    """Is the kernel worse than eager or just different, where does it start, does it change generation?"""
    return _rich(table_frame(rows, ACCURACY_COLUMNS), title, ACCURACY_CAPTION)


def sweep_tables(jobs: pd.DataFrame, title: str) -> list[Table]:
    """The end-of-sweep tables of the sweep's jobs (`sweep.views.table.results_table`, one row per job): per
    workload, the timing table and, where logits were compared, the accuracy one; runs with baseline=compile get
    the four-way tables (`compile_rich_tables`) and their own accuracy table."""
    groups = by_workload(jobs.to_dict("records")) or {"prefill": []}
    tables = []
    for workload, mine in groups.items():
        suffix = f": {workload}" if len(groups) > 1 else ""
        plain = [r for r in mine if not is_compile_run(r)]
        compiled = [r for r in mine if is_compile_run(r)]
        if plain or not compiled:
            tables.append(summary_table(plain, title=title + suffix))
            if has_accuracy(plain):
                tables.append(accuracy_table(plain, title="accuracy" + suffix))
        tables += compile_rich_tables(compiled)
        if has_accuracy(compiled):
            tables.append(accuracy_table(compiled, title="accuracy (baseline=compile)" + suffix))
        if has_ops(mine):
            tables.append(_rich(op_frame(grouped(mine)), "each kernelized layer alone" + suffix, ops_caption(mine)))
    return tables


def compile_rich_tables(rows: Sequence[Row]) -> list[Table]:
    """The four-way comparison of baseline=compile runs, one table per configuration and machine, headed by the
    fastest option."""
    return [_rich(table.frame, f"{COMPILE_HEADER}: {table.title}\n{table.headline}", table.caption)
            for table in compile_tables(rows, brief=True)]


def job_description(result: JobResult) -> str:
    """The job's result in one line, e.g. `1.337x [1.336, 1.339], max diff 0.0156, err_ratio 1.000, measured`."""
    row = job_row(result)
    if result.status != RunStatus.measured:
        return _status(row)
    parts = []
    if "speedup" in result.metrics:
        parts.append(f"speedup {speedup_text(row, digits=3)}")
    elif "latency_ms_baseline" in result.metrics:  # kernels=none: the baseline alone
        parts.append(f"baseline {_number(row, 'latency_ms_baseline', '.4f')} ms")
    if "compile_speedup" in result.metrics:
        parts.append(f"torch.compile {speedup_text(row, 'compile_speedup', 3)}")
    if "max_abs_diff" in result.metrics:
        parts.append(f"max diff {_number(row, 'max_abs_diff', '.4g')}")
    if "err_ratio" in result.metrics:
        parts.append(f"err_ratio {_number(row, 'err_ratio', '.3f')}")
    return ", ".join([*parts, "measured"])
