"""Process-wide state of one sweep invocation: the MLflow parent run, the model cache, the results so far.
Opened and closed by Hydra's callbacks around a run or multirun; every job of the sweep shares it."""

from __future__ import annotations

import sys
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from .config import TrackingConfig
from .exit_codes import EXIT_INCOMPLETE, EXIT_REFUSED
from .failures import FailureKind
from .models import ModelCache
from .redaction import redact_uri
from .results import JobResult, RunStatus
from .spool import Spool, SpoolError
from .summary import accuracy_table, summary_table
from .sync import Delivery
from .tracking import Tracker
from .validation import validate_jobs


class SweepSession:
    def __init__(self, tracking: TrackingConfig, name: str, total_jobs: int | None, console: Console | None = None):
        # Off a terminal (CI logs, files) rich would wrap the summary table at 80 columns.
        self.console = console or Console(width=None if sys.stdout.isatty() else 200)
        self.tracker = Tracker(tracking)
        self.sweep_id = self.tracker.start_sweep(name, tags={"total_jobs": str(total_jobs or "")})
        self.delivery = Delivery(self.tracker, Spool(tracking.spool_dir), warn=self._warn)
        self.delivery.flush()  # what an earlier sweep spooled for this store
        self.context_lost_after: str | None = None  # the job whose sticky CUDA error ended this process's GPU use
        self.models = ModelCache()
        self.results: list[JobResult] = []
        self.total_jobs = total_jobs
        self.started = time.perf_counter()
        self.console.print(f"[bold]sweep[/] {name}: logging to {redact_uri(tracking.uri)} "
                           f"(experiment {tracking.experiment!r})")

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)

    def job_label(self, name: str, index: int | None = None) -> str:
        """`[3/6] bf16 both T=118`; by default for the job about to run."""
        total = f"/{self.total_jobs}" if self.total_jobs else ""
        return f"[{len(self.results) + 1 if index is None else index}{total}] {name}"

    def record(self, result: JobResult) -> None:
        try:
            self.delivery.log_job(self.sweep_id, result)
        except SpoolError as error:
            self.console.print(f"[red]sweep: cannot finish[/]: the store did not take {result.name!r} and {error}")
            raise SystemExit(EXIT_INCOMPLETE) from None
        self.results.append(result)
        if result.tags.get("failure_kind") == FailureKind.cuda_context_lost.value and self.context_lost_after is None:
            self.context_lost_after = result.name
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
        wall = time.perf_counter() - self.started
        counts = {s.value: sum(r.status == s for r in self.results) for s in RunStatus}
        self.delivery.end_sweep(self.sweep_id, {f"jobs_{k}": v for k, v in counts.items()} | {"wall_s": wall},
                                failed=self.failed > 0)
        self.console.print(summary_table(self.results, title=f"sweep {self.sweep_id[:8]} ({wall:.1f} s)"))
        if any("err_ratio" in r.metrics for r in self.results):
            self.console.print(accuracy_table(self.results))
        self.console.print(", ".join(f"{v} {k}" for k, v in counts.items()))


_current: SweepSession | None = None
_last_failed = 0
_opened = False


def current_session(cfg: DictConfig) -> SweepSession:
    """The open session; a task run outside the callbacks (e.g. Hydra's compose API) opens one."""
    global _current
    if _current is None:
        _current = SweepSession(_tracking(cfg), name="sweep", total_jobs=None)
    return _current


def session_was_opened() -> bool:
    """Whether this process opened a session: if not, no job ran and nothing was written to the store."""
    return _opened


def abort_session() -> None:
    """Ends the open session after the sweep could not finish: its parent run is marked FAILED if the store
    (or the spool) still takes it."""
    global _current
    if _current is not None:
        try:
            _current.close()
        except (SpoolError, SystemExit):
            pass
        _current = None


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


def _job_overrides(config: DictConfig) -> list[list[str]]:
    """The overrides of every job of a multirun, as Hydra's basic sweeper will launch them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _compose_jobs(config: DictConfig) -> list[tuple[str, DictConfig | Exception]]:
    """Each job's configuration, composed as the launcher will (an error instead where it cannot be)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    jobs: list[tuple[str, DictConfig | Exception]] = []
    for overrides in _job_overrides(config):
        label = " ".join(o for o in overrides if not o.startswith(("tracking.", "hydra."))) or "defaults"
        try:
            jobs.append((label, loader.load_sweep_config(config, overrides)))
        except Exception as error:  # Hydra's composition errors: unknown option, key or type
            jobs.append((label, error))
    return jobs


def _sweep_name(config: DictConfig) -> str:
    """The overrides that choose what is measured, e.g. `dtype=bf16,fp32 kernels=rms,silu,both`."""
    chosen = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith(("tracking.", "hydra."))]
    return " ".join(chosen) or "defaults"


class SweepLifecycle(Callback):
    """Hydra callback: one session (and MLflow parent run) around each `python -m sweep` invocation."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._open(config, [("", config)])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._open(config, _compose_jobs(config))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    @staticmethod
    def _open(config: DictConfig, jobs: list[tuple[str, DictConfig | Exception]]) -> None:
        """Refuses (exit 2, nothing written to the store) a sweep with any invalid job, before any GPU work."""
        global _current, _opened
        errors = Console(stderr=True, soft_wrap=True)
        problems = validate_jobs(jobs)
        if problems:
            errors.print(f"[red]sweep refused[/] ({len(problems)} problem(s), nothing was run or logged):")
            for problem in problems:
                errors.print(f"  - {problem}", markup=False)
            raise SystemExit(EXIT_REFUSED)
        try:
            _current = SweepSession(_tracking(config), name=_sweep_name(config), total_jobs=len(jobs))
        except Exception as error:  # Hydra would demote a callback's exception to a warning and go on
            errors.print(f"[red]sweep: cannot open the tracking store[/]: {redact_uri(str(error))}")
            raise SystemExit(EXIT_REFUSED) from None
        _opened = True
