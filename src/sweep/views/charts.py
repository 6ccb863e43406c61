"""The sweep's speedup chart: one bar per job, drawn from 1 (no change) to its speedup, with its confidence
interval; jobs grouped by configuration as in the summary table."""

from __future__ import annotations

import io
import textwrap
from itertools import groupby

import pandas as pd
from matplotlib.figure import Figure

from sweep.views.comparison import kernel_label
from sweep.views.formatting import Row, metric, timing_marker, timing_notes
from sweep.views.summary import configuration, grouped, varying_configuration

BAR_WIDTH = 0.8
GROUP_GAP = 0.8


def speedup_chart(jobs: pd.DataFrame, title: str) -> bytes | None:
    """PNG of the speedups of the sweep's jobs (the results table) in the summary table's order; None when no job
    has a speedup."""
    rows = jobs.to_dict("records")
    if not any(metric(r, "speedup") is not None for r in rows):
        return None
    shown = varying_configuration(rows)
    ordered = grouped(rows)
    groups = [(label, list(mine)) for label, mine in groupby(ordered, key=lambda r: configuration(r, shown))]
    kernels = list(dict.fromkeys(kernel_label(r) for r in ordered))
    colours = {name: f"C{i % 10}" for i, name in enumerate(kernels)}

    width = min(30, max(7.0, 2.5 + 0.7 * len(ordered) + 0.5 * len(groups)))
    figure = Figure(figsize=(width, 4.8), layout="constrained")
    ax = figure.subplots()
    position, ticks, centres, separators = 0.0, [], [], []
    for _, mine in groups:
        if ticks:
            separators.append(position - (1 + GROUP_GAP) / 2)
        start = position
        for row in mine:
            _bar(ax, position, row, colours[kernel_label(row)])
            ticks.append((position, kernel_label(row)))
            position += 1
        centres.append((start + position - 1) / 2)
        position += GROUP_GAP
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks([p for p, _ in ticks], [name for _, name in ticks], rotation=30, ha="right")
    for centre, (label, _) in zip(centres, groups):
        ax.annotate(label, (centre, 1), xycoords=("data", "axes fraction"), xytext=(0, -4),
                    textcoords="offset points", ha="center", va="top", fontweight="bold")
    for boundary in separators:
        ax.axvline(boundary, color="lightgrey", linewidth=1)
    ax.set_ylabel("speedup (baseline / kernel)")
    wrapped = textwrap.wrap(title, width=int(width * 11))
    legend = ["bars: speedup, whiskers: 95% interval, dashed: no change"]
    legend += timing_notes(ordered)
    ax.set_title("\n".join([*wrapped, *legend]))
    ax.margins(y=0.25)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _bar(ax, position: float, row: Row, colour: str) -> None:
    speedup = metric(row, "speedup")
    if speedup is None:
        ax.annotate(str(row["run_status"]), (position, 1.0), ha="center", va="bottom", rotation=90, color="grey")
        return
    low, high = (metric(row, name) or speedup for name in ("speedup_ci_low", "speedup_ci_high"))
    errors = [[max(0.0, speedup - low)], [max(0.0, high - speedup)]]
    ax.bar(position, speedup - 1.0, BAR_WIDTH, bottom=1.0, yerr=errors, capsize=4, color=colour)
    label = f"{speedup:.3f}x{timing_marker(row)}"
    ax.annotate(label, (position, high), xytext=(0, 3), textcoords="offset points",
                ha="center", va="bottom", fontsize="small")
