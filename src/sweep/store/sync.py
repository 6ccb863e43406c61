"""Results reach the tracking store whatever happens to it: each is logged, or spooled with a warning when the
store does not take it, and the spool is uploaded once the store answers again (during the sweep, at its end,
by the next sweep, or by `python -m sweep.sync`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sweep.records.redaction import redact_record, redact_uri
from sweep.records.results import JobResult
from sweep.store.spool import Spool, SpoolEntry
from sweep.store.tracking import Tracker


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
