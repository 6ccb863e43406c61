"""`python -m sweep`: the Hydra app. It only composes: config -> job -> result -> tracking."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.markup import escape

from .config import register_configs
from .exit_codes import EXIT_INCOMPLETE, EXIT_JOB_FAILED, EXIT_OK, EXIT_REFUSED
from .job import context_lost_result, job_name, run_job
from .session import abort_session, close_session, current_session, session_was_opened
from .validation import override_problems

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

register_configs()
# Newer omegaconf releases warn about Hydra 1.3's own internals on every job.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"hydra\._internal")
warnings.filterwarnings("ignore", category=UserWarning, message="register_new_resolver")


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def sweep_job(cfg: DictConfig) -> None:
    session = current_session(cfg)
    if session.context_lost_after is not None:  # policy: a sticky CUDA error ends every later job of the process
        session.record(context_lost_result(cfg, session.context_lost_after))
        return
    label = escape(session.job_label(job_name(cfg)))
    with session.console.status(label) as spinner:
        result = run_job(cfg, session.models, status=lambda step: spinner.update(f"{label}: {step}"))
    session.record(result)


def main() -> None:
    """Exit status: 0 all measured or skipped, 1 a job failed, 2 refused before any job ran, 3 could not finish
    (sweep/exit_codes.py)."""
    problems = override_problems(_command_line_overrides())
    if problems:
        for problem in problems:
            print(f"sweep refused: {problem}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    try:
        sweep_job()
    except SystemExit as stop:
        if stop.code in (None, 0):
            raise
        if not session_was_opened():  # Hydra could not compose the configuration, or the sweep was refused
            sys.exit(EXIT_REFUSED)
        abort_session()
        sys.exit(stop.code if stop.code == EXIT_INCOMPLETE else EXIT_INCOMPLETE)
    sys.exit(EXIT_JOB_FAILED if close_session() else EXIT_OK)


def _command_line_overrides() -> list[str]:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    return list(args.overrides or [])


if __name__ == "__main__":
    main()
