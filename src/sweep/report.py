"""`python -m sweep.report`: the report app. Reads child runs from MLflow stores, tabulates them per GPU, compares
machines, plots them.

    python -m sweep.report --tracking-uri sqlite:///a/mlflow.db --tracking-uri sqlite:///b/mlflow.db --out report/

With --log-run the report is also logged as a run of the experiment in the first store it read, so that the
comparison can be browsed in the MLflow UI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException

from sweep.config import TrackingConfig
from sweep.store.tracking import DESCRIPTION_LIMIT, Tracker
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
from sweep.views.summary import job_description
from sweep.views.sweep_page import Links, report_page
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
    parser.add_argument("--log-run", action="store_true",
                        help="also log the report as a run of the experiment in the first store read: its tables as "
                        "the run's description, the report in every format and its plots as artifacts")
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
    else:
        written = write_report(runs, args.out, args.format)
        print("wrote " + ", ".join(str(p) for p in written))
        for pair in machine_pairs(runs):
            print(pair.headline)
    if args.log_run:
        store = next(uri for uri in uris if uri in set(runs["store"]))
        try:
            pages = _log_run(runs, store, args.experiment)
        except (MlflowException, OSError) as e:  # OSError: ConnectionError and the HTTP client's errors
            print(f"error: the report could not be logged as a run in {store}: {e}", file=sys.stderr)
            return 2
        print("\n".join(pages), file=sys.stderr if args.out is None else sys.stdout)
    return 0


def _log_run(runs: pd.DataFrame, uri: str, experiment: str) -> list[str]:
    """The report logged as a run of `experiment` in the store `uri`; the lines that say where to see it."""
    tracker = Tracker(TrackingConfig(uri=uri, experiment=experiment), describe=job_description)
    links = Links(tracker.run_link, tracker.artifact_link, tracker.machines_view_link())

    def page(run_id: str) -> tuple[str, dict[str, str | bytes]]:
        shown = report_page(runs, run_id, links, DESCRIPTION_LIMIT)
        return shown.description, shown.artifacts

    run_id = tracker.log_report(f"report: {len(runs)} runs on {', '.join(runs['gpu'].unique())}", page)
    command = tracker.ui_command()
    return [*([f"browse the runs: {command}"] if command else []), f"the report's run: {tracker.run_page(run_id)}",
            f"every machine's runs side by side: {tracker.machines_view_page()}"]


def _warn_skipped(error: StoreError) -> None:
    print(f"warning: store left out of the report: {error}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
