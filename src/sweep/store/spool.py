"""The local spool: what could not be logged to the tracking store waits here as JSON files until uploaded."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.records.results import JobResult


class SpoolError(OSError):
    """The spool could not be written: a result would be lost, so the sweep cannot go on."""


@dataclass
class SpoolEntry:
    """One thing the store is owed: a job's run (`result`), or the end of a sweep's parent run (`sweep_end`)."""

    kind: str  # "job" | "sweep_end"
    tracking_uri: str  # redacted: credentials never reach the disk
    experiment: str
    sweep_id: str
    result: JobResult | None = None
    summary: dict[str, float] | None = None  # sweep_end: the parent's jobs_* and wall_s metrics
    failed: bool = False  # sweep_end: the parent ends FAILED

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "sweep_id": self.sweep_id, "result": self.result.to_dict() if self.result else None,
                "summary": self.summary, "failed": self.failed}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SpoolEntry:
        result = JobResult.from_dict(record["result"]) if record.get("result") else None
        return cls(kind=record["kind"], tracking_uri=record["tracking_uri"], experiment=record["experiment"],
                   sweep_id=record["sweep_id"], result=result, summary=record.get("summary"),
                   failed=bool(record.get("failed")))


class Spool:
    """A folder of entries; file names sort in the order they were written (jobs before their sweep's end)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def write(self, entry: SpoolEntry) -> Path:
        """Atomically (a reader never sees half a file); raises SpoolError if the disk refuses."""
        name = f"{time.time_ns():020d}-{entry.kind}-{uuid.uuid4().hex[:8]}.json"
        path = self.folder / name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(entry.to_dict()))
            os.replace(partial, path)
        except OSError as error:
            raise SpoolError(f"cannot write the spool {self.folder}: {error}") from error
        return path

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []

    @staticmethod
    def read(path: Path) -> SpoolEntry:
        return SpoolEntry.from_dict(json.loads(path.read_text()))

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)
