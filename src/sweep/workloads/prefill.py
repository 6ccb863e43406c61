"""prefill (the default): one forward over the whole prompt, timed; its logits compared, layer by layer."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from kernels import Mode

from ..config import PromptConfig, WorkloadConfig
from ..forensics import (
    distribution_metrics,
    generation_metrics,
    greedy_tokens,
    layer_metrics,
    layers_csv,
    layers_png,
    traced_logits,
)
from ..numerics import (
    compare_outputs,
    forward_logits,
    forward_path,
    kernel_and_baseline_logits,
    reference_logits,
    relative_error,
)
from ..models import GenerationKey
from ..prompts import prompt_inputs
from ..results import JobResult
from . import JobState, Sides, check_baseline_finite, check_kernel_finite, check_reference_finite


@dataclass
class PrefillConfig(WorkloadConfig):
    name: str = "prefill"


class Prefill:
    """The measured forward is the call users make (`forward_logits` with `forward.use_cache`)."""

    name: ClassVar[str] = "prefill"
    kernel_mode: ClassVar[Mode] = Mode.INFERENCE

    def positions(self, prompt: PromptConfig) -> int:
        return prompt.length

    def forward_path(self, cfg: Any) -> str:
        return forward_path(cfg.forward.use_cache)

    def inputs(self, tokenizer: object, cfg: Any, device: torch.device) -> list[torch.Tensor]:
        return prompt_inputs(tokenizer, cfg.prompt, max(1, cfg.timing.input_sets), device)

    def reference(
        self, model: torch.nn.Module, inputs: list[torch.Tensor], reference_dtype: torch.dtype, cfg: Any
    ) -> Any:
        logits = reference_logits(model, inputs[0], reference_dtype, cfg.forward.use_cache)
        check_reference_finite(logits, reference_dtype)
        return logits

    def running(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        return nullcontext()

    def sides(self, job: JobState) -> Sides:
        use_cache = job.cfg.forward.use_cache

        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            return forward_logits(job.model, input_ids, use_cache)

        return Sides(baseline=forward, kernel=forward if job.switch is not None else None)

    def compare(self, job: JobState, sides: Sides) -> dict[str, float]:
        max_positions = getattr(job.model.config, "max_position_embeddings", None)
        gen_tokens = _generated_tokens(job.cfg, max_positions, job.result)
        if job.switch is None:
            ids = job.inputs[0]
            baseline = sides.baseline(ids)
            check_baseline_finite(job, baseline, lambda: sides.baseline(ids))
            return {"ref_err_baseline": relative_error(baseline, job.reference)}
        return _numerics(job, gen_tokens)

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


def _numerics(job: JobState, gen_tokens: int) -> dict[str, float]:
    """The numerics metrics, returned only once all of them are computed."""
    assert job.switch is not None
    model, switch, input_ids, result = job.model, job.switch, job.inputs[0], job.result
    use_cache = job.cfg.forward.use_cache
    metrics: dict[str, float] = {}
    if job.cfg.numerics.per_layer:
        baseline, kernel, records = traced_logits(model, switch, input_ids, use_cache)
    else:
        baseline, kernel = kernel_and_baseline_logits(model, switch, input_ids, use_cache)

    def rerun() -> torch.Tensor:
        return forward_logits(model, input_ids, use_cache)

    check_baseline_finite(job, baseline, rerun)
    check_kernel_finite(job, kernel, rerun)
    if job.cfg.numerics.per_layer:
        metrics |= layer_metrics(records)
        result.artifacts["layers/layers.csv"] = layers_csv(records)
        result.artifacts["layers/layers.png"] = layers_png(records, f"{result.name}: where the kernels differ")
    metrics |= compare_outputs(baseline, kernel, job.reference)
    metrics |= distribution_metrics(baseline, kernel)
    del baseline, kernel
    metrics["gen_tokens"] = gen_tokens
    if gen_tokens > 0:
        job.status(f"generating {gen_tokens} tokens")
        prompt = job.cfg.prompt
        key = GenerationKey(prompt.text, prompt.length, prompt.batch_size, gen_tokens)
        baseline_tokens = partial(job.models.baseline_tokens, key, lambda: greedy_tokens(model, input_ids, gen_tokens))
        metrics |= generation_metrics(model, switch, input_ids, gen_tokens, baseline_tokens)
    return metrics
