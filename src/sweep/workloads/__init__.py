"""Workloads: what a job puts through the model (a prefill, one decode step, one training step), what it times
and what it compares. Each says so through one small protocol; `job.py` conducts them all alike."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from hydra.core.config_store import ConfigStore
from kernels import Mode

from ..config import PromptConfig, WorkloadConfig
from ..kernelization import KernelSwitch
from ..results import JobResult

Forward = Callable[[torch.Tensor], torch.Tensor]  # one input set -> the output the graph replay is checked on
StatusHook = Callable[[str], None]


@dataclass
class JobState:
    """What the conductor hands a workload once the model is loaded and kernelized."""

    model: torch.nn.Module
    switch: KernelSwitch | None  # None: no kernels, the baseline alone
    inputs: list[torch.Tensor]  # the timed forward's inputs, one per input set
    reference: Any  # what the workload's `reference` returned
    cfg: Any  # the job's SweepConfig
    device: torch.device
    result: JobResult
    status: StatusHook


@dataclass
class Sides:
    """The timed unit of each side, kernels switched in for the kernel side."""

    baseline: Forward
    kernel: Forward | None


class Workload(Protocol):
    name: ClassVar[str]
    kernel_mode: ClassVar[Mode]  # how `kernelize` applies the kernels

    def positions(self, prompt: PromptConfig) -> int:
        """Positions the job puts through the model, checked against the model's."""

    def inputs(self, tokenizer: object, cfg: Any, device: torch.device) -> list[torch.Tensor]:
        """The timed forward's inputs, `timing.input_sets` of them."""

    def reference(self, model: torch.nn.Module, inputs: list[torch.Tensor], reference_dtype: torch.dtype) -> Any:
        """The higher-precision result the sides are compared against; cached per prompt, before kernelize."""

    def running(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """The model's state while the job compares and times; it is left as it was found."""

    def sides(self, job: JobState) -> Sides:
        """What to time, per side (prepared once: caches, buffers)."""

    def compare(self, job: JobState, sides: Sides) -> None:
        """Numerics into `job.result`: metrics, tags, artifacts."""

    def timing_metrics(self, metrics: dict[str, float], cfg: Any) -> dict[str, float]:
        """Metrics derived from the timing ones (e.g. tokens per second)."""


def switched(forward: Forward, switch: KernelSwitch | None, kernel_on: bool) -> Forward:
    """`forward` with the kernels switched in (kernel side) or left out (baseline)."""
    if switch is None or not kernel_on:
        return forward

    def with_kernels(input_ids: torch.Tensor) -> torch.Tensor:
        with switch.active():
            return forward(input_ids)

    return with_kernels


# The workloads import the protocol above, so they are imported after it.
from .decode import Decode, DecodeConfig  # noqa: E402
from .prefill import Prefill, PrefillConfig  # noqa: E402
from .train import Train, TrainConfig  # noqa: E402

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
