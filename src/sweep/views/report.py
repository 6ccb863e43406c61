"""The report on finished sweeps: child runs read from MLflow stores, tabulated per GPU, plotted."""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.store.tracking import RESUMED_BY_TAG, check_server_reachable, resumed_runs
from sweep.views.comparison import CAPTION as COMPILE_CAPTION
from sweep.views.comparison import COMPILE_METRICS, CompileTable, compile_tables
from sweep.views.comparison import HEADER as COMPILE_HEADER
from sweep.views.formatting import TIMING_MARKER_NOTE, timing_marker
from sweep.views.summary import RESUMED

DEFAULT_URI = "sqlite:///runs/mlflow.db"
DEFAULT_EXPERIMENT = "kernel-sweep"

NUMERIC_PARAMS = ("prompt_len", "batch_size")
PARAMS = ("model", "dtype", "kernels", "prompt_len", "batch_size", "device", "timing_mode", "workload", "baseline")
OPTIONAL_METRICS = ("layer_err_ratio_max", "gen_match")
# The step a run timed; runs logged before workloads existed were prefills. One report part per workload.
WORKLOADS = ("prefill", "decode", "train")
WORKLOAD_METRICS = (
    "tokens_per_s_baseline", "tokens_per_s_kernel", "loss_diff", "grad_max_rel_diff", "grad_err_ratio",
    "peak_mem_mb_baseline", "peak_mem_mb_kernel",
)
METRICS = (
    "latency_ms_baseline", "latency_ms_kernel", "speedup", "speedup_ci_low", "speedup_ci_high",
    "max_abs_diff", "mean_abs_diff", "argmax_match", "ref_err_baseline", "ref_err_kernel", "err_ratio",
    "kernelized_total", *OPTIONAL_METRICS, *WORKLOAD_METRICS,
)
# Runs whose fingerprints differ in any of these are never compared as if they came from the same machine.
FINGERPRINT = (
    "gpu_name", "device_capability", "gpu_memory_gb", "gpu_memory_integrated", "sm_count", "driver_version",
    "cuda_version", "cpu_model", "cpu_arch", "host", "torch_version", "transformers_version", "kernels_version",
    "triton_version", "liger_kernel_version", "sweep_version", "git_commit", "git_dirty",
)
TAGS = (*FINGERPRINT, "run_status", "status_reason", "sweep_id", "sweep_role", "timing_mode_used", RESUMED_BY_TAG)
KERNEL_PARAM_PREFIX = "kernel_"  # kernel_<Layer>: which kernel ran (hub:repo@commit, local:path@hash, ...)
# One table section per configuration and GPU; one row per kernel subset.
CONFIG = ("model", "dtype", "prompt_len", "batch_size", "timing_mode")

PLOT_FILES = ("speedup_vs_length.png", "err_ratio.png")


class ReportError(Exception):
    """A problem the user must fix (bad store, unknown experiment, invalid filter)."""


# --- loading -------------------------------------------------------------------------------------------------------


def load_runs(
    uris: Sequence[str], experiment: str, sweep_ids: Sequence[str] = (), filter_string: str | None = None
) -> pd.DataFrame:
    """All child runs of `experiment` in every store, one row each, with bare column names and a `store` column.
    With `sweep_ids`, those sweeps' runs and the earlier runs whose results they resumed (RESUMED_BY_TAG: the sweep
    that resumed each)."""
    rows = [_flatten(run, uri) | marks for uri in uris
            for run, marks in _search_store(uri, experiment, sweep_ids, filter_string)]
    frame = pd.DataFrame(rows)
    known = [*PARAMS, *TAGS, *METRICS, "run_id", "store", "start_time"]
    frame = frame.reindex(columns=[*known, *(c for c in frame.columns if c not in known)])
    for column in METRICS:
        frame[column] = frame[column].astype(float)
    for column in NUMERIC_PARAMS:
        frame[column] = _numeric_if_possible(frame[column])
    frame["kernel_identity"] = kernel_identities(frame)
    text_columns = [c for c in (*PARAMS, *TAGS) if c not in NUMERIC_PARAMS]
    frame[text_columns] = frame[text_columns].astype(object).fillna("")
    frame["workload"] = frame["workload"].replace("", WORKLOADS[0])
    frame["baseline"] = frame["baseline"].replace("", "eager")  # runs logged before the baseline axis existed
    return frame


def _search_store(uri: str, experiment: str, sweep_ids: Sequence[str],
                  user_filter: str | None) -> Iterator[tuple[Run, dict[str, str]]]:
    """Each run with the columns it adds: RESUMED_BY_TAG for an earlier run whose result a sweep resumed."""
    client, experiment_id = _open_experiment(uri, experiment)
    base = ["tags.sweep_role = 'job'"] + ([user_filter] if user_filter else [])
    filters = [(" and ".join([*base, f"tags.sweep_id = '{s}'"]), {}) for s in sweep_ids] or [(" and ".join(base), {})]
    for sweep_id in sweep_ids:  # a sweep of another store has no parent run in this one
        for parent in client.search_runs([experiment_id], f"attributes.run_id = '{sweep_id}'"):
            resumed = ", ".join(f"'{run_id}'" for run_id in resumed_runs(parent))
            if resumed:
                filters.append((" and ".join([*base, f"attributes.run_id IN ({resumed})"]), {RESUMED_BY_TAG: sweep_id}))
    for filter_string, marks in filters:
        token = None
        while True:
            try:
                page = client.search_runs([experiment_id], filter_string, page_token=token)
            except MlflowException as e:
                raise ReportError(f"search in {uri} failed for filter {filter_string!r}: {e.message}; "
                                  "check --filter (MLflow search syntax, e.g. \"params.dtype = 'bf16'\")") from e
            yield from ((run, marks) for run in page)
            token = page.token
            if not token:
                break


def _open_experiment(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    _check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
        names = [] if found else [e.name for e in client.search_experiments()]
    except Exception as e:  # the store's own error (SQL, HTTP, ...) is shown as-is, with the uri
        raise ReportError(f"cannot read MLflow store {uri}: {e}; check --tracking-uri") from e
    if found is None:
        available = ", ".join(repr(n) for n in names) or "none"
        raise ReportError(f"no experiment {experiment!r} in {uri} (experiments there: {available}); "
                          "pass --experiment NAME or another --tracking-uri")
    return client, found.experiment_id


def _check_reachable(uri: str) -> None:
    """Fail fast: a missing sqlite file would be created empty, a dead server retried for minutes."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ReportError(f"no MLflow store at {uri}: file {path.resolve()} does not exist; "
                              "check --tracking-uri (relative paths start from the current directory)")
    else:
        try:
            check_server_reachable(uri)
        except ConnectionError as e:
            raise ReportError(f"{e}; or fix --tracking-uri") from e


def _flatten(run: Run, uri: str) -> dict[str, object]:
    data = {**run.data.tags, **run.data.params, **run.data.metrics}
    row = {k: v for k, v in data.items() if not k.startswith("mlflow.")}
    return row | {"run_id": run.info.run_id, "store": uri, "start_time": pd.Timestamp(run.info.start_time, unit="ms")}


def kernel_identities(runs: pd.DataFrame) -> pd.Series:
    """One text per run naming every kernel it ran ("RMSNorm=local:/k@1a2b..."); empty without kernels."""
    columns = sorted(c for c in runs.columns if c.startswith(KERNEL_PARAM_PREFIX) and not c.startswith(
        ("kernelized_", "kernel_source_", "kernel_note_")))
    if not columns:
        return pd.Series("", index=runs.index, dtype=object)
    values = runs[columns].astype(object)
    return values.apply(lambda row: "; ".join(
        f"{c.removeprefix(KERNEL_PARAM_PREFIX)}={v}" for c, v in row.items() if isinstance(v, str) and v), axis=1)


def _numeric_if_possible(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column.astype(object).fillna("")


# --- shaping -------------------------------------------------------------------------------------------------------


def hardware_labels(runs: pd.DataFrame) -> pd.Series:
    """`gpu_name` (or "cpu"); where one name covers several fingerprints, the differing fields are appended."""
    names = runs["gpu_name"].where(runs["gpu_name"] != "", "cpu")
    labels = names.copy()
    for name, index in names.groupby(names).groups.items():
        prints = runs.loc[index, list(FINGERPRINT)]
        varying = [c for c in FINGERPRINT if prints[c].nunique() > 1]
        if varying:
            details = prints[varying].apply(lambda r: ", ".join(f"{c}={v}" for c, v in r.items()), axis=1)
            labels.loc[index] = f"{name} (" + details + ")"
    return labels


def latest_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Add the `gpu` label; keep one run per configuration, kernels (subset and identity) and fingerprint: the
    newest `measured` one, else the newest; `hidden_runs` counts the others; sort for display."""
    runs = runs.assign(gpu=hardware_labels(runs))
    if "workload" not in runs:  # a frame built from runs that predate workloads
        runs = runs.assign(workload=WORKLOADS[0])
    if "baseline" not in runs:  # ... or the baseline axis
        runs = runs.assign(baseline="eager")
    for column in ("kernel_identity", "run_status", "timing_mode_used"):
        if column not in runs.columns:
            runs[column] = ""
    key = ["workload", "baseline", *CONFIG, "kernels", "kernel_identity", "gpu", *FINGERPRINT]
    runs = runs.assign(_measured=runs["run_status"].isin(["measured", ""]))
    runs = runs.sort_values(["_measured", "start_time"], kind="stable")
    hidden = runs.groupby(key, dropna=False)["start_time"].transform("size") - 1
    runs = runs.assign(hidden_runs=hidden).drop_duplicates(key, keep="last").drop(columns="_measured")
    rank = {name: index for index, name in enumerate(WORKLOADS)}
    order = runs.assign(_not_none=runs["kernels"] != "none",
                        _workload=runs["workload"].map(lambda w: rank.get(w, len(rank))))
    order = order.sort_values(["_workload", "workload", *CONFIG, "gpu", "_not_none", "kernels"], kind="stable")
    return order.drop(columns=["_not_none", "_workload"]).reset_index(drop=True)


def workload_parts(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(workload, its runs) in display order: a prefill, a decode step and a training step are never compared
    in one column."""
    return [(str(name), group) for name, group in runs.groupby("workload", sort=False)]


def kernel_labels(runs: pd.DataFrame) -> pd.Series:
    """The subset's name; where one name covers runs of different kernels, the kernels themselves are added."""
    labels = runs["kernels"].astype(object).copy()
    for _, index in runs.groupby("kernels").groups.items():
        if runs.loc[index, "kernel_identity"].nunique() > 1:
            labels.loc[index] = runs.loc[index, "kernels"] + " [" + runs.loc[index, "kernel_identity"] + "]"
    return labels


def section_tables(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The original report's table: one (title, table) per configuration and GPU, one row per kernel subset."""
    sections = []
    for key, group in runs.groupby([*CONFIG, "gpu"], sort=False, dropna=False):
        title = ", ".join(f"{name}={value}" for name, value in zip(CONFIG, key[:-1])) + f" on {key[-1]}"
        sections.append((title, run_table(group)))
    return sections


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
        "kernels": group["kernel_label"] if "kernel_label" in group else group["kernels"],
        "baseline ms": group["latency_ms_baseline"].map(lambda v: _fmt(v, ".3f")),
        "kernel ms": group["latency_ms_kernel"].map(lambda v: _fmt(v, ".3f")),
        "speedup [CI]": [_speedup(r["speedup"], r["speedup_ci_low"], r["speedup_ci_high"]) + timing_marker(r)
                         if not pd.isna(r["speedup"]) else "" for r in group.to_dict("records")],
    })
    workload = group["workload"].iloc[0] if len(group) else WORKLOADS[0]
    for column, metric, spec in ACCURACY_COLUMNS.get(workload, DEFAULT_ACCURACY_COLUMNS):
        table[column] = group[metric].map(lambda v, spec=spec: _fmt(v, spec))
    for metric in OPTIONAL_METRICS:
        if group[metric].notna().any():
            table[metric] = group[metric].map(lambda v: _fmt(v, ".3g"))
    if (group["timing_mode_used"] != "").any():
        table["timing used"] = group["timing_mode_used"]
    if (group["hidden_runs"] > 0).any():
        table["other runs"] = group["hidden_runs"].astype(int)
    table["status"] = [RESUMED if resumed else _status(r.run_status, r.status_reason)
                       for r, resumed in zip(group.itertuples(), group[RESUMED_BY_TAG])]
    return table.reset_index(drop=True)


def speedup_pivot(runs: pd.DataFrame) -> pd.DataFrame:
    """Speedup per configuration and kernel subset (rows) and GPU (columns), rows in display order."""
    index = [*CONFIG, "kernels"]
    runs = runs.assign(kernels=kernel_labels(runs))
    pivot = runs.pivot(index=index, columns="gpu", values="speedup")
    pivot = pivot.reindex(pd.MultiIndex.from_frame(runs[index].drop_duplicates()))
    pivot.columns.name = None
    return pivot.reset_index()


def export_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Numeric, one-row-per-run table for CSV."""
    compiled = [c for c in COMPILE_METRICS if c in runs.columns]
    columns = ["workload", "baseline", *CONFIG, "kernels", "kernel_identity", "gpu", *METRICS, *compiled,
               "timing_mode_used",
               "run_status", RESUMED_BY_TAG, "status_reason", "hidden_runs", *FINGERPRINT, "device", "sweep_id",
               "run_id", "store",
               "start_time"]
    return runs[columns]


def _fmt(value: float, spec: str) -> str:
    if pd.isna(value):
        return ""
    if abs(value) >= sys.float_info.max:  # how MLflow stores an infinite ratio
        return "∞" if value > 0 else "-∞"
    return format(value, spec)


def _speedup(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return ""
    interval = "" if pd.isna(low) or pd.isna(high) else f" [{low:.2f}, {high:.2f}]"
    return f"{value:.2f}x{interval}"


def _status(status: str, reason: str) -> str:
    reason = " ".join(reason.split())[:90]  # one line, so a traceback cannot break a table
    return f"{status}: {reason}" if reason and status != "measured" else status


# --- rendering -----------------------------------------------------------------------------------------------------


def render(runs: pd.DataFrame, fmt: str, plots: Sequence[str] = ()) -> str:
    """The whole report as text in `fmt` (md, csv or html); `plots` are image file names to link."""
    if fmt == "csv":
        return export_table(runs).to_csv(index=False)
    parts = []
    for workload, part in workload_parts(runs):
        compiled = part["baseline"] == "compile"
        tables = compile_tables(part[compiled].to_dict("records"))
        part = part[~compiled]
        if part.empty:
            parts.append((workload, None, [], tables))
            continue
        parts.append((workload, _marked_pivot(part), section_tables(part.assign(kernel_label=kernel_labels(part))),
                      tables))
    intro = _intro(runs)
    if fmt == "md":
        return _markdown(intro, parts, plots)
    return _html(intro, parts, plots)


def _marked_pivot(runs: pd.DataFrame) -> pd.DataFrame:
    """The speedup pivot as text, each speedup with its run's `timing_marker`."""
    pivot = speedup_pivot(runs)
    gpus = [c for c in pivot.columns if c not in (*CONFIG, "kernels")]
    marked = runs.assign(kernels=kernel_labels(runs), marker=[timing_marker(r) for r in runs.to_dict("records")])
    markers = marked.pivot(index=[*CONFIG, "kernels"], columns="gpu", values="marker")
    markers = markers.reindex(pd.MultiIndex.from_frame(pivot[[*CONFIG, "kernels"]]))[gpus].to_numpy()
    pivot[gpus] = [[("" if pd.isna(v) else f"{v:.2f}x{m}") for v, m in zip(values, row_markers)]
                   for values, row_markers in zip(pivot[gpus].to_numpy(), markers)]
    return pivot


WORKLOAD_TITLES = {"prefill": "prefill: one forward over the prompt",
                   "decode": "decode: one generation step after the prompt (KV cache)",
                   "train": "train: one forward and backward of the loss on the prompt"}
# workload, speedup pivot (None: only baseline=compile runs), sections, the four-way tables of baseline=compile runs
Part = tuple[str, pd.DataFrame | None, list[tuple[str, pd.DataFrame]], list[CompileTable]]


def _intro(runs: pd.DataFrame) -> str:
    stores = ", ".join(runs["store"].unique())
    sweeps = ", ".join(runs["sweep_id"].unique())
    hidden = int(runs["hidden_runs"].sum())
    return (f"{len(runs)} runs (per configuration, kernels and machine the latest measured one, else the latest; "
            f"{hidden} other runs hidden, counted in 'other runs') from {stores}; sweeps: {sweeps}; "
            f"machines: {_machines(runs)}. "
            "Speedup = baseline latency / kernel latency, with its confidence interval in brackets, timed as "
            f"timing_mode says (auto: CUDA graphs on a GPU, eager on the CPU); {TIMING_MARKER_NOTE}. An infinite "
            "ratio is printed as ∞.")


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


def _markdown(intro: str, workloads: list[Part], plots: Sequence[str]) -> str:
    parts = ["# Kernel sweep report", intro]
    for workload, pivot, sections, compiled in workloads:
        parts.append(f"## {WORKLOAD_TITLES.get(workload, workload)}")
        if pivot is not None:
            parts += ["### Speedup by GPU", markdown_table(pivot), "### Results"]
        for title, table in sections:
            parts += [f"#### {title}", markdown_table(table)]
        if compiled:
            parts += [f"### {COMPILE_HEADER} (baseline=compile)", COMPILE_CAPTION]
        for table in compiled:
            parts += [f"#### {table.title}", f"**{table.headline}**", markdown_table(table.frame)]
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


def _html(intro: str, workloads: list[Part], plots: Sequence[str]) -> str:
    parts = [f"<h1>Kernel sweep report</h1>\n<p>{html.escape(intro)}</p>"]
    for workload, pivot, sections, compiled in workloads:
        parts.append(f"<h2>{html.escape(WORKLOAD_TITLES.get(workload, workload))}</h2>")
        if pivot is not None:
            parts += ["<h3>Speedup by GPU</h3>", pivot.to_html(index=False), "<h3>Results</h3>"]
        for title, table in sections:
            parts += [f"<h4>{html.escape(title)}</h4>", table.to_html(index=False)]
        if compiled:
            parts += [f"<h3>{html.escape(COMPILE_HEADER)} (baseline=compile)</h3>",
                      f"<p>{html.escape(COMPILE_CAPTION)}</p>"]
        for table in compiled:
            parts += [f"<h4>{html.escape(table.title)}</h4>", f"<p><b>{html.escape(table.headline)}</b></p>",
                      table.frame.to_html(index=False)]
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


def plot_speedup_vs_length(runs: pd.DataFrame) -> Figure | None:
    """Speedup vs prompt length: one panel per (dtype, kernel subset), one line per GPU, CI error bars."""
    data = runs[runs["speedup"].notna() & runs["prompt_len"].notna()]
    if data.empty:
        return None
    panels = list(data.groupby(["dtype", "kernels"], sort=False))
    extra = [c for c in ("workload", "model", "batch_size", "timing_mode") if data[c].nunique() > 1]
    ncols = min(3, len(panels))
    figure = Figure(figsize=(5 * ncols, 3.8 * math.ceil(len(panels) / ncols)), layout="constrained")
    axes = figure.subplots(math.ceil(len(panels) / ncols), ncols, squeeze=False).ravel()
    for ax, ((dtype, kernels), panel) in zip(axes, panels):
        for key, line in panel.groupby(["gpu", *extra], sort=False):
            line = line.sort_values("prompt_len")
            errors = np.vstack([line["speedup"] - line["speedup_ci_low"], line["speedup_ci_high"] - line["speedup"]])
            label = ", ".join([key[0], *(f"{c}={v}" for c, v in zip(extra, key[1:]))])
            ax.errorbar(line["prompt_len"], line["speedup"], yerr=np.nan_to_num(errors.clip(min=0)),
                        marker="o", capsize=3, label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype}, kernels: {kernels}")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("speedup (baseline / kernel)")
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle("Kernel speedup vs prompt length (error bars: confidence interval; dashed: no change)\n"
                    + _constants(data, ("workload", "model", "batch_size", "timing_mode")))
    return figure


def plot_err_ratio(runs: pd.DataFrame) -> Figure | None:
    """err_ratio per configuration, bars grouped by GPU, with the parity line at 1."""
    data = runs[runs["err_ratio"].notna()]
    if data.empty:
        return None
    fields = [c for c in ("workload", *CONFIG, "kernels") if c == "kernels" or data[c].nunique() > 1]
    config = data[fields].astype(str).agg(", ".join, axis=1)
    configs = list(dict.fromkeys(config))
    gpus = sorted(data["gpu"].unique())
    width = 0.8 / len(gpus)
    figure = Figure(figsize=(min(40, max(6, 1 + 0.4 * len(configs) * len(gpus))), 5), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(configs))
    for i, gpu in enumerate(gpus):
        values = data.loc[data["gpu"] == gpu, "err_ratio"].set_axis(config[data["gpu"] == gpu]).reindex(configs)
        ax.bar(positions + (i - (len(gpus) - 1) / 2) * width, values, width, label=gpu)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="1 = as close to reference as baseline")
    ax.set_xticks(positions, configs, rotation=45, ha="right")
    ax.set_xlabel(f"configuration ({', '.join(fields)})")
    ax.set_ylabel("err_ratio (kernel error / baseline error)")
    ax.set_title("Error vs reference of kernel run relative to baseline run\n"
                 + _constants(data, [c for c in CONFIG if c not in fields]))
    ax.legend(fontsize="small")
    return figure


def _constants(data: pd.DataFrame, columns: Sequence[str]) -> str:
    """The columns that have one value in `data`, as "name=value, ..."."""
    return ", ".join(f"{c}={data[c].iloc[0]}" for c in columns if data[c].nunique() == 1)


def write_report(runs: pd.DataFrame, out: Path, fmt: str = "md") -> list[Path]:
    """Write report.<fmt> and its plots for `latest_runs` into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    eager = runs[runs["baseline"] != "compile"]  # the plots and the pivot: one speedup per configuration
    plots = write_plots(eager, out)
    report = out / f"report.{fmt}"
    report.write_text(render(runs, fmt, plots))
    written = [report, *(out / p for p in plots)]
    if fmt == "csv":
        written.append(out / "speedup_pivot.csv")
        speedup_pivot(eager).to_csv(written[-1], index=False)
    return written
