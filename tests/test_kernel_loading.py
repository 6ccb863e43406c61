"""Kernels are loaded for the device a job runs on, whatever torch was built for; a kernel that cannot run here
(no build for the device, a Python dependency missing) is a skipped job that says why and how to fix it."""

from __future__ import annotations

import pytest
import torch
from conftest import HUB_COMMIT, SHORT_PROMPT, local_kernel, offline_hub_job
from kernel_repos import EXACT_RMSNORM, write_kernel_repo

from sweep.measure import kernelization
from sweep.measure.kernelization import KernelRepository
from sweep.records.results import RunStatus
from sweep.run.job import run_job

MISSING_PACKAGE_KERNEL = "import not_installed_pkg_for_sweep_tests\n"


def _missing_dependency_repo(root, name="needs_pkg"):
    repo = write_kernel_repo(root, name, "ExactRMSNorm", EXACT_RMSNORM)
    init = repo / "build" / "torch-cpu" / "__init__.py"
    init.write_text(MISSING_PACKAGE_KERNEL + init.read_text())
    return repo


def test_a_cpu_build_is_found_under_either_torch_build(kernel_repos):
    """A CUDA build of torch makes `kernels` look for torch-cuda variants; sweep asks for the job's device."""
    layer = KernelRepository("ExactRMSNorm", path=kernel_repos["exact_rms"], backend="cpu").load()
    assert layer.__name__ == "ExactRMSNorm"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cpu_kernel_is_measured_on_the_cpu(make_config, models, kernel_repos):
    result = run_job(make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT,
                                 *local_kernel("RMSNorm", kernel_repos["exact_rms"], "ExactRMSNorm")), models)
    assert result.status == RunStatus.measured, result.reason
    assert result.tags["gpu_name"] == "cpu"
    assert result.metrics["kernelized_RMSNorm"] == 9


def test_local_kernel_with_a_missing_dependency_is_skipped(make_config, models, tmp_path):
    repo = _missing_dependency_repo(tmp_path)
    result = run_job(make_config("dtype=fp32", "kernels=none", *SHORT_PROMPT,
                                 *local_kernel("RMSNorm", repo, "ExactRMSNorm")), models)
    assert result.status == RunStatus.skipped
    assert "pip install not-installed-pkg-for-sweep-tests" in result.reason
    assert "not_installed_pkg_for_sweep_tests" in result.reason
    assert "traceback.txt" not in result.artifacts


def test_bundled_kernel_with_a_missing_dependency_is_skipped(make_config, models, tmp_path, monkeypatch):
    _missing_dependency_repo(tmp_path, "needs_pkg_bundled")
    monkeypatch.setattr(kernelization, "BUNDLED_DIR", tmp_path)
    cfg = make_config("dtype=fp32", "kernels=rms", "kernels.source=bundled",
                      "kernels.RMSNorm.bundled=needs_pkg_bundled", "kernels.RMSNorm.layer_name=ExactRMSNorm",
                      *SHORT_PROMPT)
    result = run_job(cfg, models)
    assert result.status == RunStatus.skipped
    assert result.tags["kernel_source_RMSNorm"] == "bundled:needs_pkg_bundled"
    assert "pip install not-installed-pkg-for-sweep-tests" in result.reason


def test_hub_kernel_with_a_missing_dependency_is_skipped(tmp_path):
    """Through `kernels`' Hub code path, from an offline Hub cache."""
    run = offline_hub_job(tmp_path, _missing_dependency_repo(tmp_path / "src"), "kernels.source=hub",
                          "kernels.RMSNorm.layer_name=ExactRMSNorm")
    assert run.data.tags["kernel_source_RMSNorm"] == f"hub:kernels-community/liger-kernels@{HUB_COMMIT}"
    assert run.data.tags["run_status"] == "skipped"
    assert "pip install not-installed-pkg-for-sweep-tests" in run.data.tags["status_reason"]
