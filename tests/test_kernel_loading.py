"""Kernels are loaded for the device a job runs on, whatever torch was built for; a kernel that cannot run here
(no build for the device, a Python dependency missing) is a skipped job that says why and how to fix it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, SHORT_PROMPT, local_kernel
from huggingface_hub.file_download import repo_folder_name
from kernel_repos import EXACT_RMSNORM, write_kernel_repo
from mlflow.tracking import MlflowClient

from sweep import kernelization
from sweep.job import run_job
from sweep.kernelization import KernelRepository
from sweep.results import RunStatus

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
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
    cfg = make_config("dtype=fp32", "kernels=rms", "kernels.source=bundled", "kernels.RMSNorm.bundled=needs_pkg_bundled",
                      "kernels.RMSNorm.layer_name=ExactRMSNorm", *SHORT_PROMPT)
    result = run_job(cfg, models)
    assert result.status == RunStatus.skipped
    assert result.tags["kernel_source_RMSNorm"] == "bundled:needs_pkg_bundled"
    assert "pip install not-installed-pkg-for-sweep-tests" in result.reason


def test_hub_kernel_with_a_missing_dependency_is_skipped(tmp_path):
    """Through `kernels`' Hub code path, from an offline Hub cache."""
    repo = tmp_path / "hub" / repo_folder_name(repo_id="kernels-community/liger-kernels", repo_type="kernel")
    shutil.copytree(_missing_dependency_repo(tmp_path / "src"), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "v3").write_text(COMMIT)
    command = [sys.executable, "-m", "sweep", "kernels=rms", "kernels.source=hub",
               "kernels.RMSNorm.layer_name=ExactRMSNorm", "dtype=fp32", *SHORT_PROMPT,
               f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_root={tmp_path}/art",
               f"hydra.run.dir={tmp_path}/hydra"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    experiment = client.get_experiment_by_name("kernel-sweep")
    [run] = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'job'")
    assert run.data.tags["kernel_source_RMSNorm"] == f"hub:kernels-community/liger-kernels@{COMMIT}"
    assert run.data.tags["run_status"] == "skipped"
    assert "pip install not-installed-pkg-for-sweep-tests" in run.data.tags["status_reason"]
