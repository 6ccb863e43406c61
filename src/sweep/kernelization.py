"""Kernel application: resolve each requested kernel, kernelize through `kernels`, verify what was replaced,
and switch the replaced forwards on and off so baseline and kernel run on the very same modules."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import MethodType

import torch
from huggingface_hub import constants as hub_constants
from kernels import (
    KernelizeFallback,
    Mode,
    get_kernel,
    get_local_kernel,
    kernelize,
    use_kernel_mapping,
)
from kernels._versions import (
    select_revision_or_version,  # the resolution LayerRepository itself uses
)

from .config import KernelSourceMode, KernelSpec
from .errors import JobConfigError, SkipJob

BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclass(frozen=True)
class KernelRepository:
    """A layer in a kernel repository (local directory or Hub revision), loaded for the job's device.

    `kernels`' own repository classes pick the build variant from how torch was built, so a CUDA build of torch
    on a machine without a GPU looks for `torch-cuda` builds; this one asks `kernels` for the `backend` of the
    device the job runs on (`cpu`, or the backend torch was built for).
    """

    layer_name: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    backend: str | None = None
    trust_remote_code: bool = False  # the user's opt-in to a Hub organisation that `kernels` does not trust

    @cache
    def load(self) -> type[torch.nn.Module]:
        try:
            if self.path is not None:
                kernel = get_local_kernel(self.path, backend=self.backend)
            else:
                kernel = get_kernel(self.repo_id, revision=self.revision, backend=self.backend,
                                    trust_remote_code=self.trust_remote_code)
        except FileNotFoundError as error:
            raise SkipJob(f"the kernel {self} has no build for {self.backend}: {str(error).splitlines()[0]}") from None
        except ImportError as error:
            raise SkipJob(_missing_dependency(self, error)) from None
        layer = getattr(getattr(kernel, "layers", None), self.layer_name, None)
        if layer is None:
            raise JobConfigError(f"the kernel {self} defines no layer {self.layer_name!r} in its `layers` namespace")
        return layer

    def __str__(self) -> str:
        where = self.path if self.path is not None else f"{self.repo_id}@{self.revision}"
        return f"{where} (layer {self.layer_name})"


def _missing_dependency(repository: KernelRepository, error: ImportError) -> str:
    """A kernel whose Python dependency is absent cannot run here: name the package and how to install it."""
    module = getattr(error, "name", None)
    if isinstance(error, ModuleNotFoundError) and module:
        package = module.split(".")[0].replace("_", "-")
        return (f"the kernel {repository} needs the Python package {package!r} (module {module!r}), which is not "
                f"installed: pip install {package}")
    return f"the kernel {repository} cannot be imported: {error}"


@dataclass(frozen=True)
class ResolvedKernel:
    layer: str  # transformers' kernel layer name, e.g. RMSNorm
    repository: KernelRepository
    source: str  # hub:<repo>@<revision>, bundled:<name> or local:<path>
    note: str = ""  # why `auto` did not take the Hub


def resolve_kernel(layer: str, spec: KernelSpec, mode: KernelSourceMode) -> ResolvedKernel:
    if spec.path is not None:
        path = Path(spec.path).expanduser().resolve()
        return ResolvedKernel(layer, KernelRepository(spec.layer_name, path=path), f"local:{path}")
    note = ""
    if spec.repo_id is not None and mode != KernelSourceMode.bundled:
        try:
            revision = select_revision_or_version(
                spec.repo_id, revision=spec.revision, version=spec.version,
                local_files_only=hub_constants.HF_HUB_OFFLINE,
            )
        except Exception as error:  # network errors, offline cache misses, unknown versions
            if mode == KernelSourceMode.hub or spec.bundled is None:
                raise JobConfigError(
                    f"cannot resolve {spec.repo_id} (version={spec.version}, revision={spec.revision}) on the Hub: "
                    f"{error}. Use kernels.source=bundled or kernels.{layer}.path=/local/kernel-repo offline."
                ) from None
            note = f"Hub unavailable ({type(error).__name__}); using the bundled copy"
        else:
            # kernels refuses, when it loads, a repository whose organisation it does not trust, unless opted in.
            repository = KernelRepository(spec.layer_name, repo_id=spec.repo_id, revision=revision,
                                          trust_remote_code=spec.trust_remote_code)
            return ResolvedKernel(layer, repository, f"hub:{spec.repo_id}@{revision}")
    if spec.bundled is None:
        raise JobConfigError(f"kernels.{layer} has no bundled copy; set kernels.source=hub or a path")
    path = BUNDLED_DIR / spec.bundled
    if not path.is_dir():
        available = ", ".join(sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "build").is_dir()))
        raise JobConfigError(f"no bundled kernel {spec.bundled!r}; bundled kernels: {available}")
    return ResolvedKernel(layer, KernelRepository(spec.layer_name, path=path), f"bundled:{spec.bundled}", note)


def kernel_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module `kernelize` may touch: layers transformers decorated and the functions they carry."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if hasattr(type(module), "kernel_layer_name"):
            found.setdefault(id(module), module)
        for func in getattr(module, "_kernel_funcs", {}).values():
            found.setdefault(id(func), func)
    return list(found.values())


def layer_name(module: torch.nn.Module) -> str:
    return str(type(module).kernel_layer_name)


def check_layers_exist(model: torch.nn.Module, layers: list[str]) -> None:
    available = Counter(layer_name(m) for m in kernel_layers(model))
    if not available:
        import kernels
        import transformers

        raise JobConfigError(
            f"transformers {transformers.__version__} marked no layer of this model for kernels: it only does so "
            f"when the installed kernels ({kernels.__version__}) is inside the version window it accepts. "
            "Install the versions pinned in pyproject.toml."
        )
    missing = [layer for layer in layers if layer not in available]
    if missing:
        listing = ", ".join(f"{name} ({count})" for name, count in sorted(available.items()))
        raise JobConfigError(f"kernel layer(s) {', '.join(missing)} not in this model; its kernel layers: {listing}")


class KernelSwitch:
    """The forwards `kernelize` installed, detached from the modules and switched in only inside `active()`."""

    def __init__(self, forwards: dict[torch.nn.Module, MethodType], requested: list[str]):
        self._forwards = forwards
        counts = Counter(layer_name(m) for m in forwards)
        self.replaced = {layer: counts.get(layer, 0) for layer in requested}

    @classmethod
    def apply(cls, model: torch.nn.Module, kernels: list[ResolvedKernel], device: torch.device) -> KernelSwitch:
        repositories = {k.layer: replace(k.repository, backend=device.type) for k in kernels}
        for repository in repositories.values():
            repository.load()  # a missing build or dependency is this job's skip reason, before kernelize
        mapping = {layer: {device.type: repository} for layer, repository in repositories.items()}
        try:
            with use_kernel_mapping(mapping, inherit_mapping=False), _quiet("kernels.layer.layer"):
                kernelize(model, mode=Mode.INFERENCE, device=device.type, use_fallback=KernelizeFallback.DEFAULT)
        finally:
            forwards = _detach_forwards(model)
        return cls(forwards, [k.layer for k in kernels])

    @property
    def modules(self) -> list[torch.nn.Module]:
        return list(self._forwards)

    @contextmanager
    def active(self, enabled: bool = True) -> Iterator[None]:
        if not enabled:
            yield
            return
        for module, forward in self._forwards.items():
            module.forward = forward
        try:
            yield
        finally:
            for module in self._forwards:
                del module.forward


def _detach_forwards(model: torch.nn.Module) -> dict[torch.nn.Module, MethodType]:
    """Remove every instance forward kernelize set; keep those that differ from the class's own forward."""
    replaced = {}
    for module in kernel_layers(model):
        forward = module.__dict__.pop("forward", None)
        if forward is not None and getattr(forward, "__func__", None) is not type(module).forward:
            replaced[module] = forward
    return replaced


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """kernelize warns once per unmapped module; the replaced counts say the same thing once."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
