"""Machine against machine: every configuration measured on two or more machines, side by side: each machine's
speedup, baseline latency and err_ratio, the ratio of their speedups with its interval, the ratio of their baseline
latencies, each machine's share of the limit per layer timed alone and its prediction gap, and what differs in their
software."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import pandas as pd

from sweep.records.results import RunStatus
from sweep.views.formatting import Row, format_number, metric, speedup_text
from sweep.views.ops import layers, limit_columns, speed_of_light
from sweep.views.summary import configuration
from sweep.views.table import CONFIG, DETAILS, NOT_RECORDED

# Paired runs agree on these. Their DETAILS may be unrecorded on one side (a run of an older sweep), and their
# kernels may differ (a local kernel at another path or hash): the `differs` column says so.
PAIRED_ON = ("workload", "baseline", *CONFIG, "kernels")
SOFTWARE = ("torch_version", "triton_version", "transformers_version", "kernels_version", "liger_kernel_version",
            "cuda_version")
MARK = " *"
# A kernel helps where its speedup's interval lies above 1 and the speedup is at least this: a verdict that changes
# between 1.000x and 1.002x is noise to a user, however narrow its intervals.
HELPS_FROM = 1.02
CAPTION = ("A / B speedup: A's speedup over B's. Its interval: on the log scale, the lower half-width is A's lower and "
           "B's upper half-width combined in quadrature, the upper one the other two (independent 95% intervals); "
           f"{MARK.strip()}: the interval excludes 1, the machines' speedups differ. B / A baseline: how many times "
           "faster A runs the model without kernels. ~: a speedup's interval includes 1. SOL and a layer's name: "
           "that layer timed alone, a copy of the same bytes' time over the kernel's, with its interval (1: at the "
           "limit no memory-bound kernel can beat; docs/speed-of-light.md); prediction gap: the measured speedup "
           "over the one the layers' shares and op speedups predict (both -: the run timed no layer alone). "
           f"Verdict changes: a kernel that helps (interval above 1, speedup at least {HELPS_FROM}x) or is exact "
           "(max diff 0) on one machine only.")


@dataclass(frozen=True)
class MachinePair:
    a: str  # the machines' labels (the results table's `gpu`)
    b: str
    headline: str
    rows: pd.DataFrame  # numbers, one row per configuration measured on both


def machine_pairs(latest: pd.DataFrame) -> list[MachinePair]:
    """For each two machines, the configurations (`latest_runs`, measured) that both measured, paired on PAIRED_ON:
    runs whose details and kernels agree first, then runs where one side did not record a detail or ran other
    kernels, each run in one pair at most."""
    measured = latest[latest["run_status"] == RunStatus.measured.value]
    pairs = []
    for a, b in combinations(sorted(measured["gpu"].unique()), 2):
        rows = []
        both = measured[measured["gpu"].isin([a, b])]
        for _, group in both.groupby(list(PAIRED_ON), dropna=False, sort=False):
            on_a, on_b = (group[group["gpu"] == m].to_dict("records") for m in (a, b))
            rows += [_pair(run_a, run_b) for run_a, run_b in _matches(on_a, on_b)]
        if rows:
            frame = pd.DataFrame(rows)
            pairs.append(MachinePair(a, b, _headline(a, b, frame), frame))
    return pairs


def _matches(on_a: list[Row], on_b: list[Row]) -> list[tuple[Row, Row]]:
    candidates = sorted((_mismatches(x, y), i, j) for i, x in enumerate(on_a) for j, y in enumerate(on_b)
                        if _comparable(x, y))
    taken_a, taken_b, matches = set(), set(), []
    for _, i, j in candidates:
        if i not in taken_a and j not in taken_b:
            taken_a.add(i)
            taken_b.add(j)
            matches.append((on_a[i], on_b[j]))
    return matches


def _comparable(x: Row, y: Row) -> bool:
    return all(x[c] == y[c] or NOT_RECORDED in (x[c], y[c]) for c in DETAILS)


def _mismatches(x: Row, y: Row) -> int:
    return sum(x[c] != y[c] for c in (*DETAILS, "kernel_identity"))


def speedup_ratio(a: Row, b: Row) -> tuple[float | None, float | None, float | None]:
    """A's speedup over B's, and its interval where both have one (see CAPTION)."""
    (sa, la, ha), (sb, lb, hb) = ([metric(r, n) for n in ("speedup", "speedup_ci_low", "speedup_ci_high")]
                                  for r in (a, b))
    if sa is None or sb is None or not sb:
        return None, None, None
    value = sa / sb
    if None in (la, ha, lb, hb) or min(la, lb, sa, sb) <= 0:  # type: ignore[operator]
        return value, None, None
    down = math.hypot(math.log(sa / la), math.log(hb / sb))  # type: ignore[operator]
    up = math.hypot(math.log(ha / sa), math.log(sb / lb))  # type: ignore[operator]
    return value, value * math.exp(-down), value * math.exp(up)


def _pair(a: Row, b: Row) -> dict[str, object]:
    value, low, high = speedup_ratio(a, b)
    baseline_a, baseline_b = metric(a, "latency_ms_baseline"), metric(b, "latency_ms_baseline")
    row: dict[str, object] = {c: a[c] for c in PAIRED_ON}
    row |= {"configuration": configuration(a, CONFIG), "kernel_label": a["kernel_label"], "details": a["details"]}
    for side, run in (("a", a), ("b", b)):
        row |= {f"{name}_{side}": run[name] for name in (
            "speedup", "speedup_ci_low", "speedup_ci_high", "latency_ms_baseline", "err_ratio", "max_abs_diff",
            "timing_mode_used", "gpu_name", "run_id", "store")}
        row |= {f"{name}_{side}": run.get(name) for layer in layers(run) for name in limit_columns(layer)}
        row[f"prediction_gap_{side}"] = run.get("prediction_gap")
    return row | {
        "speedup_ratio": value, "speedup_ratio_ci_low": low, "speedup_ratio_ci_high": high,
        "speedups_differ": low is not None and high is not None and not low <= 1.0 <= high,
        "baseline_ratio": baseline_b / baseline_a if baseline_a and baseline_b else None,
        "verdict": _verdict(a, b), "differs": _differences(a, b)}


def _verdict(a: Row, b: Row) -> str:
    """Where the verdict changes: a kernel that helps (HELPS_FROM) on one machine only, or that is exact (max diff
    0) on one only."""
    helps = [(metric(r, "speedup_ci_low") or 0.0) > 1.0 and (metric(r, "speedup") or 0.0) >= HELPS_FROM
             for r in (a, b)]
    exact = [metric(r, "max_abs_diff") == 0.0 for r in (a, b)]
    changes = []
    if helps[0] != helps[1]:
        changes.append(f"helps on {'A' if helps[0] else 'B'} only")
    if a["kernels"] != "none" and None not in (metric(a, "max_abs_diff"), metric(b, "max_abs_diff")) \
            and exact[0] != exact[1]:
        changes.append(f"exact on {'A' if exact[0] else 'B'} only")
    return "; ".join(changes)


def _differences(a: Row, b: Row) -> str:
    """The software of the two runs that differs (versions, kernels), and the details one side did not record."""
    found = [f"{c.removesuffix('_version')} {a[c] or '?'} / {b[c] or '?'}" for c in SOFTWARE if a[c] != b[c]]
    if a["kernel_identity"] != b["kernel_identity"]:
        found.append(f"kernels {a['kernel_identity'] or 'not recorded'} / {b['kernel_identity'] or 'not recorded'}")
    found += [f"{c} not recorded on {side}" for c in DETAILS if a[c] != b[c]
              for side, run in (("A", a), ("B", b)) if run[c] == NOT_RECORDED]
    return "; ".join(found)


def _headline(a: str, b: str, rows: pd.DataFrame) -> str:
    timed = rows[rows["speedup_ratio"].notna()]
    text = f"{a} vs {b}: speedups differ in {int(timed['speedups_differ'].sum())} of {len(timed)} configurations"
    changed = rows[rows["verdict"] != ""]
    if len(changed):
        text += f"; the verdict changes in {len(changed)}: " + ", ".join(
            f"{r.workload} {r.configuration} {r.kernel_label} ({r.verdict})" for r in changed.itertuples())
    software = int((rows["differs"] != "").sum())
    return text + (f"; {software} pairs differ in software (column differs)" if software else "")


def pair_table(pair: MachinePair) -> pd.DataFrame:
    """The pair's rows as text, A and B being `pair.a` and `pair.b`; a column per layer timed alone on either."""
    rows = pair.rows.to_dict("records")
    sides = {side: [_side(row, side) for row in rows] for side in ("a", "b")}
    timed = list(dict.fromkeys(layer for side in sides.values() for run in side for layer in layers(run)))
    limits = {f"{side.upper()} SOL {layer}": [speed_of_light(run, layer, f"op_sol_{layer}", interval=True)
                                              for run in sides[side]] for layer in timed for side in sides}
    if any(metric(run, "prediction_gap") is not None for side in sides.values() for run in side):
        limits |= {f"{side.upper()} prediction gap": [format_number(metric(run, "prediction_gap"), ".3f")
                                                      for run in sides[side]] for side in sides}
    frame = pair.rows
    return pd.DataFrame({
        "workload": frame["workload"], "baseline": frame["baseline"],
        "configuration": frame["configuration"], "kernels": frame["kernel_label"],
        "A speedup [CI]": [speedup_text(run) for run in sides["a"]],
        "B speedup [CI]": [speedup_text(run) for run in sides["b"]],
        "A / B speedup [CI]": [_ratio_text(row) for row in rows],
        "A baseline ms": frame["latency_ms_baseline_a"].map(lambda v: format_number(v, ".4g")),
        "B baseline ms": frame["latency_ms_baseline_b"].map(lambda v: format_number(v, ".4g")),
        "B / A baseline": frame["baseline_ratio"].map(lambda v: format_number(v, ".3f")),
        "A err_ratio": frame["err_ratio_a"].map(lambda v: format_number(v, ".3g")),
        "B err_ratio": frame["err_ratio_b"].map(lambda v: format_number(v, ".3g")),
        **limits, "verdict changes": frame["verdict"], "differs": frame["differs"],
    })


def _side(row: Row, side: str) -> dict[str, object]:
    """One machine's run of a pair's row: its own columns (`<name>_<side>`) by their bare names, and the timing
    mode both asked for."""
    suffix = f"_{side}"
    mine = {name.removesuffix(suffix): value for name, value in row.items() if name.endswith(suffix)}
    return mine | {"timing_mode": row["timing_mode"]}


def _ratio_text(row: Row) -> str:
    value, low, high = (metric(row, n) for n in ("speedup_ratio", "speedup_ratio_ci_low", "speedup_ratio_ci_high"))
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{value:.3f} [no interval]"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" + (MARK if row["speedups_differ"] else "")


def export_pairs(pairs: list[MachinePair]) -> pd.DataFrame:
    """Every pair's rows with the machines' labels, numbers as numbers (for CSV)."""
    return pd.concat([pair.rows.assign(machine_a=pair.a, machine_b=pair.b) for pair in pairs], ignore_index=True)
