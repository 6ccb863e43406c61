"""Resume: a key per job from everything that determines its measurement, so a re-run sweep skips what is done."""

from __future__ import annotations

import hashlib
import json

import torch
from omegaconf import DictConfig, OmegaConf

from sweep.records.fingerprint import code_version, fingerprint

# Where and how jobs run, not what they measure.
NOT_MEASUREMENT = ("tracking", "lease", "resume", "hydra")
# Any node of the same kind counts as the same machine (a preempted Slurm job may come back on another node);
# code_version stands for the git fields.
NOT_MACHINE = ("host", "git_commit", "git_dirty")


def job_key(cfg: DictConfig, device: torch.device) -> str:
    """The same for two jobs with the same resolved configuration, machine fingerprint and code version."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    measured = {k: v for k, v in config.items() if k not in NOT_MEASUREMENT}
    machine = {k: v for k, v in fingerprint(device).items() if k not in NOT_MACHINE}
    payload = json.dumps({"config": measured, "machine": machine, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
