"""Process-wide state of one sweep invocation: the MLflow parent run, the model cache, the results so far.
Opened and closed by Hydra's callbacks around a run or multirun; every job of the sweep shares it."""

from __future__ import annotations

import sys
import time
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from .config import TrackingConfig
from .models import ModelCache
from .results import JobResult, RunStatus
from .summary import accuracy_table, has_accuracy, summary_table
from .sweep_page import Links, report_files, sweep_page
from .tracking import DESCRIPTION_LIMIT, Tracker


class SweepSession:
    def __init__(self, tracking: TrackingConfig, name: str, total_jobs: int | None, console: Console | None = None,
                 swept_keys: frozenset[str] = frozenset()):
        # Off a terminal (CI logs, files) rich would wrap the summary table at 80 columns.
        self.console = console or Console(width=None if sys.stdout.isatty() else 200)
        self.tracker = Tracker(tracking)
        self.name, self.experiment = name, tracking.experiment
        self.swept_keys = swept_keys
        self.sweep_id = self.tracker.start_sweep(name, tags={"total_jobs": str(total_jobs or "")})
        self.models = ModelCache()
        self.results: list[JobResult] = []
        self.total_jobs = total_jobs
        self.started = time.perf_counter()
        self.console.print(f"[bold]sweep[/] {name}: logging to {tracking.uri} (experiment {tracking.experiment!r})")

    def swept_overrides(self) -> list[tuple[str, str]]:
        """(key, override) for each override of the running job whose key this sweep varies, for `job_name`."""
        if not self.swept_keys or not HydraConfig.initialized():
            return []
        job = _parse_overrides(list(HydraConfig.get().overrides.task))
        return [(o.key_or_group, o.input_line) for o in job if o.key_or_group in self.swept_keys]

    def job_label(self, name: str, index: int | None = None) -> str:
        """`[3/6] bf16 both T=118`; by default for the job about to run."""
        total = f"/{self.total_jobs}" if self.total_jobs else ""
        return f"[{len(self.results) + 1 if index is None else index}{total}] {name}"

    def record(self, result: JobResult) -> None:
        self.tracker.log_job(self.sweep_id, result)
        self.results.append(result)
        speed = result.metrics.get("speedup")
        detail = f"{speed:.3f}x" if speed is not None else result.reason
        colour = {"measured": "green", "skipped": "yellow", "failed": "red"}[result.status.value]
        self.console.print(
            f"{self.job_label(result.name, len(self.results))} [{colour}]{result.status.value}[/] {detail} "
            f"({result.metrics.get('job_wall_s', 0):.1f} s)"
        )

    @property
    def failed(self) -> int:
        return sum(r.status == RunStatus.failed for r in self.results)

    def close(self) -> None:
        """Tables, parent run description and artifacts from the job runs the store holds, whoever logged them."""
        wall = time.perf_counter() - self.started
        jobs = self.tracker.sweep_jobs(self.sweep_id)
        stored = list(jobs.values())
        counts = {s.value: sum(r.status == s for r in stored) for s in RunStatus}
        title = f"sweep {self.sweep_id[:8]} ({wall:.1f} s)"
        if jobs:
            page = sweep_page(self.sweep_id, jobs, f"{self.name}: {title}",
                              Links(self.tracker.run_link, self.tracker.artifact_link), DESCRIPTION_LIMIT,
                              report_files(self.tracker.uri, self.experiment, self.sweep_id))
            self.tracker.describe_sweep(self.sweep_id, page.description, page.artifacts)
        self.tracker.end_sweep(self.sweep_id, {f"jobs_{k}": v for k, v in counts.items()} | {"wall_s": wall},
                               failed=self.failed > 0)
        self.console.print(summary_table(stored, title=title))
        if has_accuracy(stored):
            self.console.print(accuracy_table(stored))
        self.console.print(", ".join(f"{v} {k}" for k, v in counts.items()))
        self._print_way_in()

    def _print_way_in(self) -> None:
        command = self.tracker.ui_command()
        if command:
            self.console.print(f"browse the runs: [bold]{command}[/]", soft_wrap=True)
        self.console.print(f"this sweep's page: {self.tracker.run_page(self.sweep_id)}", soft_wrap=True)


_current: SweepSession | None = None
_last_failed = 0


def current_session(cfg: DictConfig) -> SweepSession:
    """The open session; a task run outside the callbacks (e.g. Hydra's compose API) opens one."""
    global _current
    if _current is None:
        _current = SweepSession(_tracking(cfg), name="sweep", total_jobs=None)
    return _current


def close_session() -> int:
    """Closes the open session; returns how many of its runs failed."""
    global _current, _last_failed
    if _current is not None:
        _current.close()
        _last_failed = _current.failed
        _current = None
    return _last_failed


def _tracking(cfg: DictConfig) -> TrackingConfig:
    return TrackingConfig(**OmegaConf.to_container(cfg.tracking, resolve=True))  # type: ignore[arg-type]


def _count_jobs(config: DictConfig) -> int:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = _parse_overrides(list(config.hydra.overrides.task))
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def _parse_overrides(overrides: list[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(overrides)


def _swept_keys(config: DictConfig) -> frozenset[str]:
    """The config keys (or groups) that take several values in this invocation, e.g. `dtype`, `timing.mode`."""
    return frozenset(o.key_or_group for o in _parse_overrides(list(config.hydra.overrides.task))
                     if o.is_sweep_override())


def _sweep_name(config: DictConfig) -> str:
    """The overrides that choose what is measured, e.g. `dtype=bf16,fp32 kernels=rms,silu,both`."""
    chosen = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith(("tracking.", "hydra."))]
    return " ".join(chosen) or "defaults"


class SweepLifecycle(Callback):
    """Hydra callback: one session (and MLflow parent run) around each `python -m sweep` invocation."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._open(config, total_jobs=1)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._open(config, total_jobs=_count_jobs(config))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    @staticmethod
    def _open(config: DictConfig, total_jobs: int) -> None:
        global _current
        try:
            _current = SweepSession(_tracking(config), name=_sweep_name(config), total_jobs=total_jobs,
                                    swept_keys=_swept_keys(config))
        except Exception as error:  # Hydra would demote a callback's exception to a warning and go on
            Console(stderr=True, soft_wrap=True).print(f"[red]sweep: cannot open the tracking store[/]: {error}")
            raise SystemExit(2) from None
