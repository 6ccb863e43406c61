"""What one job produced: plain data, handed to tracking and to the summary table."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


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
