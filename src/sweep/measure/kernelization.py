"""Kernel application: resolve each requested kernel, kernelize through `kernels`, verify what was replaced,
and switch the replaced forwards on and off so baseline and kernel run on the very same modules."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import MethodType, ModuleType

import torch
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import repo_folder_name
from kernels import (
    KernelizeFallback,
    Mode,
    get_kernel,
    get_local_kernel,
    kernelize,
    use_kernel_mapping,
)
from kernels import python_deps as kernels_python_deps
from kernels import resolver as kernels_resolver
from kernels._versions import (
    select_revision_or_version,  # the resolution LayerRepository itself uses
)

from sweep.config import KernelSourceMode, KernelSpec
from sweep.records.errors import JobConfigError, KernelImportError, SkipJob

try:  # the HTTP client of huggingface_hub: httpx2 since huggingface_hub 2, httpx before
    from httpx2 import RequestError as HubRequestError
except ImportError:
    from httpx import RequestError as HubRequestError

BUNDLED_DIR = Path(__file__).parents[1] / "bundled"


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
            if not _raised_in(error, kernels_resolver):  # e.g. by the kernel's own import: it is broken
                raise
            raise SkipJob(f"the kernel {self} has no build for {self.backend}: {str(error).splitlines()[0]}") from None
        except ImportError as error:
            if not _raised_in(error, kernels_python_deps):  # kernels checks declared dependencies before importing
                raise KernelImportError(
                    f"importing the kernel {self} failed: {type(error).__name__}: {error}; this is not a dependency "
                    "the kernel declares (\"python-depends\" in its build's metadata.json, which makes a machine "
                    "without it skip the kernel): fix the kernel's import, or install what it imports"
                ) from error
            raise SkipJob(f"the kernel {self} cannot run here: {error}") from None
        layer = getattr(getattr(kernel, "layers", None), self.layer_name, None)
        if layer is None:
            raise JobConfigError(f"the kernel {self} defines no layer {self.layer_name!r} in its `layers` namespace")
        return layer

    def __str__(self) -> str:
        where = self.path if self.path is not None else f"{self.repo_id}@{self.revision}"
        return f"{where} (layer {self.layer_name})"


def _raised_in(error: BaseException, module: ModuleType) -> bool:
    """Whether `module`'s own code raised `error` (its innermost frame), rather than code it ran, such as a
    kernel's import."""
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    return innermost is not None and innermost.tb_frame.f_globals is vars(module)


@dataclass(frozen=True)
class ResolvedKernel:
    layer: str  # transformers' kernel layer name, e.g. RMSNorm
    repository: KernelRepository
    source: str  # hub:<repo>@<revision>, bundled:<name> or local:<path>
    note: str = ""  # why `auto` did not take the Hub
    content_hash: str = ""  # of the files of a bundled or local kernel; a Hub revision names its own content

    @property
    def identity(self) -> str:
        """Which kernel ran: the Hub repository at its commit, or the source and a hash of the local files."""
        return f"{self.source}@{self.content_hash}" if self.content_hash else self.source


class HubUnreachable(Exception):
    """The Hub could not be asked (offline and the repository is not cached, network down, server error)."""


def resolve_kernel(layer: str, spec: KernelSpec, mode: KernelSourceMode) -> ResolvedKernel:
    if spec.path is not None:
        path = Path(spec.path).expanduser().resolve()
        check_kernel_directory(layer, path)
        repository = KernelRepository(spec.layer_name, path=path)
        return ResolvedKernel(layer, repository, f"local:{path}", content_hash=directory_hash(path))
    note = ""
    if spec.repo_id is not None and mode != KernelSourceMode.bundled:
        try:
            revision = _hub_revision(layer, spec)
        except HubUnreachable as error:
            if mode == KernelSourceMode.hub or spec.bundled is None:
                raise JobConfigError(
                    f"cannot reach the Hub for {spec.repo_id} (version={spec.version}, revision={spec.revision}): "
                    f"{error}. Use kernels.source=bundled or kernels.{layer}.path=/local/kernel-repo offline."
                ) from None
            note = f"Hub unavailable ({error}); using the bundled copy"
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
    repository = KernelRepository(spec.layer_name, path=path)
    return ResolvedKernel(layer, repository, f"bundled:{spec.bundled}", note, directory_hash(path))


def check_kernel_directory(layer: str, path: Path) -> None:
    """A kernel path must be a kernel repository: a directory with a `build/` of variants (torch-cpu, ...)."""
    if not path.is_dir():
        raise JobConfigError(f"kernels.{layer}.path={path} is not a directory")
    if not (path / "build").is_dir():
        raise JobConfigError(
            f"kernels.{layer}.path={path} has no build/ directory: a kernel repository holds "
            "build/torch-<backend>/ (e.g. build/torch-cuda/__init__.py); point the path at its root"
        )


def directory_hash(path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of every file's relative path and bytes (caches excluded)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _hub_revision(layer: str, spec: KernelSpec) -> str:
    """The commit to load. A version or revision that the Hub (or, offline, a cached copy of the repository)
    does not have is the user's error; only a Hub that cannot be asked raises HubUnreachable."""
    assert spec.repo_id is not None
    offline = bool(hub_constants.HF_HUB_OFFLINE)
    cached = _cached_snapshot_dir(spec.repo_id)
    if offline and cached is None:
        raise HubUnreachable("offline, and the repository is not in the Hugging Face cache")
    try:
        if spec.revision is not None and spec.version is None:
            return _check_revision(spec.repo_id, spec.revision, offline, cached)
        return select_revision_or_version(
            spec.repo_id, revision=spec.revision, version=spec.version, local_files_only=offline
        )
    except HubUnreachable:
        raise
    except Exception as error:
        if _is_unreachable(error):
            raise HubUnreachable(f"{type(error).__name__}: {error}") from None
        raise JobConfigError(
            f"kernels.{layer}: {spec.repo_id} has no version={spec.version} / revision={spec.revision}"
            f"{' in the local cache (offline)' if offline else ''}: {error}"
        ) from None


def _cached_snapshot_dir(repo_id: str) -> Path | None:
    cache = Path(os.environ.get("KERNELS_CACHE") or hub_constants.HF_HUB_CACHE)
    for repo_type in ("kernel", "model"):
        folder = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
        if folder.is_dir():
            return folder
    return None


def _check_revision(repo_id: str, revision: str, offline: bool, cached: Path | None) -> str:
    if offline:
        assert cached is not None
        ref = cached / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        if not (cached / "snapshots" / commit).is_dir():
            raise ValueError(f"revision {revision!r} is not in the local cache ({cached})")
        return commit
    return str(HfApi().repo_info(repo_id, revision=revision, repo_type="kernel").sha or revision)


def _is_unreachable(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError):
        response = error.response
        return response is None or response.status_code >= 500
    return isinstance(error, (ConnectionError, TimeoutError, HubRequestError))


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
    def apply(
        cls, model: torch.nn.Module, kernels: list[ResolvedKernel], device: torch.device, mode: Mode = Mode.INFERENCE
    ) -> KernelSwitch:
        repositories = {k.layer: replace(k.repository, backend=device.type) for k in kernels}
        for repository in repositories.values():
            layer = repository.load()  # a missing build or dependency is this job's skip reason, before kernelize
            if Mode.TRAINING in mode and not getattr(layer, "has_backward", True):
                # kernelize would silently keep the original forward for training (its own default is True too)
                raise SkipJob(f"the kernel {repository} declares no backward (has_backward = False), so kernelize "
                              "does not use it for training; measure it with workload=prefill or workload=decode")
        mapping = {layer: {device.type: repository} for layer, repository in repositories.items()}
        try:
            with use_kernel_mapping(mapping, inherit_mapping=False), _quiet("kernels.layer.layer"):
                kernelize(model, mode=mode, device=device.type, use_fallback=KernelizeFallback.DEFAULT)
        finally:
            forwards = _detach_forwards(model)
        return cls(forwards, [k.layer for k in kernels])

    @property
    def modules(self) -> list[torch.nn.Module]:
        return list(self._forwards)

    def select(self, enabled: bool) -> None:
        """Switch the kernels on or off until the next call; idempotent. Timing calls it outside the timed
        region, so that neither side pays for switching."""
        for module, forward in self._forwards.items():
            if enabled:
                module.forward = forward
            else:
                module.__dict__.pop("forward", None)

    @contextmanager
    def active(self, enabled: bool = True) -> Iterator[None]:
        if not enabled:
            yield
            return
        self.select(True)
        try:
            yield
        finally:
            self.select(False)


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
