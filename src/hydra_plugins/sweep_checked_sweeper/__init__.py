"""Hydra's basic sweeper, composing each job once: sweep's session composes and checks every job of a multirun
before any runs (sweep/session.py). Hydra's own check would compose each job a second time and the launch a third,
about 0.1 to 0.25 s per job; here the launch takes the configuration the check composed, where it runs in this
process."""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside sys.modules, where a
# dataclass cannot resolve string annotations.
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_loader import ConfigLoader
from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class CheckedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.sweep_checked_sweeper.CheckedSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="checked", node=CheckedSweeperConf, provider="sweep")


class CheckedSweeper(BasicSweeper):
    """`BasicSweeper`, whose batches `sweep.session.SweepLifecycle` has already composed and checked."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        context = replace(hydra_context, config_loader=ComposedOnce(hydra_context.config_loader))
        super().setup(hydra_context=context, task_function=task_function, config=config)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None


class ComposedOnce:
    """The config loader a launcher composes each job with: the configuration sweep's check composed for the
    same overrides, else a composition of its own (a launcher that runs jobs in other processes)."""

    def __init__(self, loader: ConfigLoader):
        self.loader = loader

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        from sweep.session import composed_job

        composed = composed_job(sweep_overrides)
        if composed is None:
            composed = self.loader.load_sweep_config(master_config, sweep_overrides)
        return composed

    def __getattr__(self, name: str) -> Any:  # the rest of the loader's interface
        if name == "loader":  # not set yet: an instance being unpickled in a launcher's worker
            raise AttributeError(name)
        return getattr(self.loader, name)
