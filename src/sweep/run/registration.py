"""What Hydra needs before composing: sweep's schema, each workload's schema, and the `sweep_workers` resolver."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sweep.config import SweepConfig
from sweep.measure.workloads import register_workload_configs
from sweep.run.lease import worker_count


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="sweep_schema", node=SweepConfig)
    register_workload_configs(store)
    # conf/hydra/launcher/parallel.yaml: one local worker per leasable device.
    OmegaConf.register_new_resolver("sweep_workers", worker_count, replace=True)
