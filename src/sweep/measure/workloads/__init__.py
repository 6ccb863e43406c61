"""Workloads: what a job puts through the model (a prefill, one decode step, one training step), what it times
and what it compares. Each follows the protocol in `protocol.py`, with its config beside it."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore

from sweep.config import WorkloadConfig
from sweep.measure.workloads.decode import Decode, DecodeConfig
from sweep.measure.workloads.prefill import Prefill, PrefillConfig
from sweep.measure.workloads.protocol import Workload
from sweep.measure.workloads.train import Train, TrainConfig

WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (Prefill, Decode, Train)}
SCHEMAS: tuple[type[WorkloadConfig], ...] = (PrefillConfig, DecodeConfig, TrainConfig)


def workload(cfg: WorkloadConfig | Any) -> Workload:
    """A fresh workload for one job, by `workload.name`."""
    if cfg.name not in WORKLOADS:
        raise ValueError(f"workload={cfg.name} is not one of: {', '.join(WORKLOADS)}")
    return WORKLOADS[cfg.name]()


def register_workload_configs(store: ConfigStore) -> None:
    """Each workload's schema in the `workload` group; conf/workload/<name>.yaml extends it."""
    for schema in SCHEMAS:
        store.store(group="workload", name=f"{schema.name}_schema", node=schema)
