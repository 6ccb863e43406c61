"""The report on finished sweeps: child runs read from MLflow stores into the results table (`sweep.views.table`),
tabulated per GPU, compared machine against machine, plotted."""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.records.results import OPS_PLOT, JobResult
from sweep.store.tracking import RESUMED_BY_TAG, check_server_reachable, job_result, resumed_runs
from sweep.views.comparison import HEADER as COMPILE_HEADER
from sweep.views.comparison import CompileTable, compile_tables
from sweep.views.formatting import Row, format_number, present, speedup_text, timing_marker, timing_notes
from sweep.views.machines import CAPTION as MACHINES_CAPTION
from sweep.views.machines import MachinePair, export_pairs, machine_pairs, pair_table
from sweep.views.ops import layers, op_frame, ops_caption
from sweep.views.summary import RESUMED, configuration
from sweep.views.table import (
    CONFIG,
    DETAILS,
    FINGERPRINT,
    METRICS,
    OPTIONAL_METRICS,
    WORKLOADS,
    results_table,
)

DEFAULT_URI = "sqlite:///runs/mlflow.db"
DEFAULT_EXPERIMENT = "kernel-sweep"

PLOT_FILES = ("speedup_vs_length.png", "err_ratio.png")
TICK_WIDTH = 40  # characters of an err_ratio plot's configuration label per line
PANEL_WIDTH = 60  # characters of a speedup panel's title and legend entries per line
MACHINES_CSV = "machines.csv"
OPS_CSV = "ops.csv"
OPS_HEADING = "Each kernelized layer alone"
_PROGRESS_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class ReportError(Exception):
    """A problem the user must fix (bad store, unknown experiment, invalid filter)."""


class StoreError(ReportError):
    """One store cannot be read; the others can still be reported."""


# --- loading -------------------------------------------------------------------------------------------------------


def load_runs(uris: Sequence[str], experiment: str, sweep_ids: Sequence[str] = (), filter_string: str | None = None,
              skip: Callable[[StoreError], None] | None = None) -> pd.DataFrame:
    """The results table (`sweep.views.table.results_table`) of the child runs of `experiment` in every store.
    With `sweep_ids`, those sweeps' runs and the earlier runs whose results they resumed (RESUMED_BY_TAG: the sweep
    that resumed each). A store that cannot be read (missing, unreadable, without the experiment, or a store given
    before) raises StoreError; with `skip`, it is handed to `skip` and left out, unless no store is left."""
    stores: dict[str, dict[str, JobResult]] = {}
    places: dict[str, str] = {}
    for uri in uris:
        try:
            if _place(uri) in places:
                raise StoreError(f"{uri} is the same store as {places[_place(uri)]}: its runs are read once")
            places[_place(uri)] = uri
            stores[uri] = _store_jobs(uri, experiment, sweep_ids, filter_string)
        except StoreError as error:
            if skip is None:
                raise
            skip(error)
    if not stores:
        raise ReportError(f"none of the stores could be read ({', '.join(uris)}); check --tracking-uri")
    return results_table(stores)


def _place(uri: str) -> str:
    """Where a store is: a sqlite file's real path, or the server's address."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri.rstrip("/")


def _store_jobs(uri: str, experiment: str, sweep_ids: Sequence[str], user_filter: str | None) -> dict[str, JobResult]:
    jobs = {}
    for run, resumed_by in _search_store(uri, experiment, sweep_ids, user_filter):
        jobs[run.info.run_id] = job = job_result(run)
        if resumed_by:
            job.tags[RESUMED_BY_TAG] = resumed_by
    return jobs


def _search_store(uri: str, experiment: str, sweep_ids: Sequence[str],
                  user_filter: str | None) -> Iterator[tuple[Run, str]]:
    """Each run with the sweep that resumed it, for an earlier run whose result a sweep resumed (else "")."""
    client, experiment_id = _open_experiment(uri, experiment)
    base = ["tags.sweep_role = 'job'"] + ([user_filter] if user_filter else [])
    filters = [(" and ".join([*base, f"tags.sweep_id = '{s}'"]), "") for s in sweep_ids] or [(" and ".join(base), "")]
    for sweep_id in sweep_ids:  # a sweep of another store has no parent run in this one
        for parent in client.search_runs([experiment_id], f"attributes.run_id = '{sweep_id}'"):
            resumed = ", ".join(f"'{run_id}'" for run_id in resumed_runs(parent))
            if resumed:
                filters.append((" and ".join([*base, f"attributes.run_id IN ({resumed})"]), sweep_id))
    for filter_string, resumed_by in filters:
        token = None
        while True:
            try:
                page = client.search_runs([experiment_id], filter_string, page_token=token)
            except MlflowException as e:
                raise ReportError(f"search in {uri} failed for filter {filter_string!r}: {e.message}; "
                                  "check --filter (MLflow search syntax, e.g. \"params.dtype = 'bf16'\")") from e
            yield from ((run, resumed_by) for run in page)
            token = page.token
            if not token:
                break


def _open_experiment(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    _check_reachable(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        names = [] if found else [e.name for e in client.search_experiments()]
    except Exception as e:  # the store's own error (SQL, HTTP, ...) is shown as-is, with the uri
        raise StoreError(f"cannot read MLflow store {uri}: {' '.join(str(e).split())[:300]}; "
                         "check --tracking-uri") from e
    if found is None:
        available = ", ".join(repr(n) for n in names) or "none"
        raise StoreError(f"no experiment {experiment!r} in {uri} (experiments there: {available}); "
                         "pass --experiment NAME or another --tracking-uri")
    return client, found.experiment_id


def _check_reachable(uri: str) -> None:
    """Fail fast: a missing sqlite file would be created empty, a dead server retried for minutes."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise StoreError(f"no MLflow store at {uri}: file {path.resolve()} does not exist; "
                             "check --tracking-uri (relative paths start from the current directory)")
    else:
        try:
            check_server_reachable(uri)
        except ConnectionError as e:
            raise StoreError(f"{e}; or fix --tracking-uri") from e


# --- shaping -------------------------------------------------------------------------------------------------------


def workload_parts(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(workload, its runs) in display order: a prefill, a decode step and a training step are never compared
    in one column."""
    return [(str(name), group) for name, group in runs.groupby("workload", sort=False)]


def _shown_config(runs: pd.DataFrame) -> list[str]:
    """What names a configuration among these runs: CONFIG, with the workload and baseline where several share a
    table, and the details where any vary. With the kernels and the machine, it tells identities apart."""
    varying = [c for c in ("workload", "baseline") if runs[c].nunique() > 1]
    return [*varying, *CONFIG, *(["details"] if (runs["details"] != "").any() else [])]


def section_tables(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The original report's table: one (title, table) per configuration and GPU, one row per kernels."""
    sections = []
    shown = _shown_config(runs)
    for key, group in runs.groupby([*shown, "gpu"], sort=False, dropna=False):
        named = [str(value) if name == "details" else f"{name}={value}" for name, value in zip(shown, key)]
        sections.append((", ".join(filter(None, named)) + f" on {key[-1]}", run_table(group)))
    return sections


@dataclass(frozen=True)
class Ops:
    """A workload's op table (None: no run timed a layer alone), its caption, and its runs' op plots as (file name,
    what it shows)."""
    table: pd.DataFrame | None
    caption: str
    plots: list[tuple[str, str]]


def op_section(runs: pd.DataFrame, plots: Mapping[str, str]) -> Ops:
    """One workload's op table (`sweep.views.ops.op_frame`), each job named by its kernels, configuration and
    machine, its caption, and the op plots among `plots` (file name by run id) of its runs."""
    rows = runs.to_dict("records")
    shown = [name for name in _shown_config(runs) if name != "details"]  # `configuration` adds the details

    def job(row: Row) -> str:
        return f"{row['kernel_label']} {configuration(row, shown)} on {row['gpu']}"

    table = op_frame(rows, job) if any(layers(row) for row in rows) else None
    return Ops(table, ops_caption(rows), [(plots[str(row["run_id"])], f"{OPS_HEADING}: {job(row)}")
                                          for row in rows if row["run_id"] in plots])


# Per workload, what its rows compare: (column, metric, format).
ACCURACY_COLUMNS = {
    "train": (("loss diff", "loss_diff", ".3g"), ("grad rel diff", "grad_max_rel_diff", ".3g"),
              ("grad_err_ratio", "grad_err_ratio", ".3g"), ("peak MB baseline", "peak_mem_mb_baseline", ".0f"),
              ("peak MB kernel", "peak_mem_mb_kernel", ".0f")),
    "decode": (("tokens/s kernel", "tokens_per_s_kernel", ".4g"), ("max diff", "max_abs_diff", ".3g"),
               ("argmax match", "argmax_match", ".3g"), ("err_ratio", "err_ratio", ".3g")),
}
DEFAULT_ACCURACY_COLUMNS = (("max diff", "max_abs_diff", ".3g"), ("argmax match", "argmax_match", ".3g"),
                            ("err_ratio", "err_ratio", ".3g"))


def run_table(group: pd.DataFrame) -> pd.DataFrame:
    """Formatted rows of one section; optional metrics get a column only where the section has them."""
    table = pd.DataFrame({
        "kernels": group["kernel_label"],
        "baseline ms": group["latency_ms_baseline"].map(lambda v: _fmt(v, ".3f")),
        "kernel ms": group["latency_ms_kernel"].map(lambda v: _fmt(v, ".3f")),
        "speedup [CI]": [speedup_text(r) if not pd.isna(r["speedup"]) else "" for r in group.to_dict("records")],
    })
    workload = group["workload"].iloc[0] if len(group) else WORKLOADS[0]
    for column, metric, spec in ACCURACY_COLUMNS.get(workload, DEFAULT_ACCURACY_COLUMNS):
        table[column] = group[metric].map(lambda v, spec=spec: _fmt(v, spec))
    for metric in OPTIONAL_METRICS:
        if group[metric].notna().any():
            table[metric] = group[metric].map(lambda v: _fmt(v, ".3g"))
    if (group["timing_mode_used"] != "").any():
        table["timing used"] = group["timing_mode_used"]
    if (group["other_runs"] > 0).any():
        table["other runs"] = group["other_runs"].astype(int)
    table["status"] = [RESUMED if resumed else _status(r.run_status, r.status_reason)
                       for r, resumed in zip(group.itertuples(), group[RESUMED_BY_TAG])]
    return table.reset_index(drop=True)


def speedup_pivot(runs: pd.DataFrame) -> pd.DataFrame:
    """Speedup per configuration and kernels (rows, one per identity but the machine: `latest_runs` of one
    baseline) and machine (columns), rows in display order."""
    index = [*_shown_config(runs), "kernels"]
    runs = runs.assign(kernels=runs["kernel_label"])
    pivot = runs.pivot(index=index, columns="gpu", values="speedup")
    pivot = pivot.reindex(pd.MultiIndex.from_frame(runs[index].drop_duplicates()))
    pivot.columns.name = None
    return pivot.reset_index()


def export_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Numeric, one-row-per-run table for CSV: the identity, the labels, the metrics (every one the runs logged),
    status and provenance."""
    leading = ["workload", "baseline", *CONFIG, *DETAILS, "kernels", "kernel_identity", "gpu", "kernel_label",
               "details", *METRICS, "timing_mode_used", "run_status", RESUMED_BY_TAG, "status_reason",
               *(["other_runs"] if "other_runs" in runs else []), *FINGERPRINT, "device", "sweep_id", "run_id",
               "run_name", "store", "ended_at"]
    measured = sorted(c for c in runs.columns if c not in leading and runs[c].dtype == float)
    return runs[[*leading, *measured]]


def _fmt(value: float, spec: str) -> str:
    """`format_number`, with an empty cell for a missing value."""
    return "" if present(value) is None else format_number(value, spec)


def _status(status: str, reason: str) -> str:
    reason = " ".join(reason.split())[:90]  # one line, so a traceback cannot break a table
    return f"{status}: {reason}" if reason and status != "measured" else status


# --- rendering -----------------------------------------------------------------------------------------------------


def render(runs: pd.DataFrame, fmt: str, plots: Sequence[str] = (),
           ops_plots: Mapping[str, str] | None = None) -> str:
    """The whole report as text in `fmt` (md, csv or html); `plots` are image file names to link, `ops_plots` each
    run's op plot file (`write_ops_plots`) by run id."""
    if fmt == "csv":
        return export_table(runs).to_csv(index=False)
    parts = []
    for workload, part in workload_parts(runs):
        ops = op_section(part, ops_plots or {})
        compiled = part["baseline"] == "compile"
        tables = compile_tables(part[compiled].to_dict("records"))
        part = part[~compiled]
        if part.empty:
            parts.append(Part(workload, None, [], tables, ops))
            continue
        parts.append(Part(workload, _marked_pivot(part), section_tables(part), tables, ops))
    intro, pairs = _intro(runs), machine_pairs(runs)
    if fmt == "md":
        return _markdown(intro, pairs, parts, plots)
    return _html(intro, pairs, parts, plots)


def _marked_pivot(runs: pd.DataFrame) -> pd.DataFrame:
    """The speedup pivot as text, each speedup with its run's `timing_marker`."""
    pivot = speedup_pivot(runs)
    index = [*_shown_config(runs), "kernels"]
    gpus = [c for c in pivot.columns if c not in index]
    marked = runs.assign(kernels=runs["kernel_label"], marker=[timing_marker(r) for r in runs.to_dict("records")])
    markers = marked.pivot(index=index, columns="gpu", values="marker")
    markers = markers.reindex(pd.MultiIndex.from_frame(pivot[index]))[gpus].to_numpy()
    pivot[gpus] = [[("" if pd.isna(v) else f"{v:.2f}x{m}") for v, m in zip(values, row_markers)]
                   for values, row_markers in zip(pivot[gpus].to_numpy(), markers)]
    return pivot


WORKLOAD_TITLES = {"prefill": "prefill: one forward over the prompt",
                   "decode": "decode: one generation step after the prompt (KV cache)",
                   "train": "train: one forward and backward of the loss on the prompt"}


@dataclass(frozen=True)
class Part:
    """What the report shows of one workload."""
    workload: str
    pivot: pd.DataFrame | None  # the speedup pivot; None: only baseline=compile runs
    sections: list[tuple[str, pd.DataFrame]]  # (title, table) per configuration and GPU
    compiled: list[CompileTable]  # the four-way tables of baseline=compile runs
    ops: Ops


def _intro(runs: pd.DataFrame) -> str:
    stores = ", ".join(runs["store"].unique())
    sweeps = ", ".join(runs["sweep_id"].unique())
    others = int(runs["other_runs"].sum())
    return (f"{len(runs)} runs from {stores}, one per identity (workload, baseline, configuration, kernels and "
            "machine: docs/report.md): the newest measurement, else the newest run; "
            f"{others} other runs hidden, counted in 'other runs'. Sweeps: {sweeps}; "
            f"machines: {_machines(runs)}. "
            "Speedup = baseline latency / kernel latency, with its confidence interval in brackets (~: the "
            "interval includes 1, no measurable difference), timed as "
            "timing_mode says (auto: CUDA graphs on a GPU, eager on the CPU). "
            + "".join(f"{note}. " for note in timing_notes(runs.to_dict("records")))
            + "An infinite ratio is printed as ∞.")


def _machines(runs: pd.DataFrame) -> str:
    """Each GPU label with its CPU architecture and GPU memory, as far as the fingerprint recorded them."""
    described = []
    for gpu, run in runs.drop_duplicates("gpu").set_index("gpu").iterrows():
        facts = [f"{run['cpu_arch']} CPU"] if run["cpu_arch"] else []
        if run["gpu_memory_integrated"] == "true":
            facts.append(f"{run['gpu_memory_gb']} GB of GPU memory integrated: the system's, shared with the CPU")
        elif run["gpu_memory_integrated"] == "false":
            facts.append(f"{run['gpu_memory_gb']} GB of GPU memory")
        described.append(f"{gpu} ({', '.join(facts)})" if facts else str(gpu))
    return "; ".join(described)


def _markdown(intro: str, pairs: list[MachinePair], workloads: list[Part], plots: Sequence[str]) -> str:
    parts = ["# Kernel sweep report", intro]
    if pairs:
        parts += ["## Machine against machine", MACHINES_CAPTION]
    for pair in pairs:
        parts += [f"### {pair.a} vs {pair.b}", f"**{pair.headline}**", f"A: {pair.a}; B: {pair.b}",
                  markdown_table(pair_table(pair))]
    for part in workloads:
        parts.append(f"## {WORKLOAD_TITLES.get(part.workload, part.workload)}")
        if part.pivot is not None:
            parts += ["### Speedup by GPU", markdown_table(part.pivot), "### Results"]
        for title, table in part.sections:
            parts += [f"#### {title}", markdown_table(table)]
        if part.compiled:
            parts.append(f"### {COMPILE_HEADER} (baseline=compile)")
        for table in part.compiled:
            parts += [f"#### {table.title}", f"**{table.headline}**", markdown_table(table.frame), f"*{table.caption}*"]
        if part.ops.table is not None:
            parts += [f"### {OPS_HEADING}", markdown_table(part.ops.table), f"*{part.ops.caption}*"]
            parts += [f"![{title}]({file})" for file, title in part.ops.plots]
    if plots:
        parts += ["## Plots", *(f"![{Path(p).stem}]({p})" for p in plots)]
    return "\n\n".join(parts) + "\n"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no tabulate needed)."""
    lines = ["| " + " | ".join(_cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "" if pd.isna(value) else str(value).replace("|", r"\|")


def _html(intro: str, pairs: list[MachinePair], workloads: list[Part], plots: Sequence[str]) -> str:
    parts = [f"<h1>Kernel sweep report</h1>\n<p>{html.escape(intro)}</p>"]
    if pairs:
        parts += ["<h2>Machine against machine</h2>", f"<p>{html.escape(MACHINES_CAPTION)}</p>"]
    for pair in pairs:
        parts += [f"<h3>{html.escape(pair.a)} vs {html.escape(pair.b)}</h3>",
                  f"<p><b>{html.escape(pair.headline)}</b></p>", f"<p>A: {html.escape(pair.a)}; B: "
                  f"{html.escape(pair.b)}</p>", pair_table(pair).to_html(index=False)]
    for part in workloads:
        parts.append(f"<h2>{html.escape(WORKLOAD_TITLES.get(part.workload, part.workload))}</h2>")
        if part.pivot is not None:
            parts += ["<h3>Speedup by GPU</h3>", part.pivot.to_html(index=False), "<h3>Results</h3>"]
        for title, table in part.sections:
            parts += [f"<h4>{html.escape(title)}</h4>", table.to_html(index=False)]
        if part.compiled:
            parts.append(f"<h3>{html.escape(COMPILE_HEADER)} (baseline=compile)</h3>")
        for table in part.compiled:
            parts += [f"<h4>{html.escape(table.title)}</h4>", f"<p><b>{html.escape(table.headline)}</b></p>",
                      table.frame.to_html(index=False), f"<p><i>{html.escape(table.caption)}</i></p>"]
        if part.ops.table is not None:
            parts += [f"<h3>{OPS_HEADING}</h3>", part.ops.table.to_html(index=False),
                      f"<p><i>{html.escape(part.ops.caption)}</i></p>"]
            parts += [f'<img src="{html.escape(file)}" alt="{html.escape(title)}">' for file, title in part.ops.plots]
    if plots:
        parts += ["<h2>Plots</h2>", *(f'<img src="{html.escape(p)}" alt="{html.escape(p)}">' for p in plots)]
    style = "body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 8px} img{max-width:100%}"
    body = "\n".join(parts)
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>Kernel sweep report</title>'
            f"<style>{style}</style></head>\n<body>\n{body}\n</body></html>\n")


# --- plots ---------------------------------------------------------------------------------------------------------


def write_plots(runs: pd.DataFrame, out: Path) -> list[str]:
    """Write the PNG plots that have data into `out`; return their file names."""
    written = []
    for name, plot in zip(PLOT_FILES, (plot_speedup_vs_length, plot_err_ratio)):
        figure = plot(runs)
        if figure is not None:
            figure.savefig(out / name, dpi=120)
            written.append(name)
    return written


# What else tells the plots' runs apart (besides dtype, length, kernels and machine), named where it varies.
PLOT_EXTRA = ("workload", "baseline", "model", "batch_size", "timing_mode", "details")


def plot_speedup_vs_length(runs: pd.DataFrame) -> Figure | None:
    """Speedup vs prompt length: one panel per (dtype, kernels), one line per GPU and PLOT_EXTRA, CI error bars."""
    data = runs[runs["speedup"].notna() & runs["prompt_len"].notna()]
    if data.empty:
        return None
    panels = list(data.groupby(["dtype", "kernel_label"], sort=False))
    extra = [c for c in PLOT_EXTRA if data[c].nunique() > 1]
    ncols = min(3, len(panels))
    figure = Figure(figsize=(5 * ncols, 3.8 * math.ceil(len(panels) / ncols)), layout="constrained")
    axes = figure.subplots(math.ceil(len(panels) / ncols), ncols, squeeze=False).ravel()
    for ax, ((dtype, kernels), panel) in zip(axes, panels):
        for key, line in panel.groupby(["gpu", *extra], sort=False):
            line = line.sort_values("prompt_len")
            errors = np.vstack([line["speedup"] - line["speedup_ci_low"], line["speedup_ci_high"] - line["speedup"]])
            label = textwrap.fill(", ".join([key[0], *(f"{c}={v}" for c, v in zip(extra, key[1:]))]), PANEL_WIDTH)
            ax.errorbar(line["prompt_len"].astype(float), line["speedup"], yerr=np.nan_to_num(errors.clip(min=0)),
                        marker="o", capsize=3, label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(textwrap.fill(f"{dtype}, kernels: {kernels}", PANEL_WIDTH))
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("speedup (baseline / kernel)")
        ax.legend(fontsize="x-small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle("Kernel speedup vs prompt length (error bars: confidence interval; dashed: no change)\n"
                    + _constants(data, ("workload", "baseline", "model", "batch_size", "timing_mode")))
    return figure


def plot_err_ratio(runs: pd.DataFrame) -> Figure | None:
    """err_ratio per configuration and kernels (one per identity but the machine: `latest_runs`), bars grouped by
    GPU, with the parity line at 1."""
    data = runs[runs["err_ratio"].notna()]
    if data.empty:
        return None
    fields = [c for c in ("workload", "baseline", *CONFIG, "details", "kernel_label")
              if c == "kernel_label" or data[c].nunique() > 1]
    config = data[fields].astype(str).agg(", ".join, axis=1)
    configs = list(dict.fromkeys(config))
    ticks = [textwrap.fill(c, TICK_WIDTH) for c in configs]  # a label as long as its kernels' paths wraps
    lines = max(t.count("\n") + 1 for t in ticks)
    gpus = sorted(data["gpu"].unique())
    width = 0.8 / len(gpus)
    # Inches: the bars, and below them the slanted labels (about 0.055 per character of a line, 0.15 per line).
    size = (min(40, max(6, 1 + len(configs) * max(0.4 * len(gpus), 0.2 * lines))),
            4 + 0.055 * min(TICK_WIDTH, max(map(len, configs))) + 0.15 * lines)
    figure = Figure(figsize=size, layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(configs))
    for i, gpu in enumerate(gpus):
        mine = data["gpu"] == gpu
        values = dict(zip(config[mine], data.loc[mine, "err_ratio"]))
        heights = [values.get(c, np.nan) for c in configs]
        ax.bar(positions + (i - (len(gpus) - 1) / 2) * width, heights, width, label=gpu)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="1 = as close to reference as baseline")
    ax.set_xticks(positions, ticks, rotation=45, ha="right", fontsize="small")
    ax.set_xlabel(f"configuration ({', '.join(fields).replace('kernel_label', 'kernels')})")
    ax.set_ylabel("err_ratio (kernel error / baseline error)")
    ax.set_title("Error vs reference of kernel run relative to baseline run\n"
                 + _constants(data, [c for c in CONFIG if c not in fields]))
    ax.legend(fontsize="small")
    return figure


def _constants(data: pd.DataFrame, columns: Sequence[str]) -> str:
    """The columns that have one value in `data`, as "name=value, ..."."""
    return ", ".join(f"{c}={data[c].iloc[0]}" for c in columns if data[c].nunique() == 1)


def write_ops_plots(runs: pd.DataFrame, out: Path) -> dict[str, str]:
    """Each run's plot of its layers timed alone (`OPS_PLOT`), fetched from its store into `out` as
    ops_<run id>.png; the file names by run id. A run whose store does not hold its plot is left out."""
    written = {}
    with _without_progress_bars(), tempfile.TemporaryDirectory() as folder:
        for row in runs.to_dict("records"):
            run_id = str(row["run_id"])
            if not layers(row):
                continue
            try:
                fetched = MlflowClient(tracking_uri=str(row["store"])).download_artifacts(run_id, OPS_PLOT, folder)
            except MlflowException:
                continue
            written[run_id] = f"ops_{run_id}.png"
            shutil.move(fetched, out / written[run_id])
    return written


@contextmanager
def _without_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar on stderr for each download: one per plot would bury what the report prints."""
    before = os.environ.get(_PROGRESS_BARS)
    os.environ[_PROGRESS_BARS] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_PROGRESS_BARS]
        else:
            os.environ[_PROGRESS_BARS] = before


def export_ops(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Every workload's op table with its workload (for CSV); None where no run timed a layer alone."""
    tables = [table.assign(workload=workload) for workload, part in workload_parts(runs)
              if (table := op_section(part, {}).table) is not None]
    if not tables:
        return None
    ops = pd.concat(tables, ignore_index=True)
    return ops[["workload", *(c for c in ops.columns if c != "workload")]]


def write_report(runs: pd.DataFrame, out: Path, fmt: str = "md") -> list[Path]:
    """Write report.<fmt> and its plots for `latest_runs` into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    eager = runs[runs["baseline"] != "compile"]  # the plots and the pivot: one speedup per configuration
    plots = write_plots(eager, out)
    ops_plots = write_ops_plots(runs, out)
    report = out / f"report.{fmt}"
    report.write_text(render(runs, fmt, plots, ops_plots))
    written = [report, *(out / p for p in [*plots, *ops_plots.values()])]
    pairs = machine_pairs(runs)
    if fmt == "csv":
        written.append(out / "speedup_pivot.csv")
        speedup_pivot(eager).to_csv(written[-1], index=False)
        if pairs:
            written.append(out / MACHINES_CSV)
            export_pairs(pairs).to_csv(written[-1], index=False)
        if (ops := export_ops(runs)) is not None:
            written.append(out / OPS_CSV)
            ops.to_csv(written[-1], index=False)
    return written
