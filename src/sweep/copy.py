"""`python -m sweep.copy`: bring one store's sweeps into another, e.g. a machine's sqlite file into the team's server.
Copying again adds only what the target lacks.

    python -m sweep.copy --from sqlite:///gb10/mlflow.db --to http://tracking-host:5000 --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from mlflow.exceptions import MlflowException

from sweep.config import TrackingConfig
from sweep.records.redaction import redact_uri
from sweep.store.copy import (
    CopyError,
    SweepCopy,
    check_different_stores,
    copy_sweeps,
    open_source,
    open_target,
    plan_copy,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweep.copy", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, metavar="URI",
                        help="the store to copy from, e.g. sqlite:///gb10/mlflow.db")
    parser.add_argument("--to", dest="target", required=True, metavar="URI",
                        help="the store to copy into, e.g. http://tracking-host:5000")
    parser.add_argument("--experiment", default=TrackingConfig.experiment, help="in both stores (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be copied and write nothing")
    parser.add_argument("--from-artifact-root", metavar="DIR",
                        help="where the source's artifact folder is now, when the store was moved or comes from "
                             "another machine (it was tracking.artifact_root there)")
    parser.add_argument("--to-artifact-root", metavar="DIR",
                        help="artifact folder of the experiment when it is created in a local target "
                             "(default: artifacts/ beside its sqlite file)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per run would bury the summary
    try:
        check_different_stores(args.source, args.target)
        source = open_source(args.source, args.experiment, args.from_artifact_root)
        target = open_target(args.target, args.experiment, args.to_artifact_root, create=not args.dry_run)
        plan = plan_copy(source, target)
    except CopyError as error:
        print(f"sweep.copy: {error}", file=sys.stderr)
        return 2
    print(f"sweep.copy: {redact_uri(args.source)} -> {redact_uri(args.target)}, experiment {args.experiment!r}")
    for sweep in plan:
        print(sweep_line(sweep))
    sweeps, jobs = sum(s.parent.pending for s in plan), sum(j.pending for s in plan for j in s.jobs)
    pending = f"{counted(sweeps, 'sweep')} and {counted(jobs, 'job run')}"
    there = (f"already there: {counted(len(plan) - sweeps, 'sweep')} and "
             f"{counted(sum(len(s.jobs) for s in plan) - jobs, 'job run')}")
    if args.dry_run:
        print(f"would copy {pending}; {there} (dry run: nothing written)")
        return 0
    assert target is not None  # created unless dry run
    try:
        copy_sweeps(source, target, plan)
    except (MlflowException, OSError) as error:
        print(f"sweep.copy: stopped: {type(error).__name__}: {str(error)[:500]}; run the command again to copy the "
              "rest", file=sys.stderr)
        return 1
    print(f"copied {pending}; {there}")
    return 0


def counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def sweep_line(sweep: SweepCopy) -> str:
    """`  sweep 1a2b3c4d 'python -m sweep -m ...' (2026-12-02 06:10, FINISHED): new, 4 of 4 job runs to copy`"""
    run = sweep.parent.source
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
    state = "new" if sweep.parent.existing is None else "out of date" if sweep.parent.pending else "already there"
    jobs = sum(job.pending for job in sweep.jobs)
    return (f"  sweep {run.info.run_id[:8]} {run.info.run_name!r} ({started}, {run.info.status}): {state}, "
            f"{jobs} of {len(sweep.jobs)} job runs to copy")


if __name__ == "__main__":
    sys.exit(main())
