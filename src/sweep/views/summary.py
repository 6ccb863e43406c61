"""The end-of-sweep tables (one row per job, jobs of one configuration together) and a job's one-line result,
for the terminal (rich) and for the MLflow run descriptions (markdown)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from rich.table import Table

from sweep.records.results import JobResult, RunStatus
from sweep.store.tracking import RESUMED_BY_TAG
from sweep.views.comparison import CAPTION as COMPILE_CAPTION
from sweep.views.comparison import HEADER as COMPILE_HEADER
from sweep.views.comparison import compile_tables, is_compile_run, job_rows, ratio
from sweep.views.formatting import TIMING_MARKER_NOTE, format_number, timing_marker

SUMMARY_CAPTION = f"~ : the speedup's 95% interval includes 1 (no measurable difference); {TIMING_MARKER_NOTE}"
ACCURACY_CAPTION = "err_ratio > 1: the kernel is further from the float32/64 reference than eager"
# What makes a configuration: the jobs of one configuration differ only in their kernel subset.
CONFIGURATION_PARAMS = ("model", "dtype", "prompt_len", "batch_size", "device", "timing_mode")
_SHORT = {"prompt_len": "T={}", "batch_size": "B={}", "device": "{}", "timing_mode": "timing={}"}


def _number(result: JobResult, metric: str, fmt: str) -> str:
    return format_number(result.metrics.get(metric), fmt)


def _speedup(result: JobResult, digits: int = 3) -> str:
    if "speedup" not in result.metrics:
        return "-"
    m = result.metrics
    timing = timing_marker(result.params | result.tags)
    if "speedup_ci_low" not in m:  # a record without its interval says so rather than inventing one
        return f"{m['speedup']:.{digits}f}x [no interval]{timing}"
    marker = "" if m.get("speedup_significant", 0.0) else " ~"
    return (f"{m['speedup']:.{digits}f}x [{m['speedup_ci_low']:.{digits}f}, "
            f"{m['speedup_ci_high']:.{digits}f}]{marker}{timing}")


RESUMED = "resumed"  # a job this sweep skipped (resume=true): an earlier sweep's run measured it


def status_word(result: JobResult) -> str:
    """The run's status, or `resumed` for a job an earlier sweep measured."""
    return RESUMED if RESUMED_BY_TAG in result.tags else result.status.value


def status_counts(results: Sequence[JobResult]) -> dict[str, int]:
    """How many jobs have each status; resumed ones counted apart from those this sweep measured."""
    words = [status_word(result) for result in results]
    return {word: words.count(word) for word in (*(status.value for status in RunStatus), RESUMED)}


def _status(result: JobResult) -> str:
    if result.status == RunStatus.measured:
        return status_word(result)
    reason = " ".join(result.reason.split())  # one line, so a traceback cannot break a table
    reason = reason if len(reason) <= 80 else reason[:77] + "..."
    return f"{result.status.value}: {reason}"


def configuration(result: JobResult, shown: Sequence[str] = CONFIGURATION_PARAMS) -> str:
    """The job's configuration without its kernel subset, e.g. `bf16 T=118`, from the params in `shown`."""
    params = result.params
    return " ".join(_SHORT.get(name, "{}").format(params[name]) for name in shown if name in params)


def varying_configuration(results: Sequence[JobResult]) -> list[str]:
    """The configuration params that differ between `results`; dtype and prompt length when none do."""
    varying = [p for p in CONFIGURATION_PARAMS if len({r.params.get(p) for r in results}) > 1]
    return varying or ["dtype", "prompt_len"]


def grouped(results: Sequence[JobResult]) -> list[JobResult]:
    """The jobs with each configuration's together, configurations in the order they first ran."""
    order: dict[str, int] = {}
    for result in results:
        order.setdefault(configuration(result), len(order))
    return sorted(results, key=lambda r: order[configuration(r)])


Column = tuple[str, Callable[[JobResult], str]]

JOB_COLUMNS: tuple[Column, ...] = (
    ("dtype", lambda r: r.params["dtype"]),
    ("kernels", lambda r: r.params["kernels"]),
    ("T", lambda r: r.params["prompt_len"]),
)

SUMMARY_COLUMNS: tuple[Column, ...] = (
    *JOB_COLUMNS,
    ("baseline ms", lambda r: _number(r, "latency_ms_baseline", ".4f")),
    ("kernel ms", lambda r: _number(r, "latency_ms_kernel", ".4f")),
    ("speedup [95% CI]", _speedup),
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


def workload_of(result: JobResult) -> str:
    """Runs logged before the workload axis existed were prefills."""
    return result.params.get("workload", "prefill")


def summary_columns(workload: str) -> tuple[Column, ...]:
    """The timing table's columns for one workload: a prefill, a decode step and a training step never share one."""
    if workload not in _COMPARED_BY_WORKLOAD:
        return SUMMARY_COLUMNS
    return (*SUMMARY_COLUMNS[:6], *_COMPARED_BY_WORKLOAD[workload], SUMMARY_COLUMNS[-1])


def by_workload(results: Sequence[JobResult]) -> dict[str, list[JobResult]]:
    """The results per workload, workloads in the order they first ran."""
    groups: dict[str, list[JobResult]] = {}
    for result in results:
        groups.setdefault(workload_of(result), []).append(result)
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


def has_accuracy(results: Sequence[JobResult]) -> bool:
    return any("err_ratio" in r.metrics for r in results)


def table_frame(results: Sequence[JobResult], columns: Sequence[Column]) -> pd.DataFrame:
    """The table's cells as text, one row per job, in `grouped` order."""
    rows = [[cell(result) for _, cell in columns] for result in grouped(results)]
    return pd.DataFrame(rows, columns=[name for name, _ in columns])


def _rich(frame: pd.DataFrame, title: str, caption: str) -> Table:
    table = Table(title=title, caption=caption)
    for column in frame.columns:
        table.add_column(column, overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*row)
    return table


def summary_table(results: Sequence[JobResult], title: str = "sweep") -> Table:
    """One workload's jobs (see `sweep_tables` for several)."""
    workload = workload_of(results[0]) if results else "prefill"
    return _rich(table_frame(results, summary_columns(workload)), title, SUMMARY_CAPTION)


def accuracy_table(results: Sequence[JobResult], title: str = "accuracy") -> Table:
    """Is the kernel worse than eager or just different, where does it start, does it change generation?"""
    return _rich(table_frame(results, ACCURACY_COLUMNS), title, ACCURACY_CAPTION)


def sweep_tables(results: Sequence[JobResult], title: str) -> list[Table]:
    """The end-of-sweep tables: per workload, the timing table and, where logits were compared, the accuracy one;
    runs with baseline=compile get the four-way tables (`compile_rich_tables`) and their own accuracy table."""
    groups = by_workload(results) or {"prefill": []}
    tables = []
    for workload, mine in groups.items():
        suffix = f": {workload}" if len(groups) > 1 else ""
        plain = [r for r in mine if not is_compile_run(r.params)]
        compiled = [r for r in mine if is_compile_run(r.params)]
        if plain or not compiled:
            tables.append(summary_table(plain, title=title + suffix))
            if has_accuracy(plain):
                tables.append(accuracy_table(plain, title="accuracy" + suffix))
        tables += compile_rich_tables(compiled)
        if has_accuracy(compiled):
            tables.append(accuracy_table(compiled, title="accuracy (baseline=compile)" + suffix))
    return tables


def compile_rich_tables(results: Sequence[JobResult]) -> list[Table]:
    """The four-way comparison of baseline=compile runs, one table per (model, dtype, length), headed by the
    fastest option."""
    return [_rich(table.frame, f"{COMPILE_HEADER}: {table.title}\n{table.headline}", COMPILE_CAPTION)
            for table in compile_tables(job_rows(results), brief=True)]


def job_description(result: JobResult) -> str:
    """The job's result in one line, e.g. `1.337x [1.336, 1.339], max diff 0.0156, err_ratio 1.000, measured`."""
    if result.status != RunStatus.measured:
        return _status(result)
    parts = []
    if "speedup" in result.metrics:
        parts.append(f"speedup {_speedup(result)}")
    elif "latency_ms_baseline" in result.metrics:  # kernels=none: the baseline alone
        parts.append(f"baseline {_number(result, 'latency_ms_baseline', '.4f')} ms")
    if "compile_speedup" in result.metrics:
        parts.append(f"torch.compile {ratio(result.params | result.tags | result.metrics, 'compile_speedup', 3)}")
    if "max_abs_diff" in result.metrics:
        parts.append(f"max diff {_number(result, 'max_abs_diff', '.4g')}")
    if "err_ratio" in result.metrics:
        parts.append(f"err_ratio {_number(result, 'err_ratio', '.3f')}")
    return ", ".join([*parts, "measured"])
