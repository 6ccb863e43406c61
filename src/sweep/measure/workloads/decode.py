"""decode: one generation step, timed. Each sequence already holds the prompt in a static KV cache; the step feeds
one token at position `prompt.length` and returns the next token's logits, compared like prefill's."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from kernels import Mode
from transformers import StaticCache

from sweep.config import PromptConfig, WorkloadConfig
from sweep.measure.forensics import distribution_metrics
from sweep.measure.numerics import compare_outputs, reference_precision, relative_error
from sweep.measure.prompts import prompt_inputs
from sweep.measure.timing import PLACEMENT_STEP, PLACEMENT_STEPS
from sweep.measure.workloads.protocol import (
    JobState,
    Sides,
    check_baseline_finite,
    check_kernel_finite,
    check_reference_finite,
)


@dataclass
class DecodeConfig(WorkloadConfig):
    name: str = "decode"


class DecodeStep:
    """The step after a prompt: a static cache of `prompt.length + 1` positions holds the prompt's keys and values
    (from a prefill run with the caller's kernels); each call writes position `prompt.length` and attends to all.

    transformers' static cache layers count the positions they hold in a device tensor that every update
    advances; the step rewinds it first, so that it can be repeated (and replayed in a CUDA graph) at the same
    position instead of running off the cache's end.
    """

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor):
        self.model, self.prompt = model, prompt
        self.length = prompt.shape[1]
        self.position_ids = torch.full((prompt.shape[0], 1), self.length, device=prompt.device)
        self._spacer: torch.Tensor | None = None
        self._fill()

    def renew(self) -> None:
        """A new cache behind a spacer of random size, filled by a prefill with the kernels now selected. Each side
        reads its own cache, so where the two caches land changes their ratio from one job to the next; renewed
        with every block (`sweep.measure.timing.renew_state`), the interval samples it."""
        self.cache = self._spacer = None
        self._spacer = torch.empty(random.randrange(PLACEMENT_STEPS) * PLACEMENT_STEP, dtype=torch.uint8,
                                   device=self.prompt.device)
        self._fill()

    def _fill(self) -> None:
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.length + 1)
        with torch.inference_mode():
            self.model(input_ids=self.prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.length)
            return self.model(input_ids=token_ids, past_key_values=self.cache, position_ids=self.position_ids,
                              use_cache=True).logits


class Decode:
    name: ClassVar[str] = "decode"
    kernel_mode: ClassVar[Mode] = Mode.INFERENCE

    def positions(self, prompt: PromptConfig) -> int:
        return prompt.length + 1

    def forward_path(self, cfg: Any) -> str:
        """`forward.use_cache` does not apply: the step always runs on its static cache."""
        return "static_cache_step"

    def inputs(self, tokenizer: object, cfg: Any, device: torch.device) -> list[torch.Tensor]:
        """The cache holds input set 0's prompt; the input sets differ in the token the step feeds, the next one
        of each set's text."""
        prompt = cfg.prompt
        longer = PromptConfig(text=prompt.text, length=prompt.length + 1, batch_size=prompt.batch_size)
        sets = prompt_inputs(tokenizer, longer, max(1, cfg.timing.input_sets), device)
        self.prompt = sets[0][:, :-1]
        return [ids[:, -1:] for ids in sets]

    def reference(
        self, model: torch.nn.Module, inputs: list[torch.Tensor], reference_dtype: torch.dtype, cfg: Any
    ) -> Any:
        with reference_precision(model, reference_dtype):
            logits = DecodeStep(model, self.prompt)(inputs[0]).to(device="cpu", dtype=torch.float64)
        check_reference_finite(logits, reference_dtype)
        return logits

    def running(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        return nullcontext()

    def sides(self, job: JobState) -> Sides:
        """Each side has its own cache, filled by its own prefill: the kernel side's by the kernels."""
        baseline = DecodeStep(job.model, self.prompt)
        if job.switch is None:
            return Sides(baseline=baseline, kernel=None)
        with job.switch.active():
            kernel = DecodeStep(job.model, self.prompt)
        return Sides(baseline=baseline, kernel=kernel)

    def compare(self, job: JobState, sides: Sides) -> dict[str, float]:
        ids = job.inputs[0]
        baseline = sides.baseline(ids)
        check_baseline_finite(job, baseline, lambda: sides.baseline(ids))
        if sides.kernel is None:
            return {"ref_err_baseline": relative_error(baseline, job.reference)}
        kernel_step = sides.kernel
        assert job.switch is not None
        with job.switch.active():
            kernel = kernel_step(ids)
        check_kernel_finite(job, kernel, lambda: kernel_step(ids))
        return compare_outputs(baseline, kernel, job.reference) | distribution_metrics(baseline, kernel)

    def timing_metrics(self, metrics: dict[str, float], cfg: Any) -> dict[str, float]:
        """One token per sequence per step."""
        derived = {}
        for side in ("baseline", "kernel"):
            if f"latency_ms_{side}" in metrics:
                derived[f"tokens_per_s_{side}"] = cfg.prompt.batch_size * 1e3 / metrics[f"latency_ms_{side}"]
        return derived
