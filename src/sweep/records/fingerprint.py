"""Where a run was made: hardware and software tags, so runs from different machines are never mixed up."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import socket
import subprocess
from functools import cache
from pathlib import Path

import torch

from sweep import __version__


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    repo = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


@cache
def code_version() -> str:
    """sweep's version and git commit, plus a hash of uncommitted changes to tracked files when there are any."""
    version = f"{__version__}+{_git('rev-parse', 'HEAD') or 'unknown'}"
    changes = _git("diff", "HEAD")
    return f"{version}.dirty-{hashlib.sha256(changes.encode()).hexdigest()[:12]}" if changes else version


def gpu_memory_is_integrated(device: torch.device) -> bool:
    """The GPU has no memory of its own: it uses the system's, shared with the CPU (a GB10, a Jetson). CUDA's
    `integrated` device property."""
    return device.type == "cuda" and bool(torch.cuda.get_device_properties(device).is_integrated)


@cache
def fingerprint(device: torch.device) -> dict[str, str]:
    tags = {
        "torch_version": torch.__version__,
        "transformers_version": _package_version("transformers"),
        "kernels_version": _package_version("kernels"),
        "triton_version": _package_version("triton"),
        "liger_kernel_version": _package_version("liger-kernel"),
        "sweep_version": __version__,
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "cpu_model": _cpu_model(),
        "cpu_arch": platform.machine(),
        "host": socket.gethostname(),
        "cuda_version": str(torch.version.cuda),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        tags |= {
            "gpu_name": props.name,
            "device_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gb": f"{props.total_memory / 2**30:.1f}",
            "gpu_memory_integrated": str(gpu_memory_is_integrated(device)).lower(),
            "sm_count": str(props.multi_processor_count),
            "driver_version": _driver_version(),
        }
    else:
        tags |= {"gpu_name": "cpu", "device_capability": "none", "gpu_memory_integrated": ""}
    return tags
