"""`python -m sweep`: the Hydra app. It only composes: config -> job -> result -> tracking."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.markup import escape

from .config import register_configs
from .job import job_name, run_job
from .session import close_session, current_session

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

register_configs()
# Newer omegaconf releases warn about Hydra 1.3's own internals on every job.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"hydra\._internal")
warnings.filterwarnings("ignore", category=UserWarning, message="register_new_resolver")


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def sweep_job(cfg: DictConfig) -> None:
    session = current_session(cfg)
    swept = session.swept_overrides()
    label = escape(session.job_label(job_name(cfg, swept)))
    with session.console.status(label) as spinner:
        result = run_job(cfg, session.models, status=lambda step: spinner.update(f"{label}: {step}"), swept=swept)
    session.record(result)


def main() -> None:
    sweep_job()
    sys.exit(1 if close_session() else 0)


if __name__ == "__main__":
    main()
