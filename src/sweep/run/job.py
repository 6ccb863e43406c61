"""One job: one (model, dtype, kernels, prompt) combination, measured kernel against its eager self."""

from __future__ import annotations

import gc
import hashlib
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from statistics import median

import torch
from kernels import Mode
from omegaconf import DictConfig, OmegaConf

from sweep.config import (
    BaselineKind,
    DeviceChoice,
    KernelsSelection,
    SweepConfig,
    TimingMode,
    kernel_selection,
    rerun_sd_used,
)
from sweep.measure.compilation import baseline_params, check_baseline, compiles
from sweep.measure.kernelization import (
    KernelSwitch,
    ResolvedKernel,
    check_layers_exist,
    resolve_kernel,
)
from sweep.measure.memory import peak_memory_per_side
from sweep.measure.models import ModelCache, ReferenceKey, torch_dtype
from sweep.measure.ops import measure_ops
from sweep.measure.timing import (
    BASELINE,
    KERNEL,
    SPEEDUP,
    EagerRunner,
    Forward,
    GraphPlacement,
    GraphRunner,
    RoundsResult,
    Runner,
    Select,
    timed_sides,
)
from sweep.measure.workloads import workload
from sweep.measure.workloads.protocol import JobState, Sides, check_baseline_finite, check_kernel_finite
from sweep.records.errors import GraphCheckError, JobConfigError, SkipJob
from sweep.records.failures import FailureKind, classify, out_of_memory_reason
from sweep.records.fingerprint import fingerprint, gpu_memory_is_integrated
from sweep.records.redaction import redact_text
from sweep.records.results import JobResult, RunStatus
from sweep.run.lease import contention_tags
from sweep.run.resume import repeat_hash
from sweep.store.calibration import REPEAT_TAG, RERUN_SD_SOURCE_TAG

StatusHook = Callable[[str], None]


# What a run that was not measured may still log: bookkeeping, never a timing or numerics result.
UNMEASURED_METRIC_PREFIXES = ("job_wall_s", "kernelized_", "phase_s_")


class Phases:
    """The job's current phase (load, reference, kernelize, numerics, capture, timing, ops) and the seconds spent in
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
    resolved: tuple[ResolvedKernel, ...]  # each of `kernels`, found (Hub commit, hash of local files), not loaded
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
             "prompt.length": f"T={cfg.prompt.length}", "prompt.batch_size": f"B={cfg.prompt.batch_size}",
             "workload": cfg.workload.name, "baseline": BaselineKind(cfg.baseline.name).value}
    if not swept:
        hidden = {"model"} if model == "tiny-llama" else set()
        hidden |= {"prompt.batch_size"} if cfg.prompt.batch_size == 1 else set()
        hidden |= {"workload"} if cfg.workload.name == "prefill" else set()
        hidden |= set() if compiles(cfg) else {"baseline"}
        return " ".join(word for key, word in words.items() if key not in hidden)
    keys = {_NAME_ALIASES.get(key, key) for key, _ in swept}
    others = [override for key, override in swept if _NAME_ALIASES.get(key, key) not in words]
    return " ".join([*(word for key, word in words.items() if key in keys), *others])


def job_params(cfg: SweepConfig | DictConfig) -> dict[str, str]:
    return {
        "model": cfg.model.id or cfg.model.name,
        "dtype": cfg.dtype.name,
        "reference_dtype": cfg.dtype.reference,
        "kernels": kernels_name(cfg),
        "prompt_len": str(cfg.prompt.length),
        "prompt_text": prompt_text_param(cfg.prompt.text),
        "batch_size": str(cfg.prompt.batch_size),
        "device": DeviceChoice(cfg.device).value,
        "timing_mode": TimingMode(cfg.timing.mode).value,
        "workload": cfg.workload.name,
    } | baseline_params(cfg)


PROMPT_TEXT_LIMIT = 200  # characters of a prompt's text kept in its param; MLflow refuses long param values


def prompt_text_param(text: str) -> str:
    """The prompt's text as a param: whole when short, else its start and the sha256 of all of it."""
    if len(text) <= PROMPT_TEXT_LIMIT:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{text[:PROMPT_TEXT_LIMIT - 60]}... ({len(text)} characters, sha256 {digest})"


def process_device() -> torch.device:
    """Where this process runs jobs: the leased GPU (sweep/lease.py sets it), by index so that cached models stay
    apart, or the CPU without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def plan_job(cfg: SweepConfig | DictConfig) -> JobPlan:
    """Everything that can be checked before a model is touched, the kernels resolved (not loaded)."""
    kernels = kernel_selection(cfg.kernels)
    check_baseline(cfg)
    requested = DeviceChoice(cfg.device)
    if requested == DeviceChoice.cuda and not torch.cuda.is_available():
        raise SkipJob("device=cuda but no CUDA device is visible")
    device = torch.device("cpu") if requested == DeviceChoice.cpu else process_device()
    dtype = torch_dtype(cfg.dtype.torch_dtype)
    _check_dtype_runs(dtype, device)
    mode = TimingMode(cfg.timing.mode)
    modes = mode.planned(device.type)
    if TimingMode.graph in modes and device.type != "cuda":
        raise JobConfigError(f"timing.mode={mode.value} needs CUDA graphs; use timing.mode=eager on {device.type}")
    resolved = tuple(resolve_kernel(layer, spec, kernels.source) for layer, spec in kernels.specs.items())
    return JobPlan(device, dtype, torch_dtype(cfg.dtype.reference), kernels, resolved, modes)


def _check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    """torch has no kernel for `dtype` on `device` (NotImplementedError, "... not implemented for 'Float8_e4m3fn'"):
    skipped. Any other error of the probe (out of memory, a broken CUDA context) is the job's failure."""
    try:
        probe = torch.ones(4, 4, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except NotImplementedError as error:
        raise SkipJob(f"{dtype} does not run on {device}: {error}") from None


def run_job(cfg: SweepConfig | DictConfig, models: ModelCache, status: StatusHook | None = None,
            swept: Sequence[tuple[str, str]] = (), plan: JobPlan | None = None) -> JobResult:
    """Never raises for a bad combination: the result says skipped or failed, with the reason. `swept`: see
    `job_name`. `plan`: `plan_job(cfg)` when the caller made it already (its kernels are then not resolved
    again). After running out of memory the model cache is dropped and memory released, so that the next job
    starts clean; after a sticky CUDA error (tag failure_kind=cuda_context_lost) nothing more can run in this
    process."""
    started = time.perf_counter()
    result = JobResult(name=job_name(cfg, swept), params=job_params(cfg))
    result.artifacts["config.yaml"] = redact_text(OmegaConf.to_yaml(cfg))
    phases = Phases(result.metrics)
    failure = None
    device = torch.device("cpu")
    try:
        plan = plan_job(cfg) if plan is None else plan
        device = plan.device
        result.tags |= fingerprint(plan.device)
        _measure(cfg, plan, models, result, status or (lambda _: None), phases)
    except SkipJob as skip:
        result.status, result.reason = RunStatus.skipped, str(skip)
    except Exception as error:  # any failure of one combination is that run's result, not the sweep's end
        failure = classify(error)
        result.status, result.reason = RunStatus.failed, f"{type(error).__name__}: {error}"
        if failure == FailureKind.out_of_memory:
            result.reason = out_of_memory_reason(error, phases.current, device, gpu_memory_is_integrated(device))
        result.tags["failure_kind"] = failure.value
        result.tags["failure_phase"] = phases.current
        result.artifacts["traceback.txt"] = traceback.format_exc()
    if result.status != RunStatus.measured:
        result.metrics = {k: v for k, v in result.metrics.items() if k.startswith(UNMEASURED_METRIC_PREFIXES)}
    if failure == FailureKind.out_of_memory:
        _release_memory(models)  # outside the except block: the traceback's frames hold the tensors until then
    else:  # the job's reference cycles (autograd, closures) may hold device memory the next job would count
        gc.collect()
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
    # The process's GPU: its properties (cached by torch and by `fingerprint`) are still read after a sticky error.
    result.tags |= fingerprint(process_device())
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
    work = workload(cfg.workload)
    status("loading model")
    with phases("load"):  # the model, its checks, the kernels' sources and the prompts
        loaded = models.get(cfg.model, plan.dtype, plan.device)
        model = loaded.model
        max_positions = getattr(model.config, "max_position_embeddings", None)
        positions = work.positions(cfg.prompt)
        if max_positions is not None and positions > max_positions:
            needs = "" if positions == cfg.prompt.length else f" ({positions} positions with workload={work.name})"
            raise JobConfigError(
                f"prompt.length={cfg.prompt.length}{needs} exceeds the model's {max_positions} positions")
        check_layers_exist(model, list(plan.kernels.specs))
        kernels = list(plan.resolved)
        for kernel in kernels:
            result.params[f"kernel_{kernel.layer}"] = kernel.identity
            result.tags[f"kernel_source_{kernel.layer}"] = kernel.source
            if kernel.source.startswith("hub:"):  # the user's opt-in to an organisation kernels does not trust
                trusted = plan.kernels.specs[kernel.layer].trust_remote_code
                result.tags[f"kernel_trust_remote_code_{kernel.layer}"] = str(trusted).lower()
            if kernel.note:
                result.tags[f"kernel_note_{kernel.layer}"] = kernel.note
        result.tags["attn_implementation"] = str(model.config._attn_implementation)
        result.tags["forward_path"] = work.forward_path(cfg)
        inputs = work.inputs(loaded.tokenizer, cfg, plan.device)

    status("reference forward")
    key = ReferenceKey(work.name, cfg.prompt.text, cfg.prompt.length, cfg.prompt.batch_size,
                       str(plan.reference_dtype), result.tags["forward_path"])
    with phases("reference"):
        reference = models.derived(key, lambda: work.reference(model, inputs, plan.reference_dtype, cfg))
    switch = None
    if kernels:
        status("kernelizing")
        with phases("kernelize"):
            switch = KernelSwitch.apply(model, kernels, plan.device, work.kernel_mode)
        for layer, count in switch.replaced.items():
            result.metrics[f"kernelized_{layer}"] = count
        result.metrics["kernelized_total"] = sum(switch.replaced.values())
        missing = [layer for layer, count in switch.replaced.items() if count == 0]
        if missing:
            raise JobConfigError(
                f"kernel requested but not applied for {', '.join(missing)}: kernelize kept the original forward "
                "(a layer without a compatible mode or device in its kernel repository)"
            )

    job = JobState(model, switch, inputs, reference, cfg, plan.device, plan.dtype, result, status, models, kernels)
    with work.running(model):
        with phases("numerics"):
            sides = work.sides(job)
            status("numerics")
            result.metrics |= work.compare(job, sides)
            status("checking every input set's outputs")
            _check_other_input_sets(job, sides)
        result.tags |= contention_tags(plan.device)
        _time(sides, switch, inputs, cfg, plan, result, status, phases)
        result.metrics |= _peak_memory(sides, switch, inputs, plan.device)
        if switch is not None and sides.kernel is not None and cfg.timing.ops:
            status("timing each kernelized layer alone")
            with phases("ops"):
                measure_ops(switch, partial(sides.baseline, inputs[0]), Mode.TRAINING in work.kernel_mode,
                            cfg.timing, TimingMode(result.tags["timing_mode_used"]), plan.device, cfg.seed, result)
    result.metrics |= work.timing_metrics(result.metrics, cfg)


def _check_other_input_sets(job: JobState, sides: Sides) -> None:
    """The workload's numerics checked input set 0's outputs; timing runs the other sets too."""
    for ids in job.inputs[1:]:
        check_baseline_finite(job, sides.baseline(ids), partial(sides.baseline, ids))
        if sides.kernel is not None and job.switch is not None:
            with job.switch.active():
                kernel = sides.kernel(ids)
            check_kernel_finite(job, kernel, partial(sides.kernel, ids))


def _runners(mode: TimingMode, sides: Sides, switch: KernelSwitch | None, inputs) -> dict[str, Runner]:
    """One runner per side. Each selects its side (kernels on or off) in its untimed `prepare` (eager) or
    before capture (graph): switching forwards is never inside a timed forward. The graph sides of a block
    share its memory pool and its random offset, so that where the block's buffers land cancels in the ratios."""
    with_kernel = switch is not None and sides.kernel is not None
    placement = GraphPlacement(sides=1 + with_kernel + len(sides.others))

    def make(side: str, forward: Forward, select: Select = lambda: None) -> Runner:
        if mode == TimingMode.graph:
            return GraphRunner(forward, inputs, select, placement, side=side)
        return EagerRunner(forward, inputs, select)

    if with_kernel:
        runners = {BASELINE: make(BASELINE, sides.baseline, lambda: switch.select(False)),
                   KERNEL: make(KERNEL, sides.kernel, lambda: switch.select(True))}
    else:
        runners = {BASELINE: make(BASELINE, sides.baseline)}
    for side in sides.others:
        runners[side.name] = make(side.name, side.forward, side.select)
    return runners


def _peak_memory(sides: Sides, switch: KernelSwitch | None, inputs, device: torch.device) -> dict[str, float]:
    """The baseline's and the kernel's step, each on its own after timing (`peak_memory_per_side`)."""
    runners = _runners(TimingMode.eager, sides, switch, inputs[:1])
    try:
        return peak_memory_per_side({side: runners[side] for side in (BASELINE, KERNEL) if side in runners}, device)
    finally:
        if switch is not None:
            switch.select(False)


def capture_impossible(error: Exception) -> bool:
    """Capture raised (a kernel that syncs or allocates on the host): the job is timed eagerly instead. Not a
    replay that computed something else (GraphCheckError: that side is broken), nor running out of memory or a
    lost CUDA context (the job's failure)."""
    return not isinstance(error, GraphCheckError) and classify(error) == FailureKind.error


def _comparisons(sides: Sides, runners: dict[str, Runner]) -> dict[str, tuple[str, str]]:
    """`speedup` (baseline / kernel) and the workload's own comparisons, among the sides that are timed."""
    wanted = {SPEEDUP: (BASELINE, KERNEL), **sides.comparisons}
    return {name: pair for name, pair in wanted.items() if set(pair) <= set(runners)}


def _time(sides: Sides, switch, inputs, cfg, plan: JobPlan, result: JobResult, status: StatusHook,
          phases: Phases) -> None:
    try:
        _time_modes(sides, switch, inputs, cfg, plan, result, status, phases)
    finally:
        if switch is not None:
            switch.select(False)


def _time_modes(sides: Sides, switch, inputs, cfg, plan: JobPlan, result: JobResult, status: StatusHook,
                phases: Phases) -> None:
    measured: dict[TimingMode, RoundsResult] = {}
    replay_errors: list[float] = []
    modes = list(plan.timing_modes)
    for mode in modes:
        status(f"timing ({mode.value})")
        try:
            with phases("capture" if mode == TimingMode.graph else "timing"):
                runners = _runners(mode, sides, switch, inputs)
        except Exception as error:
            if mode != TimingMode.graph or not capture_impossible(error):
                raise
            result.tags["timing_note"] = f"CUDA graph unusable, timed eagerly instead: {type(error).__name__}: {error}"
            if TimingMode.eager not in modes:
                modes.append(TimingMode.eager)
            continue

        def report(rounds: RoundsResult, mode: TimingMode = mode) -> None:
            status(f"timing ({mode.value}) round {rounds.rounds}")

        if mode == TimingMode.graph:
            replay_errors = [r.replay_error for r in runners.values() if isinstance(r, GraphRunner)]
        with phases("timing"):
            measured[mode] = timed_sides(runners, _comparisons(sides, runners), len(inputs), cfg.timing,
                                         plan.device, cfg.seed, report)
        del runners
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
    _timing_metrics(measured, result)
    result.metrics["timing_rerun_sd"], result.tags[RERUN_SD_SOURCE_TAG] = rerun_sd_used(cfg.timing)
    result.metrics["timing_confidence"] = cfg.timing.confidence
    result.tags[REPEAT_TAG] = repeat_hash(cfg)  # its repeats estimate rerun_sd (sweep/views/repeats.py)
    if replay_errors:
        result.metrics["graph_replay_rel_err"] = max(replay_errors)


def _timing_metrics(measured: dict[TimingMode, RoundsResult], result: JobResult) -> None:
    primary_mode = next(iter(measured))
    primary = measured[primary_mode]
    metrics = result.metrics
    metrics["timing_rounds"] = primary.rounds
    metrics["timing_blocks"] = len(set(primary.blocks))
    metrics["timing_reps"] = primary.reps
    metrics["timing_s"] = sum(r.seconds for r in measured.values())
    result.tags["timing_mode_used"] = primary_mode.value
    prefixes = {TimingMode.graph: "gpu_ms", TimingMode.eager: "eager_ms"}
    per_mode = len(measured) > 1 or primary_mode == TimingMode.graph
    for side, times in primary.ms.items():  # baseline, kernel and the workload's other sides (the compiled model)
        metrics[f"latency_ms_{side}"] = median(times)
        if per_mode:
            for mode, rounds in measured.items():
                metrics[f"{prefixes[mode]}_{side}"] = median(rounds.ms[side])
    if TimingMode.graph in measured and TimingMode.eager in measured:
        graph, eager = measured[TimingMode.graph], measured[TimingMode.eager]
        metrics["launch_overhead"] = median(eager.baseline_ms) / median(graph.baseline_ms)
    for name, estimate in primary.estimates.items():
        metrics[name] = estimate.speedup
        metrics[f"{name}_ci_low"] = estimate.low
        metrics[f"{name}_ci_high"] = estimate.high
        metrics[f"{name}_significant"] = float(estimate.significant)
