"""`python -m sweep`: the Hydra app. It only composes: config -> job -> result -> tracking."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.markup import escape

from sweep.records.exit_codes import EXIT_INCOMPLETE, EXIT_JOB_FAILED, EXIT_OK, EXIT_REFUSED
from sweep.records.fingerprint import fingerprint
from sweep.records.results import JobResult
from sweep.run.interruption import Terminated, describe, sigterm_raises
from sweep.run.job import JobPlan, context_lost_result, job_name, job_params, plan_job, process_device, run_job
from sweep.run.lease import gpu_lease
from sweep.run.registration import register_configs
from sweep.run.resume import job_key
from sweep.run.session import (
    abort_session,
    close_session,
    current_session,
    end_unfinished_session,
    session_was_opened,
)
from sweep.run.startup import freeze_startup_objects, join_startup_threads, milestone, wait_for_cuda
from sweep.run.validation import override_problems
from sweep.run.workers import keep_this_worker

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

register_configs()
# Newer omegaconf releases warn about Hydra 1.3's own internals on every job.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"hydra\._internal")
warnings.filterwarnings("ignore", category=UserWarning, message="register_new_resolver")


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def sweep_job(cfg: DictConfig) -> None:
    """One job, in whichever process the launcher runs it: lease a GPU, skip it if already measured, measure."""
    keep_this_worker()
    session = current_session(cfg)
    swept = session.swept_overrides()
    if session.context_lost_after is not None:  # policy: a sticky CUDA error ends every later job of the process
        session.record(context_lost_result(cfg, session.context_lost_after, swept))
        return
    label = escape(session.job_label(job_name(cfg, swept)))
    with (session.console.status(label) as spinner,
          gpu_lease(cfg.lease, waiting=lambda note: spinner.update(f"{label}: {note}")) as device):
        plan = _plan(cfg)
        # Also on a run that ends killed or cannot be planned: its machine, never a `cpu` that does not exist.
        machine = fingerprint(plan.device if plan is not None else process_device())
        placement = _placement_tags() | (device.tags if device else {})
        result = JobResult(name=job_name(cfg, swept), params=job_params(cfg), tags=machine | placement)
        key = job_key(cfg, plan.device, plan.resolved) if plan is not None else None
        previous = session.measured_before(key) if cfg.resume else None
        if previous is not None:
            session.skip_measured(result.name, key, previous)
            return
        started = result
        run_id = session.start(started, key)
        wait_for_cuda()  # started in the background at the sweep's start (sweep/startup.py)
        freeze_startup_objects()
        milestone("first_job")
        with sigterm_raises():
            try:
                result = run_job(session.with_rerun_sd(cfg, machine), session.models, swept=swept, plan=plan,
                                 status=lambda step: spinner.update(f"{label}: {step}"))
                result.tags = started.tags | result.tags
                result.uid = started.uid  # the record completes the run started for it, also from the spool
                session.record(result, run_id)  # inside the lease: the run's start and end bound its GPU time
            except BaseException as stop:  # Ctrl-C, SIGTERM: the run ends KILLED, never stays RUNNING
                session.kill(run_id, describe(stop))
                raise


def _placement_tags() -> dict[str, str]:
    """Which process (and Slurm job) ran the job: where to find its output when something went wrong."""
    slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    slurm = {"slurm_job_id": f"{slurm_job}_{task}" if task else slurm_job} if slurm_job else {}
    return {"worker_pid": str(os.getpid())} | slurm


def _plan(cfg: DictConfig) -> JobPlan | None:
    """Once per job: its resume key and its run share the resolved kernels. None for a job that cannot be planned:
    it runs, and its result says why."""
    try:
        return plan_job(cfg)
    except Exception:
        return None


def main() -> None:
    """Exit status: 0 all measured or skipped, 1 a job failed, 2 refused before any job ran, 3 could not finish
    (sweep/exit_codes.py); 130 or 143 interrupted (Ctrl-C, SIGTERM), its runs marked KILLED."""
    milestone("imports")
    problems = override_problems(_command_line_overrides())
    if problems:
        for problem in problems:
            print(f"sweep refused: {problem}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    with sigterm_raises():
        try:
            sweep_job()
        except Terminated as stop:
            abort_session(describe(stop))
            raise
        except SystemExit as stop:
            if stop.code in (None, 0):
                raise
            if not session_was_opened():  # Hydra could not compose the configuration, or the sweep was refused
                sys.exit(EXIT_REFUSED)
            end_unfinished_session()
            sys.exit(EXIT_INCOMPLETE)
        except BaseException as stop:  # Ctrl-C, a launcher whose job was killed
            abort_session(describe(stop))
            raise
        finally:
            join_startup_threads()  # here, where a Ctrl-C or SIGTERM while it waits interrupts the sweep
    sys.exit(EXIT_JOB_FAILED if close_session() else EXIT_OK)


def _command_line_overrides() -> list[str]:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    return list(args.overrides or [])


if __name__ == "__main__":
    main()
