"""Every runtime dependency in pyproject.toml but torch has a wheel for linux aarch64 (a GB10: Grace CPU, Blackwell
GPU), so that `pip install -e .` there never builds one from source. Checked by downloading each for that platform,
without installing it. torch is left out: PyPI's aarch64 torch wheels are CUDA builds, checked on the machine.
Needs `packaging` (for the requirements and their environment markers) and network access to the package index."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64")
PYTHON_VERSION = "3.12"
# What the environment markers of pyproject.toml see on that machine.
TARGET_ENVIRONMENT = {
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
    "python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.0",
}
NOT_CHECKED = ("torch",)


def dependencies() -> list[Requirement]:
    """The runtime dependencies a linux aarch64 install gets, but torch."""
    required = [Requirement(text) for text in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    return [r for r in required if canonicalize_name(r.name) not in NOT_CHECKED
            and (r.marker is None or r.marker.evaluate(TARGET_ENVIRONMENT))]


def download_wheel(requirement: Requirement, into: Path) -> str:
    """The name of the wheel pip picks for the target, or pip's last words when there is none."""
    bare = Requirement(str(requirement))
    bare.marker = None  # evaluated for the target already; pip would evaluate it for this machine
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--only-binary=:all:", *platforms, "--python-version",
         PYTHON_VERSION, "--implementation", "cp", "--no-deps", "--quiet", "-d", str(into), str(bare)],
        capture_output=True, text=True)
    wheels = sorted(p.name for p in into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise LookupError((done.stderr.strip().splitlines() or ["pip found no wheel"])[-1])
    return wheels[0]


def main() -> int:
    missing = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, requirement in enumerate(dependencies()):
            try:
                print(f"ok       {requirement}: {download_wheel(requirement, Path(scratch) / str(index))}")
            except LookupError as error:
                print(f"NO WHEEL {requirement}: {error}")
                missing.append(str(requirement))
    if missing:
        print(f"no linux aarch64 wheel (cp{PYTHON_VERSION.replace('.', '')}, {' or '.join(PLATFORMS)}) for: "
              f"{', '.join(missing)}; a GB10 would build these from source: pin a version that has one, or drop it")
        return 1
    print(f"every dependency but {', '.join(NOT_CHECKED)} has a linux aarch64 wheel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
