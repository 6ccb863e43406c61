"""Process-wide state of one sweep invocation: the MLflow parent run, the model cache, the results so far.
Opened and closed by Hydra's callbacks around a run or multirun; every job of the sweep shares it."""

from __future__ import annotations

import sys
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from .config import TrackingConfig, kernel_selection
from .models import ModelCache
from .results import JobResult, RunStatus
from .summary import sweep_tables
from .tracking import Tracker


class SweepSession:
    def __init__(self, tracking: TrackingConfig, name: str, total_jobs: int | None, console: Console | None = None):
        # Off a terminal (CI logs, files) rich would wrap the summary table at 80 columns.
        self.console = console or Console(width=None if sys.stdout.isatty() else 200)
        self.tracker = Tracker(tracking)
        self.sweep_id = self.tracker.start_sweep(name, tags={"total_jobs": str(total_jobs or "")})
        self.models = ModelCache()
        self.results: list[JobResult] = []
        self.total_jobs = total_jobs
        self.started = time.perf_counter()
        self.console.print(f"[bold]sweep[/] {name}: logging to {tracking.uri} (experiment {tracking.experiment!r})")

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
        wall = time.perf_counter() - self.started
        counts = {s.value: sum(r.status == s for r in self.results) for s in RunStatus}
        self.tracker.end_sweep(self.sweep_id, {f"jobs_{k}": v for k, v in counts.items()} | {"wall_s": wall},
                               failed=self.failed > 0)
        for table in sweep_tables(self.results, title=f"sweep {self.sweep_id[:8]} ({wall:.1f} s)"):
            self.console.print(table)
        self.console.print(", ".join(f"{v} {k}" for k, v in counts.items()))


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
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def _job_configs(config: DictConfig) -> list[DictConfig]:
    """Every job's composed config, as Hydra's basic sweeper will compose them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    loader = GlobalHydra.instance().config_loader()
    return [loader.load_sweep_config(config, list(job))
            for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _check_kernel_choices(configs: list[DictConfig]) -> None:
    """The `kernels` node is open (any layer name), so Hydra cannot type-check it: check it before anything is
    logged, like the typos Hydra catches (`kernels.source=bundle` stops the sweep at start-up)."""
    for job in configs:
        try:
            kernel_selection(job.kernels)
        except ValueError as error:
            Console(stderr=True, soft_wrap=True).print(f"[red]sweep: invalid configuration[/]: {error}")
            raise SystemExit(2) from None


def _sweep_name(config: DictConfig) -> str:
    """The overrides that choose what is measured, e.g. `dtype=bf16,fp32 kernels=rms,silu,both`."""
    chosen = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith(("tracking.", "hydra."))]
    return " ".join(chosen) or "defaults"


class SweepLifecycle(Callback):
    """Hydra callback: one session (and MLflow parent run) around each `python -m sweep` invocation."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_kernel_choices([config])
        self._open(config, total_jobs=1)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_kernel_choices(_job_configs(config))
        self._open(config, total_jobs=_count_jobs(config))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    @staticmethod
    def _open(config: DictConfig, total_jobs: int) -> None:
        global _current
        try:
            _current = SweepSession(_tracking(config), name=_sweep_name(config), total_jobs=total_jobs)
        except Exception as error:  # Hydra would demote a callback's exception to a warning and go on
            Console(stderr=True, soft_wrap=True).print(f"[red]sweep: cannot open the tracking store[/]: {error}")
            raise SystemExit(2) from None
