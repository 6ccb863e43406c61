"""One GPU per job: an exclusive lease on one device, a file lock held for the job's whole life."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sweep.config import LeaseConfig


@dataclass(frozen=True)
class Device:
    index: int  # torch's index among the devices this process sees
    uuid: str  # the physical device; its lock is named after it, so every process that sees it agrees

    @property
    def tags(self) -> dict[str, str]:
        return {"gpu_index": str(self.index), "gpu_uuid": self.uuid}


def leasable_devices(cfg: LeaseConfig) -> list[Device]:
    """The CUDA devices this process sees (the first `cfg.devices` of them when set). Without CUDA,
    `cfg.devices` stand-in slots `slot-<i>`: CPU jobs then take the same exclusive leases (the tests do)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        return [Device(i, f"slot-{i}") for i in range(cfg.devices or 0)]
    count = visible if cfg.devices is None else min(cfg.devices, visible)
    return [Device(i, str(torch.cuda.get_device_properties(i).uuid)) for i in range(count)]


def worker_count(devices: int | None) -> int:
    """How many local workers a sweep runs at once: one per leasable device, at least one."""
    if devices is not None:
        return max(1, devices)
    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)


# This process's home device and the handle of its home lock, held until the process ends (see `_own_devices`).
_home: tuple[Device, int] | None = None


@contextmanager
def gpu_lease(cfg: LeaseConfig, waiting: Callable[[str], None]) -> Iterator[Device | None]:
    """Holds one device exclusively until the block ends; waits while every device this process may use (its
    home device once it has one, see `_own_devices`) is leased. None when there is nothing to lease (a CPU
    machine with `lease.devices` unset). The operating system drops the lock when the process ends in any way,
    `kill -9` included."""
    devices = leasable_devices(cfg)
    if not devices:
        yield None
        return
    lock_dir = Path(cfg.lock_dir).expanduser()
    lock_dir.mkdir(parents=True, exist_ok=True)
    devices = _own_devices(lock_dir, devices)
    said = False
    while True:
        for device in devices:
            handle = _try_lock(lock_dir / f"{device.uuid}.lock")
            if handle is not None:
                break
        else:
            if not said:
                what = f"all {len(devices)} devices" if len(devices) > 1 else f"device {devices[0].index}"
                waiting(f"{what} leased ({_holders(lock_dir, devices)}), waiting")
                said = True
            time.sleep(cfg.poll_s)
            continue
        break
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(device.index)
        yield device
    finally:
        os.close(handle)


def _own_devices(lock_dir: Path, devices: list[Device]) -> list[Device]:
    """The devices this process may lease: only its home device once it has one. A process claims as its home
    the first device that no other live process has claimed (`<uuid>.home`, locked until the process ends). With
    as many workers as devices, each worker thus keeps one GPU for its life: one CUDA context, its model cache on
    that device, and no context of its own left on another worker's GPU, which the other's contention check
    would count. A process beyond one per device has no home and leases whichever device is free."""
    global _home
    if _home is None:
        for device in devices:
            handle = _try_lock(lock_dir / f"{device.uuid}.home")
            if handle is not None:
                _home = device, handle
                break
    if _home is not None and _home[0] in devices:
        return [_home[0]]
    return devices


def _try_lock(path: Path) -> int | None:
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        return None
    os.ftruncate(handle, 0)
    os.write(handle, f"{os.getpid()}\n".encode())  # who holds it, for the waiting message
    return handle


def _holders(lock_dir: Path, devices: list[Device]) -> str:
    def holder(device: Device) -> str:
        try:
            return (lock_dir / f"{device.uuid}.lock").read_text().strip() or "?"
        except OSError:
            return "?"

    return ", ".join(f"{d.index}: pid {holder(d)}" for d in devices)


def contention_tags(device: torch.device) -> dict[str, str]:
    """`gpu_contended`: whether other processes run on this job's GPU (their timings would be suspect).
    "unknown" when nvidia-smi is missing or cannot see this process (another PID namespace, e.g. a container),
    since it cannot then see the others either."""
    if device.type != "cuda":
        return {}
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return {"gpu_contended": "unknown", "gpu_contention_note": f"nvidia-smi unavailable: {error}"[:500]}
    on_device = {}
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3 and fields[0].removeprefix("GPU-") == uuid.removeprefix("GPU-") and fields[1].isdigit():
            on_device[int(fields[1])] = fields[2]
    if os.getpid() not in on_device:
        return {"gpu_contended": "unknown",
                "gpu_contention_note": "nvidia-smi does not list this process (another PID namespace?)"}
    others = {pid: mib for pid, mib in on_device.items() if pid != os.getpid()}
    tags = {"gpu_contended": str(bool(others)).lower()}
    if others:
        tags["gpu_other_processes"] = ", ".join(f"pid {pid} ({mib} MiB)" for pid, mib in sorted(others.items()))
    return tags
