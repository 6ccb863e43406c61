"""The one small protocol every workload follows, and the checks they share; `job.py` conducts them all alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from kernels import Mode

from sweep.config import PromptConfig
from sweep.measure.forensics import first_nonfinite_module
from sweep.measure.kernelization import KernelSwitch, ResolvedKernel
from sweep.measure.models import ModelCache
from sweep.measure.numerics import nonfinite_count
from sweep.measure.timing import Comparison, TimedSide
from sweep.records.errors import KernelOutputError, SkipJob
from sweep.records.results import JobResult

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
    dtype: torch.dtype  # the run's
    result: JobResult
    status: StatusHook
    models: ModelCache  # the process's: what a workload computes once per model and prompt is kept there
    kernels: list[ResolvedKernel] = field(default_factory=list)  # what `switch` applied


@dataclass
class Sides:
    """The timed unit of each side. A side never switches kernels itself: the conductor selects the kernel side
    (`KernelSwitch.select`) before running it and the baseline before the baseline, outside the timed region."""

    baseline: Forward
    kernel: Forward | None
    # More sides timed in the same rounds (baseline=compile: the compiled model), each selecting itself, and the
    # comparisons between sides that are logged beside `speedup` (name -> (numerator side, denominator side)).
    others: list[TimedSide] = field(default_factory=list)
    comparisons: dict[str, Comparison] = field(default_factory=dict)


class Workload(Protocol):
    name: ClassVar[str]
    kernel_mode: ClassVar[Mode]  # how `kernelize` applies the kernels

    def positions(self, prompt: PromptConfig) -> int:
        """Positions the job puts through the model, checked against the model's."""

    def forward_path(self, cfg: Any) -> str:
        """The `forward_path` tag: which call of the model is timed and compared."""

    def inputs(self, tokenizer: object, cfg: Any, device: torch.device) -> list[torch.Tensor]:
        """The timed forward's inputs, `timing.input_sets` of them."""

    def reference(
        self, model: torch.nn.Module, inputs: list[torch.Tensor], reference_dtype: torch.dtype, cfg: Any
    ) -> Any:
        """The higher-precision result the sides are compared against, through `numerics.reference_precision`
        (the model is left bit-identical); cached per prompt, before kernelize. Non-finite: `SkipJob`."""

    def running(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """The model's state while the job compares and times; it is left as it was found."""

    def sides(self, job: JobState) -> Sides:
        """What to time, per side (prepared once: caches, buffers)."""

    def compare(self, job: JobState, sides: Sides) -> dict[str, float]:
        """The numerics metrics of input set 0, returned only once all of them are computed (tags and artifacts
        go into `job.result`). Non-finite outputs: `check_baseline_finite`, `check_kernel_finite`."""

    def timing_metrics(self, metrics: dict[str, float], cfg: Any) -> dict[str, float]:
        """Metrics derived from the timing ones (e.g. tokens per second)."""


def check_reference_finite(values: torch.Tensor | Iterable[torch.Tensor], reference_dtype: torch.dtype) -> None:
    """NaN or Inf in the reference: even the higher precision overflows; nothing to compare against."""
    if bad := nonfinite_count(values):
        raise SkipJob(f"the model overflows even in {reference_dtype} at this length: the reference has "
                      f"{bad} non-finite values")


def check_baseline_finite(
    job: JobState, outputs: torch.Tensor | Iterable[torch.Tensor], rerun: Callable[[], object],
    after_forward: str = "the logits",
) -> None:
    """NaN or Inf without kernels: the model itself overflows at this dtype and length; the job is skipped.
    `rerun` repeats the work that gave `outputs`, to find the first module whose output is not finite
    (`after_forward`: where to say it is when every module's output is)."""
    if bad := nonfinite_count(outputs):
        where = first_nonfinite_module(job.model, rerun, after_forward)
        raise SkipJob(f"the model itself overflows in {job.dtype} at T={job.cfg.prompt.length}: baseline output "
                      f"has {bad} non-finite values, first at {where}")


def check_kernel_finite(
    job: JobState, outputs: torch.Tensor | Iterable[torch.Tensor], rerun: Callable[[], object],
    after_forward: str = "the logits",
) -> None:
    """NaN or Inf with kernels where the baseline was finite: the kernel is broken; the job fails. `rerun` runs
    with the kernels switched in."""
    assert job.switch is not None
    if bad := nonfinite_count(outputs):
        with job.switch.active():
            where = first_nonfinite_module(job.model, rerun, after_forward)
        raise KernelOutputError(f"kernel output has {bad} non-finite values, first at {where}")
