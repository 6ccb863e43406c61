"""How a job failed, and what that means for the jobs after it: out of memory (what was needed, what was
free), a sticky CUDA error that poisons the process, or any other exception."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import torch


class FailureKind(str, Enum):
    """Tag `failure_kind` of a failed run."""

    out_of_memory = "out_of_memory"
    cuda_context_lost = "cuda_context_lost"  # this job's sticky CUDA error, or one of an earlier job
    error = "error"


# Errors after which the CUDA context stays broken: every later CUDA call in the process fails or lies.
STICKY_CUDA_MARKERS = (
    "device-side assert triggered", "illegal memory access", "cudaErrorIllegalAddress", "cudaErrorLaunchFailure",
    "unspecified launch failure", "cudaErrorAssert", "illegal instruction", "misaligned address",
    "cudaErrorMisalignedAddress", "CUDA error: an illegal",
)
_TRIED = re.compile(r"Tried to allocate (\d+(?:\.\d+)? [KMGT]?i?B)")
_CPU_TRIED = re.compile(r"you tried to allocate (\d+) bytes")
_FREE = re.compile(r"of which (\d+(?:\.\d+)? [KMGT]?i?B) is free")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or bool(_CPU_TRIED.search(str(error)))


def is_sticky_cuda_error(error: BaseException) -> bool:
    text = str(error).lower()
    return any(marker.lower() in text for marker in STICKY_CUDA_MARKERS)


def classify(error: BaseException) -> FailureKind:
    if is_sticky_cuda_error(error):
        return FailureKind.cuda_context_lost
    if is_out_of_memory(error):
        return FailureKind.out_of_memory
    return FailureKind.error


# Where the GPU's memory is the system's (`gpu_memory_is_integrated`: a GB10), CUDA is not the only one to run out.
INTEGRATED_MEMORY_NOTE = (
    "; this GPU's memory is the system memory, shared with the CPU: the host's processes and page cache use it too, "
    "and where the system runs out first the operating system's OOM killer ends a process without any CUDA error "
    "(see `dmesg`)")


def out_of_memory_reason(error: BaseException, phase: str, device: torch.device, integrated_memory: bool) -> str:
    """`out of GPU memory in timing: needed 2.00 GiB, free 1.12 GiB of 79.19 GiB`, from torch's message and the
    device; on the CPU, the host's available memory. `integrated_memory`: add INTEGRATED_MEMORY_NOTE."""
    text = str(error)
    where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "host"
    needed = _TRIED.search(text)
    cpu_needed = _CPU_TRIED.search(text)
    if needed:
        needed_text = needed.group(1)
    elif cpu_needed:
        needed_text = f"{int(cpu_needed.group(1)) / 2**30:.2f} GiB"
    else:
        needed_text = "unknown (torch did not say)"
    note = INTEGRATED_MEMORY_NOTE if integrated_memory else ""
    return f"out of {where} memory in {phase}: needed {needed_text}, free {_free_memory(text, device)}{note}"


def _free_memory(text: str, device: torch.device) -> str:
    reported = _FREE.search(text)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        now = f"{free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB now"
        return f"{reported.group(1)} at the failed allocation, {now}" if reported else now
    available = _host_available_bytes()
    host = f"{available / 2**30:.2f} GiB host memory available" if available is not None else "unknown"
    return f"{reported.group(1)} ({host})" if reported else f"{host} (no GPU: {device.type})"


def _host_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
