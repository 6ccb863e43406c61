"""What a sweep's parent run shows in the MLflow UI: a description holding the end-of-sweep tables and the speedup
chart, and artifacts (the chart, the results as CSV, `sweep.views.report`'s report), built from the results table of
the job runs as the store holds them. And what a report logged as a run shows (`report_page`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sweep.views import report
from sweep.views.charts import speedup_chart
from sweep.views.comparison import HEADER as COMPILE_HEADER
from sweep.views.comparison import compile_tables, is_compile_run
from sweep.views.formatting import Row
from sweep.views.ops import has_ops, op_frame, ops_caption
from sweep.views.summary import (
    ACCURACY_CAPTION,
    ACCURACY_COLUMNS,
    Column,
    by_workload,
    grouped,
    has_accuracy,
    status_counts,
    summary_caption,
    summary_columns,
    table_frame,
)
from sweep.views.table import latest_runs

CHART = "summary/speedup.png"
RESULTS_CSV = "summary/results.csv"
REPORT_FOLDER = "report"
REPORT_FORMATS = ("md", "csv", "html")


@dataclass(frozen=True)
class Links:
    """Addresses inside the UI, relative to its root: a run's page, a run's artifact file, and the experiment's runs
    with each configuration's machines side by side (none when empty)."""
    run: Callable[[str], str]
    artifact: Callable[[str, str], str]
    machines_view: str = ""


@dataclass(frozen=True)
class SweepPage:
    description: str  # markdown
    artifacts: dict[str, str | bytes]


def sweep_page(sweep_id: str, jobs: pd.DataFrame, title: str, links: Links, limit: int,
               report_files: Mapping[str, bytes]) -> SweepPage:
    """`jobs`: the sweep's jobs (`sweep.views.table.results_table`, one row per job); `report_files` is
    `sweep.views.report`'s output for this sweep, by file name; the description stays within `limit` characters
    (MLflow's limit for a tag), cutting rows when it must."""
    chart = speedup_chart(jobs, title)
    artifacts: dict[str, str | bytes] = {RESULTS_CSV: report.export_table(jobs).to_csv(index=False)}
    artifacts |= {f"{REPORT_FOLDER}/{name}": content for name, content in report_files.items()}
    if chart is not None:
        artifacts[CHART] = chart
    ordered = grouped(jobs.to_dict("records"))
    for rows in range(len(ordered), -1, -1):
        description = _description(ordered, rows, title, sweep_id, chart is not None,
                                   lambda r: links.run(str(r["run_id"])), links, sorted(artifacts))
        if len(description) <= limit:
            break
    return SweepPage(description, artifacts)


def report_files(uri: str, experiment: str, sweep_id: str) -> dict[str, bytes]:
    """What `python -m sweep.report --tracking-uri URI --sweep SWEEP_ID --out DIR` writes, by file name."""
    return written_report(latest_runs(report.load_runs([uri], experiment, [sweep_id])), ("md",))


def written_report(runs: pd.DataFrame, formats: Sequence[str]) -> dict[str, bytes]:
    """What `sweep.views.report.write_report` writes of `runs` (`latest_runs`) in each of `formats`, by file name."""
    with tempfile.TemporaryDirectory() as folder:
        written = [path for fmt in formats for path in report.write_report(runs, Path(folder), fmt)]
        return {path.name: path.read_bytes() for path in written}


def report_page(runs: pd.DataFrame, run_id: str, links: Links, limit: int) -> SweepPage:
    """What the run `run_id` holding the report on `runs` (`latest_runs`) shows: the report in every format with its
    plots as artifacts, and as its description the markdown report, its images read from those artifacts, cut
    between blocks (never inside a table) to stay within `limit` characters."""
    files = written_report(runs, REPORT_FORMATS)
    artifacts: dict[str, str | bytes] = {f"{REPORT_FOLDER}/{name}": content for name, content in files.items()}
    text = files["report.md"].decode()
    for name in files:
        text = text.replace(f"]({name})", f"]({links.artifact(run_id, f'{REPORT_FOLDER}/{name}')})")
    blocks = text.rstrip("\n").split("\n\n")
    head = [_machines_view_line(links)] if links.machines_view else []
    tail = ["Artifacts of this run: " + ", ".join(f"`{a}`" for a in sorted(artifacts)) + "."]
    for shown in range(len(blocks), -1, -1):
        cut = [] if shown == len(blocks) else [
            f"**The report is cut here to fit the description: all of it is in `{REPORT_FOLDER}/report.md`.**"]
        description = "\n\n".join([*head, *blocks[:shown], *cut, *tail]) + "\n"
        if len(description) <= limit:
            break
    return SweepPage(description, artifacts)


def _machines_view_line(links: Links) -> str:
    return f"[The experiment's runs, each configuration on every machine side by side]({links.machines_view})"


def _description(ordered: Sequence[Row], rows: int, title: str, sweep_id: str, has_chart: bool,
                 run_link: Callable[[Row], str], links: Links, artifacts: Sequence[str]) -> str:
    """The markdown description with the first `rows` jobs of `ordered` in its tables."""
    shown, total = ordered[:rows], len(ordered)
    counts = ", ".join(f"{count} {status}" for status, count in status_counts(ordered).items())
    parts = [f"### {title}", f"{total} jobs: {counts}. Each job is a child run of this one; "
             "the job column links to it."]
    if links.machines_view:
        parts.append(_machines_view_line(links))
    if has_chart:
        parts.append(f"![speedup per job]({links.artifact(sweep_id, CHART)})")
    groups = by_workload(shown)
    for workload, mine in groups.items():
        suffix = f": {workload}" if len(groups) > 1 else ""
        jobs = [r for r in mine if not is_compile_run(r)]
        compiled = [r for r in mine if is_compile_run(r)]
        if jobs:
            parts += [f"#### Timing{suffix}", _markdown(jobs, summary_columns(workload), run_link),
                      f"*{summary_caption(jobs)}*"]
        if has_accuracy(jobs):
            parts += [f"#### Accuracy{suffix}", _markdown(jobs, ACCURACY_COLUMNS, run_link), f"*{ACCURACY_CAPTION}*"]
        for table in compile_tables(compiled):
            parts += [f"#### {COMPILE_HEADER}: {table.title}{suffix}", f"**{table.headline}**",
                      report.markdown_table(table.frame), f"*{table.caption}*"]
        if has_accuracy(compiled):
            parts += [f"#### Accuracy (baseline=compile){suffix}", _markdown(compiled, ACCURACY_COLUMNS, run_link),
                      f"*{ACCURACY_CAPTION}*"]
        if has_ops(mine):
            ops = op_frame(mine, lambda r: f"[{r['run_name']}]({run_link(r)})")
            parts += [f"#### {report.OPS_HEADING}{suffix}", report.markdown_table(ops), f"*{ops_caption(mine)}*"]
    if len(shown) < total:
        parts.append(f"**Only the first {len(shown)} of {total} jobs fit here: all are in `{RESULTS_CSV}`.**")
    parts.append("Artifacts of this run: " + ", ".join(f"`{a}`" for a in artifacts) + ".")
    return "\n\n".join(parts) + "\n"


def _markdown(shown: Sequence[Row], columns: Sequence[Column], run_link: Callable[[Row], str]) -> str:
    """The table as markdown, its first column the job's run name linking to the job's run page."""
    linked: tuple[Column, ...] = (("job", lambda r: f"[{r['run_name']}]({run_link(r)})"), *columns)
    return report.markdown_table(table_frame(shown, linked))
