"""Process-wide state of one sweep invocation: the MLflow parent run, the model cache, the results so far.
Opened and closed by Hydra's callbacks around a run or multirun; every job of the sweep shares it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from sweep.config import TrackingConfig
from sweep.measure.models import ModelCache
from sweep.records.exit_codes import EXIT_INCOMPLETE, EXIT_REFUSED
from sweep.records.failures import FailureKind
from sweep.records.redaction import redact_uri
from sweep.records.results import JobResult, RunStatus
from sweep.run.startup import draw_model_in_background, milestone, start_cuda_in_background, startup_metrics
from sweep.run.validation import validate_jobs
from sweep.store.calibration import device_model, newest_rerun_sd, write_rerun_sd
from sweep.store.spool import Spool, SpoolError
from sweep.store.sync import Delivery
from sweep.store.tracking import DESCRIPTION_LIMIT, RESUME_TAG, Tracker
from sweep.views.repeats import estimate_note, rerun_sd_estimates
from sweep.views.summary import RESUMED, job_description, status_counts, sweep_tables
from sweep.views.table import results_table

T = TypeVar("T")
# The parent run's id, set by the launching process before any job starts: jobs in other processes (local
# workers, Slurm nodes; both inherit the environment) log their child runs under it.
PARENT_RUN_ENV = "SWEEP_PARENT_RUN_ID"


class SweepSession:
    def __init__(self, tracking: TrackingConfig, name: str, total_jobs: int | None, console: Console | None = None,
                 sweep_id: str | None = None, swept_keys: frozenset[str] = frozenset()):
        """Opens the sweep's parent run, or with `sweep_id` attaches to one that another process opened."""
        # Off a terminal (CI logs, files) rich would wrap the summary table at 80 columns.
        self.console = console or Console(width=None if sys.stdout.isatty() else 200)
        self.tracker = Tracker(tracking, describe=job_description)
        self.tracking = tracking
        self.name, self.experiment = name, tracking.experiment
        self.delivery = Delivery(self.tracker, Spool(tracking.spool_dir), warn=self._warn)
        self.context_lost_after: str | None = None  # the job whose sticky CUDA error ended this process's GPU use
        self.models = ModelCache()
        self.results: list[JobResult] = []
        self._stored_rerun_sd: dict[tuple[str, str], tuple[float, str] | None] = {}  # see with_rerun_sd
        self.total_jobs = total_jobs
        self.started = time.perf_counter()
        self._failed = 0
        if sweep_id is not None:
            self.sweep_id = sweep_id
            self.total_jobs, self.swept_keys = self.tracker.sweep_shape(sweep_id)
            return
        self.swept_keys = swept_keys
        self.sweep_id = self.tracker.start_sweep(
            name, tags={"total_jobs": str(total_jobs or ""), "swept_keys": ",".join(sorted(swept_keys))})
        self.delivery.flush()  # what an earlier sweep spooled for this store
        self.console.print(f"[bold]sweep[/] {name}: logging to {redact_uri(tracking.uri)} "
                           f"(experiment {tracking.experiment!r})")

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)

    def swept_overrides(self) -> list[tuple[str, str]]:
        """(key, override) for each override of the running job whose key this sweep varies, for `job_name`."""
        if not self.swept_keys or not HydraConfig.initialized():
            return []
        job = _parse_overrides(list(HydraConfig.get().overrides.task))
        return [(o.key_or_group, o.input_line) for o in job if o.key_or_group in self.swept_keys]

    def job_label(self, name: str, index: int | None = None) -> str:
        """`[3/6] bf16 both T=118`; by default for the job about to run (its number in the multirun when there
        is one: jobs in worker processes do not see each other)."""
        total = f"/{self.total_jobs}" if self.total_jobs else ""
        return f"[{index or _multirun_job_number() or len(self.results) + 1}{total}] {name}"

    def start(self, result: JobResult, job_key: str | None) -> str | None:
        """The job's child run, RUNNING until `record`; tagged with its resume key and leased GPU. None when the
        store does not answer: the job runs anyway, and its record goes to the spool."""
        return self._if_store_answers(lambda: self.tracker.start_job(
            self.sweep_id, result, {RESUME_TAG: job_key} if job_key else {}), "the job's run is not started")

    def measured_before(self, job_key: str | None) -> str | None:
        """The run that already measured this combination (resume), if the store answers and has one."""
        if job_key is None:
            return None
        return self._if_store_answers(lambda: self.tracker.find_measured(job_key), "resume cannot check the store")

    def kill(self, run_id: str | None, reason: str) -> None:
        if run_id is not None:
            self._if_store_answers(lambda: self.tracker.kill_job(run_id, reason), f"run {run_id} stays RUNNING")

    def _if_store_answers(self, call: Callable[[], T], otherwise: str) -> T | None:
        if self.delivery.store_down:
            return None
        try:
            return call()
        except Exception as error:  # the store went away: the sweep goes on, results go to the spool
            self.delivery.store_down = True
            self._warn(f"the tracking store did not answer ({type(error).__name__}); {otherwise}")
            return None

    def with_rerun_sd(self, cfg: DictConfig, machine: Mapping[str, str]) -> DictConfig:
        """The job's configuration with the `timing.rerun_sd` its intervals add when the user left it unset: the
        newest estimate the store holds for its device model (`machine`: its fingerprint) and workload, looked up
        once per session; unchanged (the default) without one."""
        if cfg.timing.rerun_sd is not None:
            return cfg
        key = (device_model(machine), str(cfg.workload.name))
        if key not in self._stored_rerun_sd:
            self._stored_rerun_sd[key] = self._if_store_answers(
                lambda: newest_rerun_sd(self.tracker.client, self.experiment, *key), "jobs add the default rerun_sd")
        stored = self._stored_rerun_sd[key]
        if stored is None:
            return cfg
        rerun_sd, source = stored
        merged = OmegaConf.merge(cfg, {"timing": {"rerun_sd": rerun_sd, "rerun_sd_source": source}})
        assert isinstance(merged, DictConfig)
        return merged

    def skip_measured(self, name: str, job_key: str, run_id: str) -> None:
        """resume=true: this combination was measured before, with the same configuration, kernels, machine and
        code."""
        self.tracker.note_resumed(self.sweep_id, job_key, name, run_id)
        self.console.print(f"{self.job_label(name)} [cyan]already measured[/] in run {run_id}, skipped (resume)")

    def record(self, result: JobResult, run_id: str | None = None) -> None:
        try:
            self.delivery.log_job(self.sweep_id, result, run_id)
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
            f"{self.job_label(result.name, _multirun_job_number() or len(self.results))} "
            f"[{colour}]{result.status.value}[/] {detail} "
            f"({result.metrics.get('job_wall_s', 0):.1f} s)"
        )

    @property
    def failed(self) -> int:
        """How many jobs failed, as `close` counted them in the store."""
        return self._failed

    def close(self) -> None:
        """Tables, parent run description and artifacts from the job runs the store holds, whoever logged them.
        The tables come first: they are what the user waits for."""
        wall = time.perf_counter() - self.started
        title = f"sweep {self.sweep_id[:8]} ({wall:.1f} s)"
        self.delivery.flush()
        jobs = results_table({redact_uri(self.tracker.uri): self._stored_jobs()})
        counts = status_counts(jobs.to_dict("records"))
        self._failed = counts[RunStatus.failed.value]
        for table in sweep_tables(jobs, title):
            self.console.print(table)
            milestone("table")
        if counts[RESUMED]:
            self.console.print("resumed: measured by an earlier sweep with the same configuration, kernels, machine "
                               "and code (resume=false measures them again)")
        self.console.print(", ".join(f"{v} {k}" for k, v in counts.items()))
        if len(jobs) and not self.delivery.store_down:
            # Imported here: only the launching process draws the page, and workers then skip matplotlib's import.
            from sweep.views.sweep_page import Links, report_files, sweep_page

            links = Links(self.tracker.run_link, self.tracker.artifact_link, self.tracker.machines_view_link())
            page = sweep_page(self.sweep_id, jobs, f"{self.name}: {title}", links, DESCRIPTION_LIMIT,
                              report_files(self.tracker.uri, self.experiment, self.sweep_id))
            self._if_store_answers(lambda: self.tracker.describe_sweep(self.sweep_id, page.description, page.artifacts),
                                   "the sweep's page is not written")
            self._store_rerun_sd(jobs)
        summary = {f"jobs_{k}": v for k, v in counts.items()} | {"wall_s": wall}
        self.delivery.end_sweep(self.sweep_id, summary | startup_metrics(), failed=self._failed > 0)
        self._print_way_in()

    def _store_rerun_sd(self, jobs: pd.DataFrame) -> None:
        """What the sweep's repeats (jobs differing only in `seed`) show of `timing.rerun_sd`, written to the store
        for later jobs on the same device model and workload."""
        for estimate in rerun_sd_estimates(jobs):
            if self._if_store_answers(lambda: write_rerun_sd(self.tracker.client, self.tracking, estimate),
                                      "the rerun spread of its repeats is not stored"):
                self.console.print(estimate_note(estimate), soft_wrap=True, markup=False)

    def _stored_jobs(self) -> dict[str, JobResult]:
        """The sweep's jobs from the store by run id, whichever process logged them, those resumed (measured by an
        earlier sweep) first; this process's own results when the store does not answer."""
        stored = self._if_store_answers(
            lambda: self.tracker.resumed_jobs(self.sweep_id) | self.tracker.sweep_jobs(self.sweep_id),
            "the tables below hold this process's jobs only")
        return stored if stored is not None else {r.uid: r for r in self.results}

    def _print_way_in(self) -> None:
        command = self.tracker.ui_command()
        if command:
            self.console.print(f"browse the runs: [bold]{command}[/]", soft_wrap=True)
        self.console.print(f"this sweep's page: {self.tracker.run_page(self.sweep_id)}", soft_wrap=True)
        self.console.print(f"every machine's runs side by side: {self.tracker.machines_view_page()}", soft_wrap=True)


_current: SweepSession | None = None
_last_failed = 0
_opened = False
_composed_for_launch: dict[tuple[str, ...], DictConfig] = {}  # see composed_job


def current_session(cfg: DictConfig) -> SweepSession:
    """The open session; a task run outside the callbacks (e.g. Hydra's compose API) opens one."""
    global _current
    if _current is None:
        parent = os.environ.get(PARENT_RUN_ENV)
        _current = SweepSession(_tracking(cfg), name="sweep", total_jobs=None, sweep_id=parent)
    return _current


def session_was_opened() -> bool:
    """Whether this process opened a session: if not, no job ran and nothing was written to the store."""
    return _opened


def end_unfinished_session() -> None:
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
        os.environ.pop(PARENT_RUN_ENV, None)
    return _last_failed


def abort_session(reason: str) -> None:
    """The sweep was interrupted: its RUNNING children, wherever they ran, and its parent end KILLED."""
    global _current
    if _current is not None:
        marked = _current._if_store_answers(lambda: _current.tracker.kill_sweep(_current.sweep_id, reason) or True,
                                            "its runs cannot be marked KILLED now")
        if marked:
            _current.console.print(f"[red]sweep {_current.sweep_id[:8]} {reason}[/]: its runs are marked KILLED")
        _current = None
        os.environ.pop(PARENT_RUN_ENV, None)


def _multirun_job_number() -> int | None:
    config = HydraConfig.instance().cfg
    if config is None or config.hydra.mode != RunMode.MULTIRUN:
        return None
    return int(config.hydra.job.num) + 1


def _tracking(cfg: DictConfig) -> TrackingConfig:
    return TrackingConfig(**OmegaConf.to_container(cfg.tracking, resolve=True))  # type: ignore[arg-type]


def _job_overrides(config: DictConfig) -> list[list[str]]:
    """The overrides of every job of a multirun, as Hydra's basic sweeper will launch them (sweep's own launches
    the same jobs in another order)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = _parse_overrides(list(config.hydra.overrides.task))
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _compose_jobs(config: DictConfig, for_launch: bool) -> list[tuple[str, DictConfig | Exception]]:
    """Each job's configuration, composed as the launcher will (an error instead where it cannot be). `for_launch`:
    kept for this process's launcher to take (`composed_job`) instead of composing each job again."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    jobs: list[tuple[str, DictConfig | Exception]] = []
    for overrides in _job_overrides(config):
        label = " ".join(o for o in overrides if not o.startswith(("tracking.", "hydra."))) or "defaults"
        try:
            composed = loader.load_sweep_config(config, overrides)
        except Exception as error:  # Hydra's composition errors: unknown option, key or type
            jobs.append((label, error))
            continue
        jobs.append((label, composed))
        if for_launch:
            _composed_for_launch[tuple(overrides)] = composed
    return jobs


def composed_job(overrides: Sequence[str]) -> DictConfig | None:
    """The configuration the start-up check composed for a job with these overrides, handed over once (Hydra
    composes a job in 0.1 to 0.25 s); None if it was not composed here."""
    return _composed_for_launch.pop(tuple(overrides), None)


def _jobs_run_here(config: DictConfig) -> bool:
    """Whether the multirun's launcher runs the jobs in this process (Hydra's basic launcher, the default)."""
    return str(config.hydra.launcher.get("_target_", "")).endswith(".BasicLauncher")


def _launch_takes_composed(config: DictConfig) -> bool:
    """Whether the launch will take the configurations the check composes (`composed_job`): sweep's own sweeper
    (`hydra/sweeper=checked`, the default) with the jobs run in this process."""
    sweeper = str(config.hydra.sweeper.get("_target_", ""))
    return _jobs_run_here(config) and sweeper.endswith(".CheckedSweeper")


def _parse_overrides(overrides: list[str]) -> list[Override]:
    return OverridesParser.create().parse_overrides(overrides)


def _swept_keys(config: DictConfig) -> frozenset[str]:
    """The config keys (or groups) that take several values in this invocation, e.g. `dtype`, `timing.mode`."""
    return frozenset(o.key_or_group for o in _parse_overrides(list(config.hydra.overrides.task))
                     if o.is_sweep_override())


def _sweep_name(config: DictConfig) -> str:
    """The overrides that choose what is measured, e.g. `dtype=bf16,fp32 kernels=rms,silu,both`."""
    how = ("tracking.", "hydra.", "lease.", "resume=")  # where and how the jobs run, not what they measure
    chosen = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith(how)]
    return " ".join(chosen) or "defaults"


class SweepLifecycle(Callback):
    """Hydra callback: one session (and MLflow parent run) around each `python -m sweep` invocation."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        start_cuda_in_background()
        self._open(config, [("", config)], jobs_here=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs_here = _jobs_run_here(config)
        if jobs_here:
            start_cuda_in_background()
        self._open(config, _compose_jobs(config, for_launch=_launch_takes_composed(config)), jobs_here)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_session()

    @staticmethod
    def _open(config: DictConfig, jobs: list[tuple[str, DictConfig | Exception]], jobs_here: bool) -> None:
        """Refuses (exit 2, nothing written to the store) a sweep with any invalid job, before any GPU work.
        `jobs_here`: this process runs the jobs, and draws the first one's model while the store opens."""
        global _current, _opened
        errors = Console(stderr=True, soft_wrap=True)
        problems = validate_jobs(jobs)
        milestone("config")
        if problems:
            errors.print(f"[red]sweep refused[/] ({len(problems)} problem(s), nothing was run or logged):")
            for problem in problems:
                errors.print(f"  - {problem}", markup=False)
            raise SystemExit(EXIT_REFUSED)
        if jobs_here:
            draw_model_in_background(jobs[0][1].model)
        try:
            _current = SweepSession(_tracking(config), name=_sweep_name(config), total_jobs=len(jobs),
                                    swept_keys=_swept_keys(config))
            os.environ[PARENT_RUN_ENV] = _current.sweep_id
            milestone("store")
        except Exception as error:  # Hydra would demote a callback's exception to a warning and go on
            errors.print(f"[red]sweep: cannot open the tracking store[/]: {redact_uri(str(error))}")
            raise SystemExit(EXIT_REFUSED) from None
        _opened = True
