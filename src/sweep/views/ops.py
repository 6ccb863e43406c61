"""The op table: each kernelized layer of each job timed alone (`sweep.measure.ops`), eager against the kernel,
against a copy of its bytes (the speed of light), its share of the step, and what the shares predict for the
model beside what it measured. One row per job and layer, built from the job's metrics and tags."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from sweep.views.formatting import Row, format_number, metric, present, speedup_text, timing_notes

OPS_CAPTION = ("each layer timed alone at the model's shapes, per call. SOL (speed of light): a copy of the same "
               "bytes' time over the op's, 1 at the limit no memory-bound kernel can beat ('at the limit': up to "
               "10% above it; 'bytes counted wrong': faster still). share: of the baseline step's time. predicted: "
               "the step's speedup from the shares and op speedups (Amdahl); gap = measured / predicted. ~ : the "
               "interval includes 1")
COMPUTE_BOUND = "compute-bound"
BYTES_MISCOUNTED = "bytes counted wrong"
# Above 1 but within the margin `sweep.measure.ops` allows a copy: as fast as the copy, never shown as faster.
AT_THE_LIMIT = "at the limit"
_CALLS = "op_calls_"


def layers(row: Row) -> list[str]:
    """The layers the job timed alone, in the order it logged them."""
    return [name.removeprefix(_CALLS) for name in row if name.startswith(_CALLS) and metric(row, name) is not None]


def has_ops(rows: Sequence[Row]) -> bool:
    return any(layers(row) for row in rows)


def ops_caption(rows: Sequence[Row]) -> str:
    """The op table's caption, with the `timing_marker`'s note where a job that timed its layers carries it."""
    return "; ".join([OPS_CAPTION, *timing_notes(row for row in rows if layers(row))])


def _us(row: Row, name: str) -> str:
    value = metric(row, name)
    return format_number(None if value is None else value * 1e3, ".1f")


def speed_of_light(row: Row, layer: str, name: str, interval: bool = False) -> str:
    """The layer's share of the limit, the metric `name` (`op_sol_<Layer>`: the kernel's; `op_sol_baseline_<Layer>`:
    the baseline's), with its interval where asked and logged; what stands instead where there is none to show:
    compute-bound, bytes counted wrong, at the limit."""
    if present(row.get(f"op_bound_{layer}")) == "compute":
        return COMPUTE_BOUND
    if present(row.get(f"op_bytes_miscounted_{layer}")):
        return BYTES_MISCOUNTED
    value, low, high = (metric(row, f"{name}{suffix}") for suffix in ("", "_ci_low", "_ci_high"))
    if value is not None and value > 1.0:
        return AT_THE_LIMIT
    if not interval or low is None or high is None:
        return format_number(value, ".2f")
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def limit_columns(layer: str) -> tuple[str, ...]:
    """What `speed_of_light` reads of the kernel's share of the limit, and what `layers` finds the layer by."""
    return (f"{_CALLS}{layer}", f"op_sol_{layer}", f"op_sol_{layer}_ci_low", f"op_sol_{layer}_ci_high",
            f"op_bound_{layer}", f"op_bytes_miscounted_{layer}")


def _op_row(row: Row, layer: str) -> dict[str, str]:
    return {
        "layer": layer,
        "calls": format_number(metric(row, f"op_calls_{layer}"), ".0f"),
        "baseline µs": _us(row, f"op_ms_baseline_{layer}"),
        "kernel µs": _us(row, f"op_ms_kernel_{layer}"),
        "op speedup [95% CI]": speedup_text(row, f"op_speedup_{layer}"),
        "copy µs": _us(row, f"op_ms_copy_{layer}"),
        "kernel GB/s": format_number(metric(row, f"op_gbps_kernel_{layer}"), ".0f"),
        "SOL baseline": speed_of_light(row, layer, f"op_sol_baseline_{layer}"),
        "SOL kernel": speed_of_light(row, layer, f"op_sol_{layer}"),
        "share": format_number(metric(row, f"op_share_{layer}"), ".3f"),
    }


def _prediction(row: Row) -> dict[str, str]:
    predicted, measured = metric(row, "predicted_speedup"), metric(row, "speedup")
    return {
        "predicted": "-" if predicted is None else f"{predicted:.3f}x",
        "measured": "-" if measured is None else f"{measured:.3f}x",
        "gap": format_number(metric(row, "prediction_gap"), ".3f"),
    }


def op_frame(rows: Sequence[Row], job: Callable[[Row], str] = lambda row: str(row["run_name"])) -> pd.DataFrame:
    """One row per job and layer timed alone, as text; the job's prediction and measured speedup on its first
    layer's row. `job`: the job column's cell (its name, or a link to it)."""
    cells = []
    for row in rows:
        for index, layer in enumerate(layers(row)):
            prediction = _prediction(row) if index == 0 else dict.fromkeys(("predicted", "measured", "gap"), "")
            cells.append({"job": job(row) if index == 0 else "", **_op_row(row, layer), **prediction})
    return pd.DataFrame(cells)
