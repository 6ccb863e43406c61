"""Results reach the tracking store whatever happens to it: each is logged, or spooled with a warning when the
store does not take it, and the spool is uploaded once the store answers again (during the sweep, at its end,
by the next sweep, or by `python -m sweep.sync`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import TrackingConfig
from .redaction import MASK, redact_record, redact_uri
from .results import JobResult
from .spool import Spool, SpoolEntry
from .tracking import Tracker


def upload(tracker: Tracker, entry: SpoolEntry, run_id: str | None = None) -> None:
    """`run_id`: the job's run started when it began; from the spool there is none (`log_job` then replaces a
    run left RUNNING by its `job_uid`)."""
    if entry.kind == "job":
        assert entry.result is not None
        tracker.log_job(entry.sweep_id, entry.result, run_id)
    elif entry.kind == "sweep_end":
        tracker.end_sweep(entry.sweep_id, entry.summary or {}, failed=entry.failed)
    else:
        raise ValueError(f"unknown spool entry kind {entry.kind!r}")


@dataclass
class SyncReport:
    uploaded: int = 0
    left: int = 0
    errors: list[str] = field(default_factory=list)


def upload_spool(tracker: Tracker, spool: Spool, addressed_to: tuple[str, str] | None = None) -> SyncReport:
    """Uploads, oldest first, the entries addressed to (tracking URI, experiment), by default the tracker's own;
    each file is removed once its entry is in the store. Stops at the first failure: the store is down again."""
    report = SyncReport()
    store = addressed_to or (redact_uri(tracker.uri), tracker.experiment)
    for path in spool.pending():
        try:
            entry = Spool.read(path)
        except (OSError, ValueError, KeyError) as error:  # unreadable: left in place for a person to look at
            report.errors.append(f"{path.name}: unreadable spool entry: {error}")
            continue
        if (entry.tracking_uri, entry.experiment) != store:
            continue
        if report.errors:
            report.left += 1
            continue
        try:
            upload(tracker, entry)
        except Exception as error:  # any failure leaves the entry for the next attempt
            report.errors.append(f"{path.name}: {type(error).__name__}: {error}")
            report.left += 1
            continue
        Spool.remove(path)
        report.uploaded += 1
    return report


class Delivery:
    """Logs through the tracker while the store answers; otherwise writes to the spool at once and warns.
    After a failure, each later delivery first probes the store once (no retries): if it answers, the spool is
    uploaded before the new result."""

    def __init__(self, tracker: Tracker, spool: Spool, warn: Callable[[str], None]):
        self.tracker = tracker
        self.spool = spool
        self.warn = warn
        self.store_down = False

    def log_job(self, sweep_id: str, result: JobResult, run_id: str | None = None) -> None:
        self._deliver(self._entry("job", sweep_id, result=redact_record(result)), f"job {result.name!r}", run_id)

    def end_sweep(self, sweep_id: str, summary: dict[str, float], failed: bool) -> None:
        self._deliver(self._entry("sweep_end", sweep_id, summary=summary, failed=failed), "the end of the sweep")

    def flush(self) -> SyncReport:
        report = upload_spool(self.tracker, self.spool)
        if report.uploaded:
            self.warn(f"uploaded {report.uploaded} spooled result(s) from {self.spool.folder} to "
                      f"{redact_uri(self.tracker.uri)}")
        if report.errors:
            self.store_down = True
        return report

    def _entry(self, kind: str, sweep_id: str, **content: object) -> SpoolEntry:
        uri = redact_uri(self.tracker.uri)
        return SpoolEntry(kind, uri, self.tracker.experiment, sweep_id, **content)  # type: ignore[arg-type]

    def _deliver(self, entry: SpoolEntry, what: str, run_id: str | None = None) -> None:
        if self.store_down:
            if not self.tracker.is_reachable():
                self._spool(entry, what, "the store still does not answer")
                return
            self.store_down = False
            if self.flush().errors:
                self._spool(entry, what, "the store failed again while the spool was uploaded")
                return
        try:
            upload(self.tracker, entry, run_id)
        except Exception as error:  # whatever the store's failure, the result must not be lost
            self.store_down = True
            self._spool(entry, what, f"{type(error).__name__}: {str(error)[:300]}")

    def _spool(self, entry: SpoolEntry, what: str, why: str) -> None:
        path = self.spool.write(entry)  # SpoolError: nowhere left to keep it; the caller stops the sweep
        self.warn(f"tracking store {entry.tracking_uri} did not take {what} ({why}); kept in {path}. It is "
                  "uploaded when the store answers again, at the end of this sweep or the next, or by "
                  "`python -m sweep.sync`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep.sync",
                                     description="Upload the results a sweep spooled while its store was away.")
    parser.add_argument("--spool", default=TrackingConfig.spool_dir, help="the spool folder (tracking.spool_dir)")
    parser.add_argument("--tracking-uri", help="upload every entry here instead of the store it was meant for "
                        "(needed when that store's URI held credentials, which the spool does not keep)")
    parser.add_argument("--artifact-root", default=TrackingConfig.artifact_root,
                        help="artifact root if the experiment must be created in a local store")
    args = parser.parse_args(argv)
    spool = Spool(args.spool)
    stores = sorted({(Spool.read(p).tracking_uri, Spool.read(p).experiment) for p in spool.pending()})
    if not stores:
        print(f"sweep.sync: nothing to upload in {spool.folder}")
        return 0
    remaining = 0
    for uri, experiment in stores:
        target = args.tracking_uri or uri
        if MASK in target:
            print(f"sweep.sync: entries for {uri} kept: its credentials are not stored; pass --tracking-uri",
                  file=sys.stderr)
            remaining += 1
            continue
        try:
            tracker = Tracker(TrackingConfig(uri=target, experiment=experiment, artifact_root=args.artifact_root))
        except Exception as error:  # unreachable store: keep everything for the next attempt
            print(f"sweep.sync: {redact_uri(target)}: {error}", file=sys.stderr)
            remaining += 1
            continue
        report = upload_spool(tracker, spool, addressed_to=(uri, experiment))
        print(f"sweep.sync: {report.uploaded} uploaded to {redact_uri(target)} (experiment {experiment!r}), "
              f"{report.left} left")
        for error in report.errors:
            print(f"sweep.sync: {error}", file=sys.stderr)
        remaining += report.left
    return 0 if remaining == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
