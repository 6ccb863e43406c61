"""Compares the same sweep run serially and with the parallel launcher: GPUs used, overlaps on one GPU,
contention, wall time, and the speedups side by side. Usage: python benchmarks/compare_sweeps.py SERIAL_URI
PARALLEL_URI [--out report.md]"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient


def latest_sweep(uri: str) -> tuple[Run, list[Run]]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kernel-sweep")
    parents = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit(f"no sweep in {uri}")
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id], f"tags.sweep_id = '{parent.info.run_id}'",
                                  max_results=10000)
    return parent, children


def overlaps(children: list[Run]) -> list[str]:
    """Pairs of runs whose [start, end] intervals intersect on one GPU (there must be none)."""
    by_device: dict[str, list[Run]] = defaultdict(list)
    for run in children:
        by_device[run.data.tags.get("gpu_uuid", "none")].append(run)
    found = []
    for device, runs in by_device.items():
        runs.sort(key=lambda r: r.info.start_time)
        for before, after in zip(runs, runs[1:], strict=False):
            if after.info.start_time < before.info.end_time:
                found.append(f"{device}: {before.info.run_name} / {after.info.run_name}")
    return found


def workers(parent: Run, children: list[Run]) -> list[str]:
    """Each worker process: its GPUs, how many jobs it ran, when its first run started after the sweep's."""
    by_pid: dict[str, list[Run]] = defaultdict(list)
    for run in children:
        by_pid[run.data.tags.get("worker_pid", "?")].append(run)
    lines = []
    for pid, runs in sorted(by_pid.items(), key=lambda item: min(r.info.start_time for r in item[1])):
        first = (min(r.info.start_time for r in runs) - parent.info.start_time) / 1000
        gpus = ", ".join(sorted({r.data.tags.get("gpu_index", "-") for r in runs}))
        lines.append(f"pid {pid} (GPU {gpus}: {len(runs)} jobs, first from {first:.1f} s)")
    return lines


def gpu_busy(parent: Run, children: list[Run]) -> list[str]:
    """Per GPU: its runs' time against the sweep's wall time (the rest: start-up, waits, the end-of-sweep tables)."""
    wall = (parent.info.end_time - parent.info.start_time) / 1000 if parent.info.end_time else float("nan")
    by_gpu: dict[str, list[Run]] = defaultdict(list)
    for run in children:
        by_gpu[run.data.tags.get("gpu_index", "-")].append(run)
    in_runs = {gpu: sum((r.info.end_time or r.info.start_time) - r.info.start_time for r in runs) / 1000
               for gpu, runs in by_gpu.items()}
    return [f"GPU {gpu}: {len(by_gpu[gpu])} runs, {seconds:.1f} s in runs of the sweep's {wall:.1f} s"
            for gpu, seconds in sorted(in_runs.items())]


def key(run: Run) -> tuple[str, str, int]:
    p = run.data.params
    return p["dtype"], p["kernels"], int(p["prompt_len"])


def speedup(run: Run | None) -> str:
    if run is None or "speedup" not in run.data.metrics:
        return "-" if run is None else run.data.tags.get("run_status", "?")
    m = run.data.metrics
    return f"{m['speedup']:.3f} [{m['speedup_ci_low']:.3f}, {m['speedup_ci_high']:.3f}]"


def agree(a: Run | None, b: Run | None) -> str:
    if a is None or b is None or "speedup" not in a.data.metrics or "speedup" not in b.data.metrics:
        return "-"
    ma, mb = a.data.metrics, b.data.metrics
    return "yes" if ma["speedup_ci_low"] <= mb["speedup_ci_high"] and mb["speedup_ci_low"] <= ma["speedup_ci_high"] \
        else "no"


def describe(name: str, parent: Run, children: list[Run]) -> list[str]:
    tags = [r.data.tags for r in children]
    statuses = defaultdict(int)
    for t in tags:
        statuses[t.get("run_status", "running")] += 1
    contended = defaultdict(int)
    for t in tags:
        contended[t.get("gpu_contended", "not checked")] += 1
    return [
        f"## {name}: sweep {parent.info.run_id[:8]}, {parent.info.status}",
        f"- wall time: {parent.data.metrics.get('wall_s', float('nan')):.1f} s (parent run `wall_s`)",
        f"- jobs: {dict(statuses)}",
        f"- GPUs used (`gpu_index`): {sorted({t.get('gpu_index', '-') for t in tags})}, "
        f"devices {sorted({t.get('gpu_uuid', '-') for t in tags})}",
        f"- worker processes: {len({t.get('worker_pid') for t in tags})}: {'; '.join(workers(parent, children))}",
        f"- GPU time: {'; '.join(gpu_busy(parent, children))}",
        f"- `gpu_contended`: {dict(contended)}",
        f"- runs overlapping on one GPU: {overlaps(children) or 'none'}",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("serial")
    parser.add_argument("parallel")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    serial_parent, serial = latest_sweep(args.serial)
    parallel_parent, parallel = latest_sweep(args.parallel)
    lines = ["# Serial vs parallel sweep", "", *describe("serial", serial_parent, serial),
             *describe("parallel", parallel_parent, parallel)]
    serial_wall = serial_parent.data.metrics.get("wall_s")
    parallel_wall = parallel_parent.data.metrics.get("wall_s")
    if serial_wall and parallel_wall:
        lines += [f"Parallel sweep {serial_wall / parallel_wall:.2f}x faster in wall time.", ""]
    by_key = {"serial": {key(r): r for r in serial}, "parallel": {key(r): r for r in parallel}}
    lines += ["| dtype | kernels | T | speedup serial [95% CI] | speedup parallel [95% CI] | CIs overlap | "
              "baseline ms serial | baseline ms parallel |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted(set(by_key["serial"]) | set(by_key["parallel"])):
        a, b = by_key["serial"].get(k), by_key["parallel"].get(k)
        base = [f"{r.data.metrics['latency_ms_baseline']:.4f}" if r and "latency_ms_baseline" in r.data.metrics
                else "-" for r in (a, b)]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {speedup(a)} | {speedup(b)} | {agree(a, b)} | "
                     f"{base[0]} | {base[1]} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
