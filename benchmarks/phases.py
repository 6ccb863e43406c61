"""Where a sweep's time goes: for each sweep in a store, its start-up (`startup_s_*`: seconds from process start to
each milestone, and the CUDA start-up) and each job's phases (`phase_s_*`), as markdown tables.

    python benchmarks/phases.py sqlite:///runs/mlflow.db [--last N]
    python benchmarks/phases.py --importtime importtime.txt   # `python -X importtime -c "import sweep.__main__"`
"""

from __future__ import annotations

import argparse
from pathlib import Path

STARTUP = ("imports", "config", "store", "cuda", "triton", "first_job", "table")
PHASES = ("load", "reference", "kernelize", "numerics", "capture", "timing", "ops")


def _cell(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.2f}" if key in metrics else "-"


def sweeps(uri: str, last: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kernel-sweep")
    parents = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'parent'",
                                 order_by=["attributes.start_time ASC"])[-last:]
    for parent in parents:
        metrics = parent.data.metrics
        print(f"\n### {parent.info.run_name} ({parent.info.run_id[:8]})\n")
        print("| " + " | ".join(f"startup_s_{name}" for name in STARTUP) + " | wall_s (session) |")
        print("|" + "---|" * (len(STARTUP) + 1))
        print("| " + " | ".join(_cell(metrics, f"startup_s_{name}") for name in STARTUP)
              + f" | {_cell(metrics, 'wall_s')} |\n")
        jobs = client.search_runs([experiment.experiment_id],
                                  f"tags.sweep_id = '{parent.info.run_id}' and tags.sweep_role = 'job'",
                                  order_by=["attributes.start_time ASC"])
        print("| job | job_wall_s | " + " | ".join(PHASES) + " | timing_s | blocks x rounds |")
        print("|" + "---|" * (len(PHASES) + 4))
        totals = dict.fromkeys(("job_wall_s", *PHASES, "timing_s"), 0.0)
        for job in jobs:
            m = job.data.metrics
            for key in totals:
                totals[key] += m.get(key if key in ("job_wall_s", "timing_s") else f"phase_s_{key}", 0.0)
            shape = (f"{m['timing_blocks']:.0f} x {m['timing_rounds'] / m['timing_blocks']:.0f}"
                     if "timing_blocks" in m else f"{m.get('timing_rounds', 0):.0f} rounds")
            print(f"| {job.info.run_name} | {_cell(m, 'job_wall_s')} | "
                  + " | ".join(_cell(m, f"phase_s_{p}") for p in PHASES) + f" | {_cell(m, 'timing_s')} | {shape} |")
        print("| **all jobs** | " + " | ".join(f"{v:.2f}" for v in totals.values()) + " | |")


def imports(path: Path, top: int = 25) -> None:
    """The slowest imports (cumulative), outermost first, from `python -X importtime`'s output."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((int(cumulative) / 1e6, depth, name.strip()))
    print(f"\nslowest imports (cumulative s, nesting depth), top {top}:")
    for seconds, depth, name in sorted(rows, reverse=True)[:top]:
        print(f"  {seconds:6.2f}  {'  ' * depth}{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", nargs="?", help="MLflow tracking URI")
    parser.add_argument("--last", type=int, default=10, help="the last N sweeps of the store")
    parser.add_argument("--importtime", type=Path, help="summarise python -X importtime output instead")
    args = parser.parse_args()
    if args.importtime:
        imports(args.importtime)
    if args.store:
        sweeps(args.store, args.last)


if __name__ == "__main__":
    main()
