"""Typed structured configs, registered with Hydra's ConfigStore (by `run/registration.py`) so a typo fails at
start-up. Imports nothing of the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf


class DeviceChoice(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class TimingMode(str, Enum):
    auto = "auto"  # graph on CUDA, eager on CPU
    graph = "graph"
    eager = "eager"
    both = "both"  # graph is the headline number; eager is logged beside it

    def planned(self, device_type: str) -> tuple[TimingMode, ...]:
        """The modes a job on `device_type` times in; the first gives its latencies and speedups."""
        if self == TimingMode.auto:
            return (TimingMode.graph,) if device_type == "cuda" else (TimingMode.eager,)
        if self == TimingMode.both:
            return (TimingMode.graph, TimingMode.eager)
        return (self,)


class KernelSourceMode(str, Enum):
    auto = "auto"  # the Hub when reachable or cached, else the bundled copy
    hub = "hub"
    bundled = "bundled"


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory loaded with from_pretrained; None builds `architecture` with random weights.
    id: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    # "cpu" gives the same random weights on every machine; "device" is for models too big to init on the host.
    init_device: str = "cpu"
    tokenizer: str = "auto"  # auto | utf8 | hub
    attn_implementation: str = "sdpa"


@dataclass
class DtypeConfig:
    name: str = MISSING
    torch_dtype: str = MISSING  # attribute of torch, e.g. bfloat16
    reference: str = MISSING  # higher-precision dtype of the reference forward


@dataclass
class KernelSpec:
    """Where one transformers kernel layer (e.g. `RMSNorm`) gets its kernel from."""

    layer_name: str = MISSING  # the layer's name inside the kernel repository
    repo_id: str | None = None
    version: int | None = None
    revision: str | None = None
    bundled: str | None = None  # name of a kernel repository shipped in sweep/bundled
    path: str | None = None  # a local kernel repository; wins over repo_id and bundled
    # Load `repo_id` even if its organisation is not one the `kernels` library trusts: kernels run code.
    trust_remote_code: bool = False


@dataclass
class PromptConfig:
    text: str = "Hello world! "
    length: int = 118
    batch_size: int = 1


# 0.1%: an H100 with tiny-llama, where 20 jobs at 118 tokens scattered twice as much as their blocks.
DEFAULT_RERUN_SD = 0.001


@dataclass
class TimingConfig:
    mode: TimingMode = TimingMode.auto
    # Per job: seconds of timed work (both sides), spread evenly over the blocks; re-captures, checks and the
    # untimed lead-in of each measurement are not counted. At least one round per block whatever the budget.
    budget_s: float = 0.5
    blocks: int = 10  # fresh captures per side; the interval is Student's t over the blocks' means
    warmup: int = 3
    min_measure_ms: float = 2.0  # one measurement repeats the forward until it lasts about this long
    input_sets: int = 3  # rotated among so that caches do not flatter either side
    confidence: float = 0.95
    # Relative sd of a speedup from one job to the next that one job's blocks do not sample (the GPU's clock and
    # thermal state); added to every interval. null: the newest estimate the store holds for the job's GPU model
    # and workload (written by a sweep with `seed` repeats), else DEFAULT_RERUN_SD (docs/timing.md).
    rerun_sd: float | None = None
    # Set by the sweep with the estimate it takes from the store (tag timing_rerun_sd_source), not by hand.
    rerun_sd_source: str | None = None
    # Speed of light (docs/speed-of-light.md): each kernelized layer timed alone at the model's shapes, eager against
    # the kernel and against a device copy of its bytes, in the same blocks with this budget of timed work.
    ops: bool = True
    ops_budget_s: float = 0.2


def rerun_sd_used(timing: TimingConfig | DictConfig) -> tuple[float, str]:
    """The `rerun_sd` a job's intervals add, and where it came from (the tag `timing_rerun_sd_source`): the
    user's (`config`), the store's estimate the sweep set, or `default` when neither is set."""
    if timing.rerun_sd is None:
        return DEFAULT_RERUN_SD, "default"
    return timing.rerun_sd, timing.rerun_sd_source or "config"


@dataclass
class NumericsConfig:
    gen_tokens: int = 32
    per_layer: bool = True


@dataclass
class WorkloadConfig:
    """The `workload` group's common schema; each workload subclasses it beside its code (sweep/workloads)."""

    name: str = MISSING


class BaselineKind(str, Enum):
    eager = "eager"  # the kernels against the eager model
    compile = "compile"  # also the model under torch.compile, with and without the kernels


class UndeclaredKernels(str, Enum):
    skip = "skip"  # a kernel that does not declare can_torch_compile = True is not timed inside torch.compile
    compile = "compile"  # compiled anyway, with its inference forward; tagged (dynamo may break the graph at it)


@dataclass
class BaselineConfig:
    """What a kernel is measured against (sweep/compilation.py): the eager model, or also torch.compile's."""

    name: BaselineKind = BaselineKind.eager
    # torch.compile's arguments (compile only). `mode`: default, reduce-overhead, max-autotune,
    # max-autotune-no-cudagraphs; reduce-overhead and max-autotune use CUDA graphs of their own, which an
    # outer capture may not hold (where it fails, the job is timed eagerly and tagged).
    mode: str = "default"
    dynamic: bool | None = False  # False: shapes specialised (one compile per prompt length)
    fullgraph: bool = False  # True: a graph break fails the job instead of falling back to Python
    backend: str = "inductor"
    undeclared_kernels: UndeclaredKernels = UndeclaredKernels.skip


@dataclass
class ForwardConfig:
    """The forward that is timed and compared: by default the call users make, `model(input_ids=...)`."""

    # None: the model's own default (a KV cache is created, as `model(**inputs)` and `generate` do);
    # false/true pass use_cache explicitly. Attention may take another path without the cache.
    use_cache: bool | None = None


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "kernel-sweep"
    artifact_root: str = "runs/artifacts"  # only used when the experiment is created
    spool_dir: str = "runs/spool"  # results the store could not take wait here (python -m sweep.sync)
    # Bounded MLflow HTTP retries: one request waits at most (retries + 1) * timeout + backoff sleeps (32 s).
    http_max_retries: int = 2
    http_timeout_s: int = 10
    http_backoff_factor: int = 1


@dataclass
class LeaseConfig:
    """One GPU per job (sweep/lease.py): exclusive leases, file locks in `lock_dir` named after each device."""

    # How many devices to lease: null = every CUDA device this process sees. Without CUDA, this many stand-in
    # slots are leased instead (CPU jobs then never overlap either).
    devices: int | None = None
    lock_dir: str = "/tmp/sweep-gpu-locks"  # must be local to the host (flock), shared by all its jobs
    poll_s: float = 1.0  # how often a waiting job retries


@dataclass
class SweepConfig:
    model: ModelConfig = MISSING
    dtype: DtypeConfig = MISSING
    # Layer name -> KernelSpec, plus `name` (none, rms, ...) and `source`. Entries are validated by
    # `kernel_specs`; the node stays open so that any layer name transformers registers can be mapped.
    kernels: dict[str, Any] = MISSING
    workload: WorkloadConfig = MISSING  # prefill, decode or train
    baseline: BaselineConfig = field(default_factory=BaselineConfig)  # eager or compile
    prompt: PromptConfig = field(default_factory=PromptConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    # Skip a combination already measured with the same configuration, machine and code (sweep/resume.py).
    resume: bool = True
    device: DeviceChoice = DeviceChoice.auto
    seed: int = 0


@dataclass(frozen=True)
class KernelsSelection:
    name: str
    source: KernelSourceMode
    specs: dict[str, KernelSpec]


_RESERVED_KERNEL_KEYS = ("name", "source")


def kernel_selection(kernels: DictConfig | dict[str, Any]) -> KernelsSelection:
    """Validate the open `kernels` node: each layer entry must be a KernelSpec, `source` a KernelSourceMode."""
    node = OmegaConf.create(kernels) if isinstance(kernels, dict) else kernels
    source = node.get("source", KernelSourceMode.auto.value)
    try:
        source_mode = KernelSourceMode(str(source))
    except ValueError:
        valid = ", ".join(m.value for m in KernelSourceMode)
        raise ValueError(f"kernels.source={source!r} is not one of: {valid}") from None
    specs: dict[str, KernelSpec] = {}
    for layer, entry in node.items():
        if layer in _RESERVED_KERNEL_KEYS or entry is None:
            continue
        if not isinstance(entry, DictConfig):
            raise ValueError(f"kernels.{layer} must be a mapping of KernelSpec fields, got {entry!r}")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(KernelSpec), entry)
        except Exception as error:  # omegaconf raises several types; all mean a malformed entry
            fields = ", ".join(KernelSpec.__dataclass_fields__)
            raise ValueError(f"kernels.{layer}: {error}. Valid fields: {fields}") from None
        spec = OmegaConf.to_object(merged)
        assert isinstance(spec, KernelSpec)
        if spec.path is None and spec.repo_id is None and spec.bundled is None:
            raise ValueError(f"kernels.{layer} needs one of path, repo_id or bundled")
        specs[str(layer)] = spec
    return KernelsSelection(name=str(node.get("name", "custom")), source=source_mode, specs=specs)
