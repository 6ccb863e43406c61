from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).parent))

from kernel_repos import (  # noqa: E402
    EXACT_RMSNORM,
    EXACT_SILU,
    INF_RMSNORM,
    LOW_PRECISION_RMSNORM,
    NAN_RMSNORM,
    RMSNORM_FUNCTION_CALL,
    ROUNDED_SILU,
    rmsnorm_function,
    write_kernel_repo,
)

from sweep.__main__ import CONFIG_DIR  # noqa: E402
from sweep.measure.models import ModelCache  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHORT_PROMPT = ["prompt.length=40", "timing=quick", "numerics.gen_tokens=8"]

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker, and each sweep it starts, computes on one thread: with a worker per core, torch's default of a
    # thread per core would spin threads against each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core, but one alone where CUDA is, since GPU tests time
    kernels and a second worker would share the GPU with them."""
    return 1 if torch.cuda.is_available() else os.cpu_count() or 1


@pytest.fixture(scope="session")
def kernel_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kernel-repos")
    return {
        "exact_rms": write_kernel_repo(root, "exact_rms", "ExactRMSNorm", EXACT_RMSNORM),
        "low_rms": write_kernel_repo(root, "low_rms", "LowRMSNorm", LOW_PRECISION_RMSNORM),
        "exact_silu": write_kernel_repo(root, "exact_silu", "ExactSilu", EXACT_SILU, argument="input"),
        "rounded_silu": write_kernel_repo(root, "rounded_silu", "RoundedSilu", ROUNDED_SILU, argument="input"),
        "nan_rms": write_kernel_repo(root, "nan_rms", "NanRMSNorm", NAN_RMSNORM),
        "inf_rms": write_kernel_repo(root, "inf_rms", "InfRMSNorm", INF_RMSNORM),
        "cuda_only": write_kernel_repo(root, "cuda_only", "ExactRMSNorm", EXACT_RMSNORM, variant="torch-cuda"),
        "forward_only_rms": write_kernel_repo(root, "forward_only_rms", "ForwardOnlyRMSNorm", EXACT_RMSNORM,
                                              has_backward=False),
        "in_place_rms": write_kernel_repo(root, "in_place_rms", "InPlaceRMSNorm", RMSNORM_FUNCTION_CALL,
                                          module_source=rmsnorm_function(dx_into_upstream=True)),
        "wrong_weight_grad_rms": write_kernel_repo(root, "wrong_weight_grad_rms", "WrongWeightGradRMSNorm",
                                                   RMSNORM_FUNCTION_CALL,
                                                   module_source=rmsnorm_function(weight_grad_scale=2.0)),
    }


@pytest.fixture(scope="session")
def cpu_kernel_configs(tmp_path_factory: pytest.TempPathFactory, kernel_repos: dict[str, Path]) -> Path:
    """A config dir adding kernels choices that run on the CPU: rms_cpu (different arithmetic),
    silu_cpu (exact) and both_cpu, for the command line through `--config-dir`."""
    root = tmp_path_factory.mktemp("conf")
    (root / "kernels").mkdir()
    rms = f"RMSNorm: {{layer_name: LowRMSNorm, path: {kernel_repos['low_rms']}}}\n"
    silu = f"SiLU: {{layer_name: ExactSilu, path: {kernel_repos['exact_silu']}}}\n"
    (root / "kernels" / "rms_cpu.yaml").write_text("name: rms_cpu\n" + rms)
    (root / "kernels" / "silu_cpu.yaml").write_text("name: silu_cpu\n" + silu)
    (root / "kernels" / "both_cpu.yaml").write_text("name: both_cpu\n" + rms + silu)
    return root


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose("config", overrides=[f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                                f"tracking.artifact_root={tmp_path}/artifacts", *overrides])

    return make


@pytest.fixture(scope="session")
def models() -> ModelCache:
    """Shared across tests like across the jobs of a sweep: the tiny model is built once per dtype."""
    return ModelCache()


def load_bundled_silu() -> Callable[[torch.Tensor], torch.Tensor]:
    """The bundled Triton SiLU's `silu` function, imported from its build directory."""
    path = REPO_ROOT / "src/sweep/bundled/triton_silu/build/torch-cuda/__init__.py"
    spec = importlib.util.spec_from_file_location("bundled_triton_silu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.silu


def local_kernel(layer: str, path: Path, layer_name: str) -> list[str]:
    return [f"+kernels.{layer}={{path: {path}, layer_name: {layer_name}}}"]


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_hub_kernel(hub: Path, repo_id: str, kernel_dir: Path, ref: str) -> None:
    """`kernel_dir` as `repo_id` at commit HUB_COMMIT, tagged `ref`, in the Hugging Face cache folder `hub`."""
    from huggingface_hub.file_download import repo_folder_name

    repo = hub / repo_folder_name(repo_id=repo_id, repo_type="kernel")
    shutil.copytree(kernel_dir, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(HUB_COMMIT)


def offline_hub_job(tmp_path: Path, kernel_dir: Path, *overrides: str):
    """One `python -m sweep` job with `kernels=rms` whose kernel `kernels` resolves from an offline Hub cache that
    holds `kernel_dir` as kernels-community/liger-kernels version 3; returns that job's MLflow run."""
    from mlflow.tracking import MlflowClient

    cache_hub_kernel(tmp_path / "hub", "kernels-community/liger-kernels", kernel_dir, "v3")
    command = [sys.executable, "-m", "sweep", "kernels=rms", "dtype=fp32", *SHORT_PROMPT, *overrides,
               f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_root={tmp_path}/art",
               f"hydra.run.dir={tmp_path}/hydra"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    experiment = client.get_experiment_by_name("kernel-sweep")
    [run] = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'job'")
    return run
