"""`python -m sweep.report`: the report app. Reads child runs from MLflow stores, tabulates them per GPU, compares
machines, plots them.

    python -m sweep.report --tracking-uri sqlite:///a/mlflow.db --tracking-uri sqlite:///b/mlflow.db --out report/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sweep.views.machines import machine_pairs
from sweep.views.report import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    ReportError,
    StoreError,
    load_runs,
    render,
    write_report,
)
from sweep.views.table import latest_runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweep.report", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", action="append", dest="uris", metavar="URI",
                        help=f"MLflow store to read; repeat to combine stores (default {DEFAULT_URI})")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment name (default %(default)s)")
    parser.add_argument("--sweep", action="append", dest="sweep_ids", default=[], metavar="ID",
                        help="only this sweep (parent run id); may repeat")
    parser.add_argument("--filter", dest="filter_string", metavar="EXPR",
                        help="extra MLflow search filter, e.g. \"params.dtype = 'bf16'\"")
    parser.add_argument("--format", choices=("md", "csv", "html"), default="md", help="default %(default)s")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write report.<format> and PNG plots here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    uris = args.uris or [DEFAULT_URI]
    try:
        runs = load_runs(uris, args.experiment, args.sweep_ids, args.filter_string, skip=_warn_skipped)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if runs.empty:
        print(f"no runs: experiment {args.experiment!r} in {', '.join(uris)} has no child runs"
              " matching --sweep/--filter", file=sys.stderr)
        return 1
    runs = latest_runs(runs)
    if args.out is None:
        sys.stdout.write(render(runs, args.format))
        return 0
    written = write_report(runs, args.out, args.format)
    print("wrote " + ", ".join(str(p) for p in written))
    for pair in machine_pairs(runs):
        print(pair.headline)
    return 0


def _warn_skipped(error: StoreError) -> None:
    print(f"warning: store left out of the report: {error}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
