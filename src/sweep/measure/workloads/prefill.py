"""prefill (the default): one forward over the whole prompt, timed; its logits compared, layer by layer."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from kernels import Mode

from sweep.config import PromptConfig, WorkloadConfig
from sweep.measure.compilation import (
    COMPILED,
    COMPILED_KERNEL,
    CompiledSides,
    compile_kernel_switch,
    compile_sides,
    compiles,
)
from sweep.measure.forensics import (
    distribution_metrics,
    generation_metrics,
    greedy_tokens,
    layer_metrics,
    layers_csv,
    layers_png,
    traced_logits,
)
from sweep.measure.models import GenerationKey
from sweep.measure.numerics import (
    compare_outputs,
    error_ratio,
    forward_logits,
    forward_options,
    forward_path,
    kernel_and_baseline_logits,
    nonfinite_count,
    reference_logits,
    relative_error,
)
from sweep.measure.prompts import prompt_inputs
from sweep.measure.workloads.protocol import (
    JobState,
    Sides,
    check_baseline_finite,
    check_kernel_finite,
    check_reference_finite,
)
from sweep.records.errors import KernelOutputError
from sweep.records.results import JobResult


@dataclass
class PrefillConfig(WorkloadConfig):
    name: str = "prefill"


class Prefill:
    """The measured forward is the call users make (`forward_logits` with `forward.use_cache`)."""

    name: ClassVar[str] = "prefill"
    kernel_mode: ClassVar[Mode] = Mode.INFERENCE

    def __init__(self) -> None:
        self._compiled: CompiledSides | None = None  # baseline=compile

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

        sides = Sides(baseline=forward, kernel=forward if job.switch is not None else None)
        if compiles(job.cfg):
            self._compiled = _compile(job)
            sides.others, sides.comparisons = self._compiled.sides, self._compiled.comparisons
        return sides

    def compare(self, job: JobState, sides: Sides) -> dict[str, float]:
        max_positions = getattr(job.model.config, "max_position_embeddings", None)
        gen_tokens = _generated_tokens(job.cfg, max_positions, job.result)
        if job.switch is None:
            ids = job.inputs[0]
            baseline = sides.baseline(ids)
            check_baseline_finite(job, baseline, lambda: sides.baseline(ids))
            metrics = {"ref_err_baseline": relative_error(baseline, job.reference)}
        else:
            metrics = _numerics(job, gen_tokens)
        if self._compiled is not None:
            metrics |= _compiled_numerics(job, self._compiled)
        return metrics

    def timing_metrics(self, metrics: dict[str, float], cfg: Any) -> dict[str, float]:
        return {} if self._compiled is None else {"recompiles": self._compiled.recompiles()}


def _compile(job: JobState) -> CompiledSides:
    """The same call as `forward_logits`, compiled without and (where they can be compiled) with the kernels."""
    job.status("compiling")
    model, options = job.model, forward_options(job.cfg.forward.use_cache)

    # Two functions, two code objects: dynamo caches graphs per code object, so each side keeps its own.
    def compiled_call(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, **options).logits

    def compiled_call_with_kernels(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, **options).logits

    compiled_switch, note = None, ""
    if job.switch is not None:
        compiled_switch, note = compile_kernel_switch(model, job.kernels, job.device, job.switch,
                                                      job.cfg.baseline.undeclared_kernels)
    if note:
        job.result.tags["compiled_kernel_note"] = note
    compiled = compile_sides(compiled_call, compiled_call_with_kernels, job.switch, compiled_switch, job.inputs[0],
                             job.cfg.baseline)
    job.result.metrics |= compiled.metrics
    job.result.tags |= compiled.tags
    return compiled


def _compiled_numerics(job: JobState, compiled: CompiledSides) -> dict[str, float]:
    """The compiled sides against the same reference as eager (`err_ratio_*` = their error over eager's) and
    against eager (`max_abs_diff_compiled`, `max_abs_diff_compiled_kernel_vs_eager`); the kernels inside the
    compiled model against it without them (`max_abs_diff_compiled_kernel`)."""
    ids = job.inputs[0]
    eager = forward_logits(job.model, ids, job.cfg.forward.use_cache)
    eager_error = relative_error(eager, job.reference)
    outputs = {name: compiled.output(name, ids) for name in compiled.names}
    metrics: dict[str, float] = {}
    for name, output in outputs.items():
        if bad := nonfinite_count(output):
            raise KernelOutputError(f"the {name.replace('_', ' ')} model's output has {bad} non-finite values "
                                    "where eager's has none")
        metrics[f"ref_err_{name}"] = relative_error(output, job.reference)
        metrics[f"err_ratio_{name}"] = error_ratio(metrics[f"ref_err_{name}"], eager_error)
    metrics["max_abs_diff_compiled"] = float((outputs[COMPILED].double() - eager.double()).abs().max())
    if COMPILED_KERNEL in outputs:
        compiled_kernel = outputs[COMPILED_KERNEL].double()
        metrics["max_abs_diff_compiled_kernel"] = float((compiled_kernel - outputs[COMPILED].double()).abs().max())
        metrics["max_abs_diff_compiled_kernel_vs_eager"] = float((compiled_kernel - eager.double()).abs().max())
    return metrics


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
        baseline_tokens = job.models.derived(key, lambda: greedy_tokens(model, input_ids, gen_tokens))
        metrics |= generation_metrics(model, switch, input_ids, baseline_tokens)
    return metrics
