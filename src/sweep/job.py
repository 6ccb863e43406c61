"""One job: one (model, dtype, kernels, prompt) combination, measured kernel against its eager self."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from omegaconf import DictConfig, OmegaConf

from .config import (
    DeviceChoice,
    KernelsSelection,
    SweepConfig,
    TimingMode,
    kernel_selection,
)
from .errors import JobConfigError, SkipJob
from .fingerprint import fingerprint
from .forensics import (
    distribution_metrics,
    generation_metrics,
    layer_metrics,
    layers_csv,
    layers_png,
    traced_logits,
)
from .kernelization import KernelSwitch, check_layers_exist, resolve_kernel
from .models import ModelCache, torch_dtype
from .numerics import (
    compare_outputs,
    forward_logits,
    kernel_and_baseline_logits,
    reference_logits,
    relative_error,
)
from .prompts import prompt_inputs
from .results import JobResult, RunStatus
from .timing import EagerRunner, GraphRunner, RoundsResult, Runner, timed_rounds

StatusHook = Callable[[str], None]


@dataclass(frozen=True)
class JobPlan:
    device: torch.device
    dtype: torch.dtype
    reference_dtype: torch.dtype
    kernels: KernelsSelection
    timing_modes: tuple[TimingMode, ...]  # the first gives latency_ms_*


# The keys job_name shows in its own words, in its order; a sweep's other keys appear as their overrides.
_NAME_ALIASES = {"model.id": "model", "model.name": "model"}


def job_name(cfg: SweepConfig | DictConfig, swept: Sequence[tuple[str, str]] = ()) -> str:
    """A job on its own: `bf16 rms T=118` (with the model and B= when not the defaults). A job of a sweep, given
    `swept` = (key, override) for each of its overrides of a key the sweep varies: only what varies, e.g. `rms`,
    `fp32 rms T=1024` or `rms timing.mode=eager`; the parent run's name says what all jobs share."""
    model = str(cfg.model.id or cfg.model.name)
    words = {"model": model, "dtype": cfg.dtype.name, "kernels": str(cfg.kernels.get("name", "custom")),
             "prompt.length": f"T={cfg.prompt.length}", "prompt.batch_size": f"B={cfg.prompt.batch_size}"}
    if not swept:
        hidden = {"model"} if model == "tiny-llama" else set()
        hidden |= {"prompt.batch_size"} if cfg.prompt.batch_size == 1 else set()
        return " ".join(word for key, word in words.items() if key not in hidden)
    keys = {_NAME_ALIASES.get(key, key) for key, _ in swept}
    others = [override for key, override in swept if _NAME_ALIASES.get(key, key) not in words]
    return " ".join([*(word for key, word in words.items() if key in keys), *others])


def job_params(cfg: SweepConfig | DictConfig) -> dict[str, str]:
    return {
        "model": cfg.model.id or cfg.model.name,
        "dtype": cfg.dtype.name,
        "kernels": str(cfg.kernels.get("name", "custom")),
        "prompt_len": str(cfg.prompt.length),
        "batch_size": str(cfg.prompt.batch_size),
        "device": DeviceChoice(cfg.device).value,
        "timing_mode": TimingMode(cfg.timing.mode).value,
    }


def plan_job(cfg: SweepConfig | DictConfig) -> JobPlan:
    """Everything that can be checked before a model is touched."""
    kernels = kernel_selection(cfg.kernels)
    requested = DeviceChoice(cfg.device)
    if requested == DeviceChoice.cuda and not torch.cuda.is_available():
        raise SkipJob("device=cuda but no CUDA device is visible")
    if requested == DeviceChoice.auto:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(requested.value)
    dtype = torch_dtype(cfg.dtype.torch_dtype)
    _check_dtype_runs(dtype, device)
    mode = TimingMode(cfg.timing.mode)
    if mode == TimingMode.auto:
        modes = (TimingMode.graph,) if device.type == "cuda" else (TimingMode.eager,)
    elif mode == TimingMode.both:
        modes = (TimingMode.graph, TimingMode.eager)
    else:
        modes = (mode,)
    if TimingMode.graph in modes and device.type != "cuda":
        raise JobConfigError(f"timing.mode={mode.value} needs CUDA graphs; use timing.mode=eager on {device.type}")
    for layer, spec in kernels.specs.items():
        if spec.path is not None and not Path(spec.path).expanduser().is_dir():
            raise JobConfigError(f"kernels.{layer}.path={spec.path} is not a directory")
    return JobPlan(device, dtype, torch_dtype(cfg.dtype.reference), kernels, modes)


def _check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    try:
        probe = torch.ones(4, 4, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError) as error:
        raise SkipJob(f"{dtype} does not run on {device}: {error}") from None


def run_job(cfg: SweepConfig | DictConfig, models: ModelCache, status: StatusHook | None = None,
            swept: Sequence[tuple[str, str]] = ()) -> JobResult:
    """Never raises for a bad combination: the result says skipped or failed, with the reason. `swept`: see
    `job_name`."""
    started = time.perf_counter()
    result = JobResult(name=job_name(cfg, swept), params=job_params(cfg))
    result.artifacts["config.yaml"] = OmegaConf.to_yaml(cfg)
    try:
        plan = plan_job(cfg)
        result.tags |= fingerprint(plan.device)
        _measure(cfg, plan, models, result, status or (lambda _: None))
    except SkipJob as skip:
        result.status, result.reason = RunStatus.skipped, str(skip)
    except Exception as error:  # any failure of one combination is that run's result, not the sweep's end
        result.status, result.reason = RunStatus.failed, f"{type(error).__name__}: {error}"
        result.artifacts["traceback.txt"] = traceback.format_exc()
    result.metrics["job_wall_s"] = time.perf_counter() - started
    return result


def _measure(cfg, plan: JobPlan, models: ModelCache, result: JobResult, status: StatusHook) -> None:
    status("loading model")
    loaded = models.get(cfg.model, plan.dtype, plan.device)
    model = loaded.model
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.prompt.length > max_positions:
        raise JobConfigError(f"prompt.length={cfg.prompt.length} exceeds the model's {max_positions} positions")
    check_layers_exist(model, list(plan.kernels.specs))
    kernels = [resolve_kernel(layer, spec, plan.kernels.source) for layer, spec in plan.kernels.specs.items()]
    for kernel in kernels:
        result.tags[f"kernel_source_{kernel.layer}"] = kernel.source
        if kernel.note:
            result.tags[f"kernel_note_{kernel.layer}"] = kernel.note
    inputs = prompt_inputs(loaded.tokenizer, cfg.prompt, max(1, cfg.timing.input_sets), plan.device)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)

    status("reference forward")
    prompt_key = (cfg.prompt.text, cfg.prompt.length, cfg.prompt.batch_size)
    reference = models.reference(prompt_key, lambda: reference_logits(model, inputs[0], plan.reference_dtype))
    switch = None
    if kernels:
        status("kernelizing")
        switch = KernelSwitch.apply(model, kernels, plan.device)
        for layer, count in switch.replaced.items():
            result.metrics[f"kernelized_{layer}"] = count
        result.metrics["kernelized_total"] = sum(switch.replaced.values())
        missing = [layer for layer, count in switch.replaced.items() if count == 0]
        if missing:
            raise JobConfigError(
                f"kernel requested but not applied for {', '.join(missing)}: kernelize kept the original forward "
                "(a layer without a compatible mode or device in its kernel repository)"
            )

    status("numerics")
    if switch is None:
        result.metrics["ref_err_baseline"] = relative_error(forward_logits(model, inputs[0]), reference)
    else:
        _numerics(model, switch, inputs[0], reference, cfg, result, status)

    _time(model, switch, inputs, cfg, plan, result, status)
    if plan.device.type == "cuda":
        result.metrics["peak_mem_mb"] = torch.cuda.max_memory_allocated(plan.device) / 2**20


def _numerics(model, switch: KernelSwitch, input_ids, reference, cfg, result: JobResult, status: StatusHook) -> None:
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
    if cfg.numerics.gen_tokens > 0:
        status(f"generating {cfg.numerics.gen_tokens} tokens")
        result.metrics |= generation_metrics(model, switch, input_ids, cfg.numerics.gen_tokens)


def _side_forward(model: torch.nn.Module, switch: KernelSwitch | None, kernel_on: bool):
    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        if switch is None:
            return forward_logits(model, input_ids)
        with switch.active(kernel_on):
            return forward_logits(model, input_ids)

    return forward


def _runners(mode: TimingMode, model, switch, inputs) -> tuple[Runner, Runner | None]:
    make = GraphRunner if mode == TimingMode.graph else EagerRunner
    baseline = make(_side_forward(model, switch, False), inputs)
    kernel = make(_side_forward(model, switch, True), inputs) if switch is not None else None
    return baseline, kernel


def _time(model, switch, inputs, cfg, plan: JobPlan, result: JobResult, status: StatusHook) -> None:
    measured: dict[TimingMode, RoundsResult] = {}
    modes = list(plan.timing_modes)
    for mode in modes:
        status(f"timing ({mode.value})")
        try:
            baseline, kernel = _runners(mode, model, switch, inputs)
        except Exception as error:  # capture can fail for kernels that sync or allocate on the host
            if mode != TimingMode.graph:
                raise
            result.tags["timing_note"] = f"CUDA graph unusable, timed eagerly instead: {type(error).__name__}: {error}"
            if TimingMode.eager not in modes:
                modes.append(TimingMode.eager)
            continue

        def report(rounds: RoundsResult, mode: TimingMode = mode) -> None:
            status(f"timing ({mode.value}) round {rounds.rounds}")

        if isinstance(baseline, GraphRunner):
            result.metrics["graph_replay_rel_err"] = max(r.replay_error for r in (baseline, kernel) if r is not None)
        measured[mode] = timed_rounds(baseline, kernel, len(inputs), cfg.timing, plan.device, cfg.seed, report)
        del baseline, kernel
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
    _timing_metrics(measured, result)


def _timing_metrics(measured: dict[TimingMode, RoundsResult], result: JobResult) -> None:
    primary_mode = next(iter(measured))
    primary = measured[primary_mode]
    metrics = result.metrics
    metrics["latency_ms_baseline"] = median(primary.baseline_ms)
    metrics["timing_rounds"] = primary.rounds
    metrics["timing_s"] = sum(r.seconds for r in measured.values())
    result.tags["timing_mode_used"] = primary_mode.value
    prefixes = {TimingMode.graph: "gpu_ms", TimingMode.eager: "eager_ms"}
    if len(measured) > 1 or primary_mode == TimingMode.graph:
        for mode, rounds in measured.items():
            metrics[f"{prefixes[mode]}_baseline"] = median(rounds.baseline_ms)
            if rounds.kernel_ms:
                metrics[f"{prefixes[mode]}_kernel"] = median(rounds.kernel_ms)
    if TimingMode.graph in measured and TimingMode.eager in measured:
        graph, eager = measured[TimingMode.graph], measured[TimingMode.eager]
        metrics["launch_overhead"] = median(eager.baseline_ms) / median(graph.baseline_ms)
    if primary.estimate is not None:
        metrics["latency_ms_kernel"] = median(primary.kernel_ms)
        metrics["speedup"] = primary.estimate.speedup
        metrics["speedup_ci_low"] = primary.estimate.low
        metrics["speedup_ci_high"] = primary.estimate.high
        metrics["speedup_significant"] = float(primary.estimate.significant)
