"""What one job produced: plain data, handed to tracking and to the summary table."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class RunStatus(str, Enum):
    measured = "measured"
    skipped = "skipped"
    failed = "failed"


@dataclass
class JobResult:
    name: str  # readable run name, e.g. "bf16 rms T=118"
    params: dict[str, str]
    status: RunStatus = RunStatus.measured
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact path -> text content
    files: dict[str, Path] = field(default_factory=dict)  # artifact directory -> local file
