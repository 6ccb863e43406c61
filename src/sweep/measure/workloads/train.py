"""train: one forward and backward of the causal-LM loss on the prompt (no optimizer step), timed, with the
kernels applied for training. Compared: the loss, the gradients against eager's and against a higher-precision
backward, and each side's peak memory (a training kernel's claim is often memory)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from kernels import Mode
from transformers import PretrainedConfig

from sweep.config import PromptConfig, WorkloadConfig
from sweep.measure.forensics import (
    layer_gradient_metrics,
    layer_gradients,
    layer_metrics,
    layers_png,
    layers_with_gradients_csv,
    traced_logits,
)
from sweep.measure.numerics import error_ratio, reference_precision
from sweep.measure.prompts import prompt_inputs
from sweep.measure.workloads.protocol import (
    JobState,
    Sides,
    check_baseline_finite,
    check_kernel_finite,
    check_reference_finite,
)


@dataclass
class TrainConfig(WorkloadConfig):
    name: str = "train"


# Where a non-finite loss or gradient comes from when every module's forward output is finite.
AFTER_FORWARD = "the loss or the backward (every module's forward output is finite)"


@dataclass(frozen=True)
class TrainReference:
    """The loss and gradients of the higher-precision backward, or why there are none."""

    loss: float | None
    grads: list[torch.Tensor] | None  # per parameter, in the reference dtype, on the host
    note: str = ""


def training_step(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The causal-LM loss on `input_ids` and its gradient for every parameter; `.grad` is left untouched."""
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@contextmanager
def trainable(model: torch.nn.Module) -> Iterator[list[str]]:
    """Training mode without dropout (`without_dropout`, whose rates it yields) and gradients for every parameter;
    on exit the model is as it was, with no `.grad` kept."""
    parameters = list(model.parameters())
    requires_grad = [p.requires_grad for p in parameters]
    was_training = model.training
    model.requires_grad_(True)
    model.train()
    try:
        with without_dropout(model) as rates:
            yield rates
    finally:
        model.train(was_training)
        for parameter, flag in zip(parameters, requires_grad):
            parameter.requires_grad_(flag)
            parameter.grad = None


@contextmanager
def without_dropout(model: torch.nn.Module) -> Iterator[list[str]]:
    """Every dropout rate of the model at 0 inside; yields those that were not, as `<class>.<attribute>=<rate>`.
    Dropout draws new masks on every step, so an exact kernel would differ from eager. The same masks on both
    sides and in the reference are out of reach: on CUDA the float64 reference's attention draws its masks on
    another path than the fused attention of the run's dtype, and a CUDA graph replay draws new ones."""
    settings = _dropout_settings(model)
    for owner, attribute, _ in settings:
        setattr(owner, attribute, 0.0)
    try:
        yield sorted({f"{type(owner).__name__}.{attribute}={rate:g}" for owner, attribute, rate in settings})
    finally:
        for owner, attribute, rate in settings:
            setattr(owner, attribute, rate)


def _dropout_settings(model: torch.nn.Module) -> list[tuple[object, str, float]]:
    """The non-zero dropout rates the forward reads: each dropout module's `p`, and the float attributes named
    like a dropout (`attention_dropout`, `attn_pdrop`, `layerdrop`) of the modules and of their configs, which
    transformers' attentions pass to their attention function while training."""
    settings: list[tuple[object, str, float]] = []
    owners: dict[int, object] = {}  # the other modules and their configs, each once
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            if module.p > 0:
                settings.append((module, "p", module.p))
            continue
        owners[id(module)] = module
        if isinstance(config := getattr(module, "config", None), PretrainedConfig):
            owners[id(config)] = config
    for owner in owners.values():
        settings += [(owner, name, value) for name, value in vars(owner).items()
                     if "drop" in name and isinstance(value, float) and value > 0]
    return settings


class Train:
    name: ClassVar[str] = "train"
    kernel_mode: ClassVar[Mode] = Mode.TRAINING

    def __init__(self) -> None:
        self.dropout_turned_off: list[str] = []  # `running`'s, for the `dropout` tag

    def positions(self, prompt: PromptConfig) -> int:
        return prompt.length

    def forward_path(self, cfg: Any) -> str:
        """`forward.use_cache` does not apply: a training step keeps no cache."""
        return "training_step"

    def inputs(self, tokenizer: object, cfg: Any, device: torch.device) -> list[torch.Tensor]:
        return prompt_inputs(tokenizer, cfg.prompt, max(1, cfg.timing.input_sets), device)

    def reference(
        self, model: torch.nn.Module, inputs: list[torch.Tensor], reference_dtype: torch.dtype, cfg: Any
    ) -> Any:
        """The same step in `reference_dtype`. When it does not fit in the device's memory, only the metrics
        against it are lost: the note says so."""
        with trainable(model), reference_precision(model, reference_dtype):
            try:
                loss, grads = training_step(model, inputs[0])
                reference = TrainReference(float(loss), [g.to("cpu") for g in grads])
            except torch.cuda.OutOfMemoryError as error:
                message = str(error).splitlines()[0]
                return TrainReference(None, None, f"the {reference_dtype} reference backward does not fit: "
                                                  f"{message}; grad_err_* not measured")
        check_reference_finite([loss, *reference.grads], reference_dtype)
        return reference

    @contextmanager
    def running(self, model: torch.nn.Module) -> Iterator[None]:
        with trainable(model) as self.dropout_turned_off:
            yield

    def sides(self, job: JobState) -> Sides:
        """The timed output is the input embeddings' gradient: the backward's last, it depends on every layer and
        on which tokens the input holds, so the graph replay check sees a stale or wrong replay."""
        parameters = list(job.model.parameters())
        embeddings = job.model.get_input_embeddings().weight
        index = next(i for i, p in enumerate(parameters) if p is embeddings)

        def step(input_ids: torch.Tensor) -> torch.Tensor:
            return training_step(job.model, input_ids)[1][index]

        return Sides(baseline=step, kernel=step if job.switch is not None else None)

    def compare(self, job: JobState, sides: Sides) -> dict[str, float]:
        metrics: dict[str, float] = {}

        def rerun() -> object:
            return training_step(job.model, job.inputs[0])

        base_loss, base_grads = _host_step(job)
        check_baseline_finite(job, [base_loss, *base_grads], rerun, AFTER_FORWARD)
        reference: TrainReference = job.reference
        if reference.grads is None:
            job.result.tags["reference_note"] = reference.note
        if self.dropout_turned_off:
            rates = ", ".join(self.dropout_turned_off)
            job.result.tags["dropout"] = f"off in the compared and timed steps (the model has {rates})"
        if job.switch is None:
            return metrics | _gradient_metrics(None, base_grads, reference.grads, job.device)
        with job.switch.active():
            kernel_loss, kernel_grads = _host_step(job)
        check_kernel_finite(job, [kernel_loss, *kernel_grads], rerun, AFTER_FORWARD)
        if job.cfg.numerics.per_layer:
            job.status("per-layer gradients")
            metrics |= _layer_table(job)
        metrics["loss_diff"] = abs(float(kernel_loss) - float(base_loss))
        metrics |= _gradient_metrics(kernel_grads, base_grads, reference.grads, job.device)
        return metrics

    def timing_metrics(self, metrics: dict[str, float], cfg: Any) -> dict[str, float]:
        return {}


def _layer_table(job: JobState) -> dict[str, float]:
    """Prefill's per-layer table of the prompt's forward, with each module's input and weight gradients beside it;
    returns its metrics."""
    assert job.switch is not None
    _, _, records = traced_logits(job.model, job.switch, job.inputs[0])
    gradients = layer_gradients(job.model, job.switch, job.inputs[0], job.cfg.seed)
    job.result.artifacts["layers/layers.csv"] = layers_with_gradients_csv(records, gradients)
    job.result.artifacts["layers/layers.png"] = layers_png(records, f"{job.result.name}: where the kernels differ")
    return layer_metrics(records) | layer_gradient_metrics(gradients)


def _host_step(job: JobState) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step's loss and gradients, moved to the host so that the other side starts from the same memory."""
    loss, grads = training_step(job.model, job.inputs[0])
    return loss.to("cpu"), [g.to("cpu") for g in grads]


def _gradient_metrics(kernel: list[torch.Tensor] | None, baseline: list[torch.Tensor],
                      reference: list[torch.Tensor] | None, device: torch.device) -> dict[str, float]:
    """In one pass over the parameters, each gradient moved to `device` once, in float64:
    `grad_max_rel_diff` (the worst ‖g_kernel − g_base‖ / ‖g_base‖), and against the reference
    `grad_err_<side>` = ‖g − g_ref‖ / ‖g_ref‖ over all parameters together, and `grad_err_ratio`."""
    worst = 0.0
    squared = {"baseline": 0.0, "kernel": 0.0, "reference": 0.0}
    for index, base_grad in enumerate(baseline):
        base = base_grad.to(device, torch.float64)
        grads = {"baseline": base}
        if kernel is not None:
            grads["kernel"] = kernel[index].to(device, torch.float64)
            worst = max(worst, _relative_diff(grads["kernel"], base))
        if reference is not None:
            ref = reference[index].to(device, torch.float64)
            squared["reference"] += float(torch.linalg.vector_norm(ref) ** 2)
            for side, grad in grads.items():
                squared[side] += float(torch.linalg.vector_norm(grad - ref) ** 2)
    metrics = {"grad_max_rel_diff": worst} if kernel is not None else {}
    if reference is not None:
        norm = math.sqrt(squared["reference"])
        metrics["grad_err_baseline"] = math.sqrt(squared["baseline"]) / norm
        if kernel is not None:
            metrics["grad_err_kernel"] = math.sqrt(squared["kernel"]) / norm
            metrics["grad_err_ratio"] = error_ratio(metrics["grad_err_kernel"], metrics["grad_err_baseline"])
    return metrics


def _relative_diff(values: torch.Tensor, base: torch.Tensor) -> float:
    """‖values − base‖ / ‖base‖; 0 when both are zero, inf when only `base` is."""
    diff = float(torch.linalg.vector_norm(values - base))
    norm = float(torch.linalg.vector_norm(base))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm
