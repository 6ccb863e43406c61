"""A sweep's start-up: seconds from process start to each milestone, logged on the parent run as `startup_s_*`;
the CUDA and Triton start-up and the first model's host draw run in the background while the store opens; what
start-up made is kept out of the garbage collector's way until the process exits."""

from __future__ import annotations

import atexit
import gc
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from sweep.measure.models import draws_on_host, host_float32_draw

_FIRST_IMPORT = time.monotonic()  # where /proc cannot say when the process started
_milestones: dict[str, float] = {}  # name -> seconds since process start
_durations: dict[str, float] = {}  # name -> seconds it took
_device_thread: threading.Thread | None = None
_startup_threads: list[threading.Thread] = []
_cuda_started = threading.Event()
_startup_frozen = False


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


def freeze_startup_objects() -> None:
    """Once per process, before its first job: moves every object start-up made (torch's, transformers' and MLflow's
    modules, the configurations, the store's client) where the garbage collector no longer scans them. Each job
    ends with a full collection; over half a million such objects made it take 0.25 to 0.35 s a job. The few
    hundred unreachable ones start-up leaves are frozen with them: cheaper than a full collection to find them.
    Later, never: a job's own objects must stay collectable. At exit they are unfrozen: the interpreter's last
    collections skip frozen objects, and those left alive outlive the extension modules that made them (Triton's
    nanobind module, from Triton 3.9, then prints a leak report after the sweep's own last line)."""
    global _startup_frozen
    if not _startup_frozen:
        gc.freeze()
        atexit.register(gc.unfreeze)
        _startup_frozen = True


def start_cuda_in_background() -> None:
    """Starts CUDA (driver, context, cuBLAS), then Triton's CUDA driver, in a thread, so that they overlap the work
    that does not need them (composing the jobs' configurations, opening the store). Only where exactly one CUDA
    device is visible: it is then the one every job leases; with several, a context on a device another process
    leases would show this process on it (`gpu_contended`). The first job waits for CUDA (`wait_for_cuda`)."""
    global _device_thread
    if _device_thread is None:
        _device_thread = _start_thread(_start_device, "sweep-device-startup")


def draw_model_in_background(model: DictConfig) -> None:
    """Draws a random-init model's float32 weights on the host (`models.host_float32_draw`) in a thread: torch
    fills them without holding the GIL, while this thread opens the store. The job that needs them waits for the
    draw; one that failed here is drawn again there, and reports its error."""
    if draws_on_host(model):
        _start_thread(_draw_quietly, "sweep-model-draw", model)


def _start_thread(target: Callable[..., None], name: str, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name)
    thread.start()
    _startup_threads.append(thread)
    return thread


def join_startup_threads() -> None:
    """Waits for the start-up threads: a sweep can end before any job waited for them (every job resumed, the store
    refused). The interpreter waits for them at exit too, but it ignores a Ctrl-C there, and a thread it then
    abandons inside torch aborts the process (`terminate called without an active exception`, exit 134)."""
    for thread in _startup_threads:
        thread.join()


def _draw_quietly(model: DictConfig) -> None:
    started = time.perf_counter()
    try:
        host_float32_draw(model)
    except Exception:  # noqa: BLE001  the job draws again and says why
        return
    record_duration("model_draw", time.perf_counter() - started)


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
