"""The four-way comparison of `baseline=compile` runs (eager, torch.compile, the kernels, torch.compile with the
kernels): one table per (model, dtype, length), one row per kernel subset, headed by which option is fastest.
Shared by the end-of-sweep tables, the sweep's page in the UI and the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import median_low

import pandas as pd

from sweep.views.formatting import Row, format_number, metric, present, speedup_text, timing_notes
from sweep.views.table import CONFIG

EAGER, COMPILE = "eager", "torch.compile"
# An option's (time, speedup over eager, ratio against torch.compile: > 1 is faster) metrics.
_KERNEL_OPTION = ("latency_ms_kernel", "speedup", "kernel_vs_compile")
_COMPILED_KERNEL_OPTION = ("latency_ms_compiled_kernel", "compiled_kernel_vs_eager", "compiled_kernel_speedup")
# What a baseline=compile run logs besides the metrics every run has (the report's CSV carries them).
COMPILE_METRICS = (
    "latency_ms_compiled", "latency_ms_compiled_kernel",
    *(f"{name}{suffix}" for name in ("compile_speedup", "kernel_vs_compile", "compiled_kernel_speedup",
                                     "compiled_kernel_vs_eager") for suffix in ("", "_ci_low", "_ci_high")),
    "compile_s_baseline", "compile_s_kernel", "compiled_graphs_baseline", "compiled_graphs_kernel",
    "graph_breaks_baseline", "graph_breaks_kernel", "recompiles", "ref_err_compiled", "ref_err_compiled_kernel",
    "err_ratio_compiled", "err_ratio_compiled_kernel", "max_abs_diff_compiled", "max_abs_diff_compiled_kernel",
    "max_abs_diff_compiled_kernel_vs_eager",
)
# One table per configuration and machine (the rows: its kernel subsets); the timing mode and the other details
# appear in a title only where they vary.
GROUP = ("workload", *CONFIG, "details", "gpu")
HEADER = "torch.compile against the kernels"
CAPTION = ("x / y: how many times faster x is than y (y's time over x's), timed in the same rounds, with its 95% "
           "interval; ~: the interval includes 1")


def is_compile_run(row: Row) -> bool:
    return row.get("baseline") == "compile"


@dataclass(frozen=True)
class CompileTable:
    title: str  # e.g. "tiny-llama bf16 T=118"
    headline: str  # which option is fastest, by how much, with its interval
    frame: pd.DataFrame  # cells as text
    caption: str  # what its marks mean


def compile_tables(rows: Sequence[Row], brief: bool = False) -> list[CompileTable]:
    """One table per configuration and machine (GROUP) of the compile runs among `rows` (rows of the results table,
    `sweep.views.table`), in first-run order; `brief`: without compile time, graph breaks, recompiles, err_ratio
    and timing (for a terminal)."""
    groups: dict[tuple[object, ...], list[Row]] = {}
    for row in rows:
        if is_compile_run(row):
            groups.setdefault(tuple(present(row.get(key)) for key in GROUP), []).append(row)
    modes = {key[GROUP.index("timing_mode")] for key in groups}
    columns = BRIEF_COLUMNS if brief else COLUMNS
    return [CompileTable(_title(dict(zip(GROUP, key)), len(modes) > 1), headline(mine), _frame(mine, columns),
                         "; ".join([CAPTION, *timing_notes(mine)]))
            for key, mine in groups.items()]


def _title(key: Mapping[str, object], with_timing_mode: bool) -> str:
    words = [str(key["model"]), str(key["dtype"]), f"T={key['prompt_len']}"]
    words += [f"B={key['batch_size']}"] if key["batch_size"] not in (None, "1", 1) else []
    words += [f"timing={key['timing_mode']}"] if with_timing_mode else []
    words += [str(key["details"])] if key["details"] else []
    words += [f"on {key['gpu']}"] if key["gpu"] is not None else []
    return " ".join(words)


def kernel_label(row: Row) -> str:
    """The run's kernels as the results table labels them (the subset, with its kernels where it is ambiguous)."""
    return str(present(row.get("kernel_label")) or row.get("kernels"))


def _number(row: Row, name: str, spec: str) -> str:
    return format_number(metric(row, name), spec)


def _note(row: Row) -> str:
    status = str(row.get("run_status", "measured"))
    if status != "measured":
        reason = " ".join(str(row.get("status_reason", "")).split())
        return f"{status}: {reason[:80]}"
    note = str(present(row.get("compiled_kernel_note")) or "")
    notes = []
    if note.startswith("not timed"):
        notes.append("compile+kernels not timed: a kernel does not declare can_torch_compile")
    elif note:
        notes.append("compile+kernels: undeclared kernel compiled anyway")
    if present(row.get("compile_triton_analysis_kernel")):
        notes.append("compile could not analyse its Triton kernel (every input treated as mutated)")
    return "; ".join(notes)


COLUMNS: tuple[tuple[str, object], ...] = (
    ("kernels", kernel_label),
    ("eager ms", lambda r: _number(r, "latency_ms_baseline", ".4f")),
    ("compile ms", lambda r: _number(r, "latency_ms_compiled", ".4f")),
    ("kernels ms", lambda r: _number(r, "latency_ms_kernel", ".4f")),
    ("compile+kernels ms", lambda r: _number(r, "latency_ms_compiled_kernel", ".4f")),
    ("compile / eager", lambda r: speedup_text(r, "compile_speedup")),
    ("kernels / eager", lambda r: speedup_text(r, "speedup")),
    ("kernels / compile", lambda r: speedup_text(r, "kernel_vs_compile")),
    ("compile+kernels / compile", lambda r: speedup_text(r, "compiled_kernel_speedup")),
    ("compile s", lambda r: _number(r, "compile_s_baseline", ".1f")),
    ("graph breaks", lambda r: _number(r, "graph_breaks_baseline", ".0f")),
    ("recompiles", lambda r: _number(r, "recompiles", ".0f")),
    ("err_ratio compiled", lambda r: _number(r, "err_ratio_compiled", ".3f")),
    ("timing used", lambda r: str(present(r.get("timing_mode_used")) or "")),
    ("note", _note),
)


# The terminal's table: times, ratios and the note.
BRIEF_COLUMNS = tuple(column for column in COLUMNS if column[0] not in (
    "compile s", "graph breaks", "recompiles", "err_ratio compiled", "timing used"))


def _frame(rows: Sequence[Row], columns: Sequence[tuple[str, object]]) -> pd.DataFrame:
    return pd.DataFrame([[cell(row) for _, cell in columns] for row in rows],  # type: ignore[operator]
                        columns=[name for name, _ in columns])


@dataclass(frozen=True)
class _Option:
    name: str
    row: Row
    vs_eager: str  # the metric: its speedup over eager
    vs_compile: str | None  # the metric: its ratio against torch.compile (> 1: faster), None for torch.compile


def _options(rows: Sequence[Row]) -> list[_Option]:
    """Every option measured with an interval against eager. torch.compile is timed in every run: the run whose
    compile_speedup is the median speaks for it (not the fastest, which would favour it by chance)."""
    measured = [r for r in rows if r.get("run_status", "measured") == "measured"]
    options = []
    compiled = [r for r in measured if metric(r, "compile_speedup") is not None]
    if compiled:
        middle = median_low([metric(r, "compile_speedup") for r in compiled])
        options.append(_Option(COMPILE, next(r for r in compiled if metric(r, "compile_speedup") == middle),
                               "compile_speedup", None))
    for row in measured:
        kernels = kernel_label(row)
        for name, (_, vs_eager, vs_compile) in ((kernels, _KERNEL_OPTION),
                                                 (f"{COMPILE} + {kernels}", _COMPILED_KERNEL_OPTION)):
            if metric(row, vs_eager) is not None:
                options.append(_Option(name, row, vs_eager, vs_compile))
    return options


def headline(rows: Sequence[Row]) -> str:
    """Which option is fastest, by how much over eager and against torch.compile (or, when torch.compile is the
    fastest, against the best kernel option), each with its interval."""
    options = _options(rows)
    if not options:
        return "no option measured"
    best = max(options, key=lambda o: metric(o.row, o.vs_eager) or 0.0)
    if (metric(best.row, best.vs_eager) or 0.0) <= 1.0:
        runner_up = f"{best.name}: {speedup_text(best.row, best.vs_eager)} eager's speed"
        return f"fastest: eager; the best other option is {runner_up}"
    text = f"fastest: {best.name}, {speedup_text(best.row, best.vs_eager)} over eager"
    if best.vs_compile is not None and metric(best.row, best.vs_compile) is not None:
        return text + f", {speedup_text(best.row, best.vs_compile)} over torch.compile"
    kernel_options = [o for o in options if o.vs_compile is not None and metric(o.row, o.vs_compile) is not None]
    if kernel_options:
        closest = max(kernel_options, key=lambda o: metric(o.row, o.vs_compile) or 0.0)
        inverse = _inverse(closest.row, closest.vs_compile)  # type: ignore[arg-type]
        text += f", {inverse} over the best kernel option ({closest.name})"
    return text


def _inverse(row: Row, name: str) -> str:
    """The ratio the other way round: 1/x with the interval [1/high, 1/low]."""
    value, low, high = (metric(row, name + suffix) for suffix in ("", "_ci_low", "_ci_high"))
    inverted = {**row, name: 1 / value if value else None, name + "_ci_low": 1 / high if low and high else None,
                name + "_ci_high": 1 / low if low and high else None}
    return speedup_text(inverted, name)
