"""prefill (the default): one forward over the whole prompt, timed; its logits compared, layer by layer."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from kernels import Mode

from ..config import PromptConfig, WorkloadConfig
from ..forensics import (
    distribution_metrics,
    generation_metrics,
    layer_metrics,
    layers_csv,
    layers_png,
    traced_logits,
)
from ..numerics import (
    compare_outputs,
    forward_logits,
    kernel_and_baseline_logits,
    reference_logits,
    relative_error,
)
from ..prompts import prompt_inputs
from ..results import JobResult
from . import JobState, Sides, switched


@dataclass
class PrefillConfig(WorkloadConfig):
    name: str = "prefill"


class Prefill:
    name: ClassVar[str] = "prefill"
    kernel_mode: ClassVar[Mode] = Mode.INFERENCE

    def positions(self, prompt: PromptConfig) -> int:
        return prompt.length

    def inputs(self, tokenizer: object, cfg: Any, device: torch.device) -> list[torch.Tensor]:
        return prompt_inputs(tokenizer, cfg.prompt, max(1, cfg.timing.input_sets), device)

    def reference(self, model: torch.nn.Module, inputs: list[torch.Tensor], reference_dtype: torch.dtype) -> Any:
        return reference_logits(model, inputs[0], reference_dtype)

    def running(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        return nullcontext()

    def sides(self, job: JobState) -> Sides:
        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            return forward_logits(job.model, input_ids)

        kernel = switched(forward, job.switch, True) if job.switch is not None else None
        return Sides(baseline=forward, kernel=kernel)

    def compare(self, job: JobState, sides: Sides) -> None:
        max_positions = getattr(job.model.config, "max_position_embeddings", None)
        gen_tokens = _generated_tokens(job.cfg, max_positions, job.result)
        if job.switch is None:
            job.result.metrics["ref_err_baseline"] = relative_error(sides.baseline(job.inputs[0]), job.reference)
            return
        _numerics(job.model, job.switch, job.inputs[0], job.reference, job.cfg, gen_tokens, job.result, job.status)

    def timing_metrics(self, metrics: dict[str, float], cfg: Any) -> dict[str, float]:
        return {}


def _generated_tokens(cfg, max_positions: int | None, result: JobResult) -> int:
    """`numerics.gen_tokens`, clipped so that prompt and generation stay within the model's positions."""
    wanted = cfg.numerics.gen_tokens
    if max_positions is None or cfg.prompt.length + wanted <= max_positions:
        return wanted
    clipped = max_positions - cfg.prompt.length
    result.tags["gen_note"] = (
        f"numerics.gen_tokens={wanted} clipped to {clipped}: prompt.length={cfg.prompt.length} plus the generated "
        f"tokens may not exceed the model's {max_positions} positions"
    )
    return clipped


def _numerics(model, switch, input_ids, reference, cfg, gen_tokens: int, result: JobResult, status) -> None:
    if cfg.numerics.per_layer:
        baseline, kernel, records = traced_logits(model, switch, input_ids)
        result.metrics |= layer_metrics(records)
        result.artifacts["layers/layers.csv"] = layers_csv(records)
        result.artifacts["layers/layers.png"] = layers_png(records, f"{result.name}: where the kernels differ")
    else:
        baseline, kernel = kernel_and_baseline_logits(model, switch, input_ids)
    result.metrics |= compare_outputs(baseline, kernel, reference)
    result.metrics |= distribution_metrics(baseline, kernel)
    del baseline, kernel
    result.metrics["gen_tokens"] = gen_tokens
    if gen_tokens > 0:
        status(f"generating {gen_tokens} tokens")
        result.metrics |= generation_metrics(model, switch, input_ids, gen_tokens)
