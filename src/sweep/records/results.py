"""What one job produced: plain data, handed to tracking, to the spool and to the summary table."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Bump when a field is added, removed or changes meaning; `from_dict` refuses records of another version.
SCHEMA_VERSION = 1
# A job's artifact that the measure layer writes and the views read: its kernelized layers timed alone, time against
# bytes moved (sweep.measure.ops).
OPS_PLOT = "ops/ops.png"


class RunStatus(str, Enum):
    measured = "measured"
    skipped = "skipped"
    failed = "failed"
    killed = "killed"  # interrupted (Ctrl-C, SIGTERM): a resumed sweep measures it again


@dataclass
class JobResult:
    name: str  # readable run name, e.g. "bf16 rms T=118"
    params: dict[str, str]
    status: RunStatus = RunStatus.measured
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str | bytes] = field(default_factory=dict)  # artifact path -> text or file content
    # Identifies the record wherever it goes (MLflow tag `job_uid`): an upload retried from the spool finds it.
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    ended_ms: int = field(default_factory=lambda: int(time.time() * 1000))  # metric timestamps, also when spooled

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: bytes artifacts become {"base64": ...}; the schema version goes along."""
        artifacts = {path: {"base64": base64.b64encode(content).decode()} if isinstance(content, bytes) else content
                     for path, content in self.artifacts.items()}
        return {"schema_version": SCHEMA_VERSION, "name": self.name, "params": dict(self.params),
                "status": self.status.value, "reason": self.reason, "metrics": dict(self.metrics),
                "tags": dict(self.tags), "artifacts": artifacts, "uid": self.uid, "ended_ms": self.ended_ms}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> JobResult:
        version = record.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"job record of schema version {version!r}; this sweep reads version {SCHEMA_VERSION}: "
                             "upload it with the sweep version that wrote it")
        artifacts = {path: base64.b64decode(content["base64"]) if isinstance(content, dict) else content
                     for path, content in record["artifacts"].items()}
        return cls(name=record["name"], params=dict(record["params"]), status=RunStatus(record["status"]),
                   reason=record["reason"], metrics={k: float(v) for k, v in record["metrics"].items()},
                   tags=dict(record["tags"]), artifacts=artifacts, uid=record["uid"], ended_ms=int(record["ended_ms"]))
