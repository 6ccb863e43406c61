"""Resume: a key per job from everything that determines its measurement, so a re-run sweep skips what is done."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from sweep.measure.kernelization import ResolvedKernel
from sweep.records.fingerprint import code_version, fingerprint

# Where and how jobs run, not what they measure.
NOT_MEASUREMENT = ("tracking", "lease", "resume", "hydra")
# Any node of the same kind counts as the same machine (a preempted Slurm job may come back on another node);
# code_version stands for the git fields.
NOT_MACHINE = ("host", "git_commit", "git_dirty")
# Implied by `cpu_model` and `gpu_name`, which already tell such machines apart: left out, so that recording them
# (issue 24) changed no job's key.
IMPLIED_MACHINE_FIELDS = ("cpu_arch", "gpu_memory_integrated")


def job_key(cfg: DictConfig, device: torch.device, kernels: Sequence[ResolvedKernel]) -> str:
    """The same for two jobs with the same resolved configuration, kernels, machine fingerprint and code version.
    `kernels`: as resolved for the job, so that an edited local kernel or a new Hub build of the same `version` is
    measured again (the configuration names only where the kernel is)."""
    identities = {kernel.layer: kernel.identity for kernel in kernels}  # what `kernel_<Layer>` records
    machine = {k: v for k, v in fingerprint(device).items() if k not in (*NOT_MACHINE, *IMPLIED_MACHINE_FIELDS)}
    return _hash({"config": _measured(cfg), "kernels": identities, "machine": machine, "code": code_version()})


def repeat_hash(cfg: DictConfig) -> str:
    """The same for two jobs whose configurations differ at most in `seed`: repeats of one measurement, whose
    scatter estimates `timing.rerun_sd` (sweep/views/repeats.py)."""
    return _hash({k: v for k, v in _measured(cfg).items() if k != "seed"})


def _measured(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    return {k: v for k, v in config.items() if k not in NOT_MEASUREMENT}


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
