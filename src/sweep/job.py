"""One job: one (model, dtype, kernels, prompt) combination, measured kernel against its eager self."""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from statistics import median

import torch
from omegaconf import DictConfig, OmegaConf

from .config import (
    DeviceChoice,
    GraphPlacementMode,
    KernelsSelection,
    SweepConfig,
    TimingMode,
    kernel_selection,
)
from .errors import JobConfigError, SkipJob
from .failures import FailureKind, classify, out_of_memory_reason
from .fingerprint import fingerprint
from .forensics import (
    distribution_metrics,
    first_nonfinite_module,
    generation_metrics,
    greedy_tokens,
    layer_metrics,
    layers_csv,
    layers_png,
    traced_logits,
)
from .kernelization import (
    KernelSwitch,
    check_kernel_directory,
    check_layers_exist,
    resolve_kernel,
)
from .lease import contention_tags
from .models import GenerationKey, ModelCache, ReferenceKey, torch_dtype
from .numerics import (
    compare_outputs,
    forward_logits,
    forward_path,
    kernel_and_baseline_logits,
    nonfinite_count,
    reference_logits,
    relative_error,
)
from .prompts import prompt_inputs
from .redaction import redact_text
from .results import JobResult, RunStatus
from .timing import (
    EagerRunner,
    GraphPlacement,
    GraphRunner,
    RoundsResult,
    Runner,
    timed_rounds,
)

StatusHook = Callable[[str], None]


class KernelOutputError(RuntimeError):
    """The kernelized forward produced NaN or Inf where the baseline did not: the kernel is broken."""


# What a run that was not measured may still log: bookkeeping, never a timing or numerics result.
UNMEASURED_METRIC_PREFIXES = ("job_wall_s", "kernelized_", "phase_s_")


class Phases:
    """The job's current phase (load, reference, kernelize, numerics, capture, timing) and the seconds spent in
    each, as metrics `phase_s_<phase>`. A phase that raises stays current: the failure is reported in it."""

    def __init__(self, metrics: dict[str, float]):
        self.current = "plan"
        self._metrics = metrics

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        started = time.perf_counter()
        try:
            yield
        finally:
            key = f"phase_s_{name}"
            self._metrics[key] = self._metrics.get(key, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class JobPlan:
    device: torch.device
    dtype: torch.dtype
    reference_dtype: torch.dtype
    kernels: KernelsSelection
    timing_modes: tuple[TimingMode, ...]  # the first gives latency_ms_*


def kernels_name(cfg: SweepConfig | DictConfig) -> str:
    """The kernel subset's name; a subset called `none` that has layers (`kernels=none +kernels.X=...`) is
    `custom`: which kernels ran is in the `kernel_<Layer>` params."""
    name = str(cfg.kernels.get("name", "custom"))
    has_layers = any(key not in ("name", "source") and value is not None for key, value in cfg.kernels.items())
    return "custom" if name == "none" and has_layers else name


# The keys job_name shows in its own words, in its order; a sweep's other keys appear as their overrides.
_NAME_ALIASES = {"model.id": "model", "model.name": "model"}


def job_name(cfg: SweepConfig | DictConfig, swept: Sequence[tuple[str, str]] = ()) -> str:
    """A job on its own: `bf16 rms T=118` (with the model and B= when not the defaults). A job of a sweep, given
    `swept` = (key, override) for each of its overrides of a key the sweep varies: only what varies, e.g. `rms`,
    `fp32 rms T=1024` or `rms timing.mode=eager`; the parent run's name says what all jobs share."""
    model = str(cfg.model.id or cfg.model.name)
    words = {"model": model, "dtype": cfg.dtype.name, "kernels": kernels_name(cfg),
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
        "kernels": kernels_name(cfg),
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
    if device.type == "cuda":  # the leased GPU (sweep/lease.py sets it), by index: cached models stay apart
        device = torch.device("cuda", torch.cuda.current_device())
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
        if spec.path is not None:
            check_kernel_directory(layer, Path(spec.path).expanduser())
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
    `job_name`. After running out of memory the model cache is dropped and memory released, so that the next job
    starts clean; after a sticky CUDA error (tag failure_kind=cuda_context_lost) nothing more can run in this
    process."""
    started = time.perf_counter()
    result = JobResult(name=job_name(cfg, swept), params=job_params(cfg))
    result.artifacts["config.yaml"] = redact_text(OmegaConf.to_yaml(cfg))
    phases = Phases(result.metrics)
    failure = None
    device = torch.device("cpu")
    try:
        plan = plan_job(cfg)
        device = plan.device
        result.tags |= fingerprint(plan.device)
        _measure(cfg, plan, models, result, status or (lambda _: None), phases)
    except SkipJob as skip:
        result.status, result.reason = RunStatus.skipped, str(skip)
    except Exception as error:  # any failure of one combination is that run's result, not the sweep's end
        failure = classify(error)
        result.status, result.reason = RunStatus.failed, f"{type(error).__name__}: {error}"
        if failure == FailureKind.out_of_memory:
            result.reason = out_of_memory_reason(error, phases.current, device)
        result.tags["failure_kind"] = failure.value
        result.tags["failure_phase"] = phases.current
        result.artifacts["traceback.txt"] = traceback.format_exc()
    if result.status != RunStatus.measured:
        result.metrics = {k: v for k, v in result.metrics.items() if k.startswith(UNMEASURED_METRIC_PREFIXES)}
    if failure == FailureKind.out_of_memory:
        _release_memory(models)  # outside the except block: the traceback's frames hold the tensors until then
    result.metrics["job_wall_s"] = time.perf_counter() - started
    result.ended_ms = int(time.time() * 1000)
    return result


def context_lost_result(cfg: SweepConfig | DictConfig, failed_job: str,
                        swept: Sequence[tuple[str, str]] = ()) -> JobResult:
    """A job not run because an earlier job of this process broke the CUDA context (sticky error)."""
    result = JobResult(name=job_name(cfg, swept), params=job_params(cfg), status=RunStatus.failed)
    result.reason = (f"CUDA context lost after {failed_job}: a sticky CUDA error (device-side assert, illegal "
                     "memory access, launch failure) leaves this process unable to measure; rerun this "
                     "combination in a new sweep")
    result.tags["failure_kind"] = FailureKind.cuda_context_lost.value
    result.artifacts["config.yaml"] = redact_text(OmegaConf.to_yaml(cfg))
    return result


def _release_memory(models: ModelCache) -> None:
    """The model may hold half-built state (a load, a capture, forwards) after an out-of-memory error: drop it
    with its references, and give the freed blocks back to the device."""
    models.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _measure(cfg, plan: JobPlan, models: ModelCache, result: JobResult, status: StatusHook, phases: Phases) -> None:
    status("loading model")
    with phases("load"):  # the model, its checks, the kernels' sources and the prompts
        loaded = models.get(cfg.model, plan.dtype, plan.device)
        model = loaded.model
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and cfg.prompt.length > max_positions:
            raise JobConfigError(f"prompt.length={cfg.prompt.length} exceeds the model's {max_positions} positions")
        gen_tokens = _generated_tokens(cfg, max_positions, result)
        check_layers_exist(model, list(plan.kernels.specs))
        kernels = [resolve_kernel(layer, spec, plan.kernels.source) for layer, spec in plan.kernels.specs.items()]
        for kernel in kernels:
            result.params[f"kernel_{kernel.layer}"] = kernel.identity
            result.tags[f"kernel_source_{kernel.layer}"] = kernel.source
            if kernel.source.startswith("hub:"):  # the user's opt-in to an organisation kernels does not trust
                trusted = plan.kernels.specs[kernel.layer].trust_remote_code
                result.tags[f"kernel_trust_remote_code_{kernel.layer}"] = str(trusted).lower()
            if kernel.note:
                result.tags[f"kernel_note_{kernel.layer}"] = kernel.note
        use_cache = cfg.forward.use_cache
        result.tags["attn_implementation"] = str(model.config._attn_implementation)
        result.tags["forward_path"] = forward_path(use_cache)
        inputs = prompt_inputs(loaded.tokenizer, cfg.prompt, max(1, cfg.timing.input_sets), plan.device)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)

    status("reference forward")
    key = ReferenceKey(cfg.prompt.text, cfg.prompt.length, cfg.prompt.batch_size, str(plan.reference_dtype),
                       forward_path(use_cache))
    with phases("reference"):
        reference = models.reference(key, lambda: reference_logits(model, inputs[0], plan.reference_dtype, use_cache))
    if bad := nonfinite_count(reference):
        raise SkipJob(f"the model overflows even in {plan.reference_dtype} at this length: the reference has "
                      f"{bad} non-finite values")
    switch = None
    if kernels:
        status("kernelizing")
        with phases("kernelize"):
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
    with phases("numerics"):
        if switch is None:
            baseline = forward_logits(model, inputs[0], use_cache)
            _check_baseline_finite(model, baseline, inputs[0], cfg, plan)
            result.metrics["ref_err_baseline"] = relative_error(baseline, reference)
        else:
            baseline_tokens = partial(models.baseline_tokens, GenerationKey(
                cfg.prompt.text, cfg.prompt.length, cfg.prompt.batch_size, gen_tokens),
                lambda: greedy_tokens(model, inputs[0], gen_tokens))
            result.metrics |= _numerics(model, switch, inputs[0], reference, cfg, plan, gen_tokens, result, status,
                                        baseline_tokens)

        status("checking every input set's outputs")
        for ids in inputs[1:]:
            _check_baseline_finite(model, forward_logits(model, ids, use_cache), ids, cfg, plan)
            if switch is not None:
                with switch.active():
                    _check_kernel_finite(model, switch, forward_logits(model, ids, use_cache), ids, use_cache)
    result.tags |= contention_tags(plan.device)
    _time(model, switch, inputs, cfg, plan, result, status, phases)
    if plan.device.type == "cuda":
        result.metrics["peak_mem_mb"] = torch.cuda.max_memory_allocated(plan.device) / 2**20


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


def _check_baseline_finite(model, logits: torch.Tensor, input_ids, cfg, plan: JobPlan) -> None:
    """NaN or Inf without kernels: the model itself overflows at this dtype and length; nothing to compare."""
    if bad := nonfinite_count(logits):
        where = first_nonfinite_module(model, lambda: forward_logits(model, input_ids, cfg.forward.use_cache))
        raise SkipJob(f"the model itself overflows in {plan.dtype} at T={cfg.prompt.length}: baseline output has "
                      f"{bad} non-finite values, first at {where}")


def _check_kernel_finite(model, switch: KernelSwitch, logits: torch.Tensor, input_ids, use_cache) -> None:
    """NaN or Inf with kernels where the baseline was finite: the kernel is broken (the run fails)."""
    if bad := nonfinite_count(logits):
        with switch.active():
            where = first_nonfinite_module(model, lambda: forward_logits(model, input_ids, use_cache))
        raise KernelOutputError(f"kernel output has {bad} non-finite values, first at {where}")


def _numerics(
    model, switch: KernelSwitch, input_ids, reference, cfg, plan: JobPlan, gen_tokens: int, result: JobResult,
    status: StatusHook, baseline_tokens: Callable[[], torch.Tensor],
) -> dict[str, float]:
    """The numerics metrics, returned only once all of them are computed. `baseline_tokens`: the baseline's greedy
    tokens, generated once per model and prompt (the same for every kernel subset)."""
    metrics: dict[str, float] = {}
    use_cache = cfg.forward.use_cache
    if cfg.numerics.per_layer:
        baseline, kernel, records = traced_logits(model, switch, input_ids, use_cache)
    else:
        baseline, kernel = kernel_and_baseline_logits(model, switch, input_ids, use_cache)
    _check_baseline_finite(model, baseline, input_ids, cfg, plan)
    _check_kernel_finite(model, switch, kernel, input_ids, use_cache)
    if cfg.numerics.per_layer:
        metrics |= layer_metrics(records)
        result.artifacts["layers/layers.csv"] = layers_csv(records)
        result.artifacts["layers/layers.png"] = layers_png(records, f"{result.name}: where the kernels differ")
    metrics |= compare_outputs(baseline, kernel, reference)
    metrics |= distribution_metrics(baseline, kernel)
    del baseline, kernel
    metrics["gen_tokens"] = gen_tokens
    if gen_tokens > 0:
        status(f"generating {gen_tokens} tokens")
        metrics |= generation_metrics(model, switch, input_ids, gen_tokens, baseline_tokens)
    return metrics


def _runners(mode: TimingMode, model, switch, inputs, use_cache,
             placement: GraphPlacementMode = GraphPlacementMode.paired) -> tuple[Runner, Runner | None]:
    """One runner per side. Each selects its side (kernels on or off) in its untimed `prepare` (eager) or
    before capture (graph): switching forwards is never inside a timed forward. With `timing.placement=paired` the
    two graph sides of a block share its memory pool and offset."""

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        return forward_logits(model, input_ids, use_cache)

    make: Callable[..., Runner] = EagerRunner
    if mode == TimingMode.graph:
        paired = switch is not None and GraphPlacementMode(placement) == GraphPlacementMode.paired
        make = partial(GraphRunner, placement=GraphPlacement(sides=2) if paired else None)
    if switch is None:
        return make(forward, inputs), None
    return make(forward, inputs, lambda: switch.select(False)), make(forward, inputs, lambda: switch.select(True))


def _time(model, switch, inputs, cfg, plan: JobPlan, result: JobResult, status: StatusHook, phases: Phases) -> None:
    try:
        _time_modes(model, switch, inputs, cfg, plan, result, status, phases)
    finally:
        if switch is not None:
            switch.select(False)


def _time_modes(model, switch, inputs, cfg, plan: JobPlan, result: JobResult, status: StatusHook,
                phases: Phases) -> None:
    measured: dict[TimingMode, RoundsResult] = {}
    replay_errors: list[float] = []
    modes = list(plan.timing_modes)
    for mode in modes:
        status(f"timing ({mode.value})")
        try:
            with phases("capture" if mode == TimingMode.graph else "timing"):
                baseline, kernel = _runners(mode, model, switch, inputs, cfg.forward.use_cache,
                                            cfg.timing.placement)
        except Exception as error:  # capture can fail for kernels that sync or allocate on the host
            if mode != TimingMode.graph or classify(error) != FailureKind.error:  # memory, CUDA context: the job's
                raise
            result.tags["timing_note"] = f"CUDA graph unusable, timed eagerly instead: {type(error).__name__}: {error}"
            if TimingMode.eager not in modes:
                modes.append(TimingMode.eager)
            continue

        def report(rounds: RoundsResult, mode: TimingMode = mode) -> None:
            status(f"timing ({mode.value}) round {rounds.rounds}")

        if isinstance(baseline, GraphRunner):
            replay_errors = [r.replay_error for r in (baseline, kernel) if isinstance(r, GraphRunner)]
        with phases("timing"):
            measured[mode] = timed_rounds(baseline, kernel, len(inputs), cfg.timing, plan.device, cfg.seed, report)
        del baseline, kernel
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
    _timing_metrics(measured, result)
    if replay_errors:
        result.metrics["graph_replay_rel_err"] = max(replay_errors)


def _timing_metrics(measured: dict[TimingMode, RoundsResult], result: JobResult) -> None:
    primary_mode = next(iter(measured))
    primary = measured[primary_mode]
    metrics = result.metrics
    metrics["latency_ms_baseline"] = median(primary.baseline_ms)
    metrics["timing_rounds"] = primary.rounds
    metrics["timing_blocks"] = len(set(primary.blocks))
    metrics["timing_reps"] = primary.reps
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
