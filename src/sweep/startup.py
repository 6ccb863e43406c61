"""A sweep's start-up: seconds from process start to each milestone, logged on the parent run as `startup_s_*`,
and the CUDA and Triton start-up run in the background while the store opens."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

_FIRST_IMPORT = time.monotonic()  # where /proc cannot say when the process started
_milestones: dict[str, float] = {}  # name -> seconds since process start
_durations: dict[str, float] = {}  # name -> seconds it took
_device_thread: threading.Thread | None = None
_cuda_started = threading.Event()


def since_process_start() -> float:
    """Seconds since this process started: from /proc on Linux (its start time, in clock ticks since boot),
    elsewhere since sweep's first import."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime; field 3 is index 0
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _FIRST_IMPORT


def milestone(name: str) -> None:
    """Records when `name` was first reached, in seconds since process start (`startup_s_<name>`)."""
    _milestones.setdefault(name, since_process_start())


def record_duration(name: str, seconds: float) -> None:
    """Records how long a start-up step took (`startup_s_<name>`)."""
    _durations.setdefault(name, seconds)


def startup_metrics() -> dict[str, float]:
    """What was recorded so far, as parent-run metrics."""
    return {f"startup_s_{name}": seconds for name, seconds in (_durations | _milestones).items()}


def start_cuda_in_background() -> None:
    """Starts CUDA (driver, context, cuBLAS), then Triton's CUDA driver, in a thread, so that they overlap the work
    that does not need them (composing the jobs' configurations, opening the store). Only where exactly one CUDA
    device is visible: it is then the one every job leases; with several, a context on a device another process
    leases would show this process on it (`gpu_contended`). The first job waits for CUDA (`wait_for_cuda`)."""
    global _device_thread
    if _device_thread is None:
        _device_thread = threading.Thread(target=_start_device, name="sweep-device-startup", daemon=True)
        _device_thread.start()


def wait_for_cuda() -> None:
    if _device_thread is not None:
        _cuda_started.wait()


def _start_device() -> None:
    started = time.perf_counter()
    try:
        if torch.cuda.device_count() != 1:
            return
        probe = torch.ones(8, 8, device="cuda")
        (probe @ probe).sum().item()  # loads cuBLAS and creates its handle, which the jobs' thread then reuses
    except RuntimeError:
        return  # a device that cannot start: the first job reports it
    finally:
        _cuda_started.set()
    record_duration("cuda", time.perf_counter() - started)
    started = time.perf_counter()
    try:
        import triton

        triton.runtime.driver.active.utils  # noqa: B018  builds Triton's CUDA helpers (a C compiler's work on a cold cache)
    except Exception:  # noqa: BLE001  no Triton, or one that cannot start: the first Triton kernel says why
        return
    record_duration("triton", time.perf_counter() - started)
