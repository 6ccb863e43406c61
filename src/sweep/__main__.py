"""`python -m sweep`: the Hydra app. It only composes: config -> job -> result -> tracking."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.markup import escape

from .config import register_configs
from .interruption import describe, sigterm_raises
from .job import job_name, job_params, plan_job, run_job
from .lease import gpu_lease
from .results import JobResult
from .resume import job_key
from .session import abort_session, close_session, current_session

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

register_configs()
# Newer omegaconf releases warn about Hydra 1.3's own internals on every job.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"hydra\._internal")
warnings.filterwarnings("ignore", category=UserWarning, message="register_new_resolver")


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def sweep_job(cfg: DictConfig) -> None:
    """One job, in whichever process the launcher runs it: lease a GPU, skip it if already measured, measure."""
    session = current_session(cfg)
    swept = session.swept_overrides()
    label = escape(session.job_label(job_name(cfg, swept)))
    with (session.console.status(label) as spinner,
          gpu_lease(cfg.lease, waiting=lambda note: spinner.update(f"{label}: {note}")) as device):
        placement = _placement_tags() | (device.tags if device else {})
        result = JobResult(name=job_name(cfg, swept), params=job_params(cfg), tags=placement)
        key = _resume_key(cfg)
        previous = session.tracker.find_measured(key) if key and cfg.resume else None
        if previous is not None:
            session.skip_measured(result.name, key, previous)
            return
        run_id = session.start(result, key)
        with sigterm_raises():
            try:
                result = run_job(cfg, session.models, status=lambda step: spinner.update(f"{label}: {step}"),
                                 swept=swept)
                result.tags |= placement
                session.record(result, run_id)  # inside the lease: the run's start and end bound its GPU time
            except BaseException as stop:  # Ctrl-C, SIGTERM: the run ends KILLED, never stays RUNNING
                session.tracker.kill_job(run_id, describe(stop))
                raise


def _placement_tags() -> dict[str, str]:
    """Which process (and Slurm job) ran the job: where to find its output when something went wrong."""
    slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    slurm = {"slurm_job_id": f"{slurm_job}_{task}" if task else slurm_job} if slurm_job else {}
    return {"worker_pid": str(os.getpid())} | slurm


def _resume_key(cfg: DictConfig) -> str | None:
    """None for a job that cannot be planned: it runs, and its result says why."""
    try:
        return job_key(cfg, plan_job(cfg).device)
    except Exception:
        return None


def main() -> None:
    with sigterm_raises():
        try:
            sweep_job()
        except BaseException as stop:  # Ctrl-C, SIGTERM, a launcher whose job was killed
            abort_session(describe(stop))
            raise
    sys.exit(1 if close_session() else 0)


if __name__ == "__main__":
    main()
