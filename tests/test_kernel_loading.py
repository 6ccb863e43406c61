"""Kernels are loaded for the device a job runs on, whatever torch was built for. A kernel that cannot run here (no
build for the device, a dependency it declares missing, a dtype the device lacks) is a skipped job that says why
and how to fix it; a kernel that is broken (its own import fails) is a failed job with its traceback."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import HUB_COMMIT, SHORT_PROMPT, local_kernel, offline_hub_job
from kernel_repos import EXACT_RMSNORM, write_kernel_repo

from sweep.measure import kernelization
from sweep.measure.kernelization import KernelRepository
from sweep.records.results import RunStatus
from sweep.run.job import _check_dtype_runs, run_job

# A dependency `kernels` knows (kernels/python_depends.json) and that the test environment does not install.
DECLARED_DEPENDENCY = "helion"
# Kernels whose own import raises, by what their module runs above the layer.
BROKEN_IMPORTS = {
    "syntax_error": "def broken(:\n    pass",
    "undeclared_module": "import not_installed_pkg_for_sweep_tests",
    "missing_name": "from torch import no_such_name_for_sweep_tests",
    "missing_data_file": "open('/nonexistent/sweep-test-kernel-data.bin')",
}


def _missing_dependency_repo(root, name="needs_pkg"):
    if importlib.util.find_spec(DECLARED_DEPENDENCY) is not None:
        pytest.skip(f"{DECLARED_DEPENDENCY} is installed here")
    return write_kernel_repo(root, name, "ExactRMSNorm", EXACT_RMSNORM, python_depends=(DECLARED_DEPENDENCY,))


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


def test_local_kernel_with_a_missing_declared_dependency_is_skipped(make_config, models, tmp_path):
    repo = _missing_dependency_repo(tmp_path)
    result = run_job(make_config("device=cpu", "dtype=fp32", "kernels=none", *SHORT_PROMPT,
                                 *local_kernel("RMSNorm", repo, "ExactRMSNorm")), models)
    assert result.status == RunStatus.skipped, result.reason
    assert f"pip install {DECLARED_DEPENDENCY}" in result.reason and str(repo) in result.reason
    assert "traceback.txt" not in result.artifacts


def test_bundled_kernel_with_a_missing_declared_dependency_is_skipped(make_config, models, tmp_path, monkeypatch):
    _missing_dependency_repo(tmp_path, "needs_pkg_bundled")
    monkeypatch.setattr(kernelization, "BUNDLED_DIR", tmp_path)
    cfg = make_config("device=cpu", "dtype=fp32", "kernels=rms", "kernels.source=bundled",
                      "kernels.RMSNorm.bundled=needs_pkg_bundled", "kernels.RMSNorm.layer_name=ExactRMSNorm",
                      *SHORT_PROMPT)
    result = run_job(cfg, models)
    assert result.status == RunStatus.skipped, result.reason
    assert result.tags["kernel_source_RMSNorm"] == "bundled:needs_pkg_bundled"
    assert f"pip install {DECLARED_DEPENDENCY}" in result.reason


def test_hub_kernel_with_a_missing_declared_dependency_is_skipped(tmp_path):
    """Through `kernels`' Hub code path, from an offline Hub cache."""
    run = offline_hub_job(tmp_path, _missing_dependency_repo(tmp_path / "src"), "device=cpu", "kernels.source=hub",
                          "kernels.RMSNorm.layer_name=ExactRMSNorm")
    assert run.data.tags["kernel_source_RMSNorm"] == f"hub:kernels-community/liger-kernels@{HUB_COMMIT}"
    assert run.data.tags["run_status"] == "skipped"
    assert f"pip install {DECLARED_DEPENDENCY}" in run.data.tags["status_reason"]


@pytest.mark.parametrize("broken", BROKEN_IMPORTS)
def test_a_kernel_whose_own_import_fails_is_failed_with_its_traceback(make_config, models, tmp_path, broken):
    repo = write_kernel_repo(tmp_path, broken, "ExactRMSNorm", EXACT_RMSNORM, module_source=BROKEN_IMPORTS[broken])
    result = run_job(make_config("device=cpu", "dtype=fp32", "kernels=none", *SHORT_PROMPT,
                                 *local_kernel("RMSNorm", repo, "ExactRMSNorm")), models)
    assert result.status == RunStatus.failed, result.reason  # the sweep's exit status is then 1
    assert result.tags["failure_phase"] == "kernelize" and result.tags["failure_kind"] == "error"
    assert str(repo / "build" / "torch-cpu" / "__init__.py") in result.artifacts["traceback.txt"]
    if broken in ("undeclared_module", "missing_name"):
        assert result.reason.startswith("KernelImportError") and "python-depends" in result.reason


def test_a_dtype_the_device_lacks_is_skipped(make_config, models):
    result = run_job(make_config("device=cpu", "dtype=fp32", "dtype.torch_dtype=float8_e4m3fn", "kernels=none",
                                 *SHORT_PROMPT), models)
    assert result.status == RunStatus.skipped, result.reason
    assert "not implemented for 'Float8_e4m3fn'" in result.reason


def test_a_dtype_probe_failing_for_another_reason_is_not_a_skip():
    """The meta device runs the probe's matmul but cannot give its value back: an error that is not the dtype's,
    so it fails the job (run_job's failure) rather than skip it."""
    with pytest.raises(RuntimeError, match="meta tensors"):
        _check_dtype_runs(torch.float32, torch.device("meta"))
