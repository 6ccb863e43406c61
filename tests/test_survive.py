"""A sweep that survives: out of memory, kernels that raise, sticky CUDA errors, a tracking server that goes away
(a real `mlflow server` on 127.0.0.1, stopped and restarted), bad input refused at start-up, and no secret in
what is logged. On the CPU, with kernel repositories written by the tests."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, cache_hub_kernel, local_kernel
from kernel_repos import EXACT_RMSNORM, failing_rmsnorm, write_kernel_repo
from mlflow.tracking import MlflowClient
from test_server import LOCAL_ENV

from sweep.config import TrackingConfig
from sweep.measure.kernelization import kernel_layers
from sweep.measure.models import ModelCache
from sweep.records.failures import out_of_memory_reason
from sweep.records.fingerprint import fingerprint
from sweep.records.results import SCHEMA_VERSION, JobResult, RunStatus
from sweep.run.job import run_job
from sweep.store.tracking import worst_case_request_wait_s
from sweep.views.report import FINGERPRINT

# A 4-layer Llama as thin as possible: 9 RMSNorms and 4 SiLUs like tiny-llama, a fraction of its time.
THIN_MODEL = ["model.architecture.hidden_size=64", "model.architecture.intermediate_size=128",
              "model.architecture.num_attention_heads=2", "model.architecture.num_key_value_heads=2"]
FAST = ["dtype=fp32", "prompt.length=40", "timing=quick", "numerics.gen_tokens=0", "numerics.per_layer=false",
        *THIN_MODEL]
RMSNORMS = 9  # RMSNorm forwards per model forward; numerics without per-layer or generation runs one forward
OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
               "1.50 GiB is free.")
OOM = f'torch.OutOfMemoryError("{OOM_MESSAGE}")'
DEVICE_ASSERT = 'RuntimeError("CUDA error: device-side assert triggered")'


def kernel_choice(conf: Path, name: str, repo: Path, layer: str = "ExactRMSNorm") -> None:
    (conf / "kernels").mkdir(parents=True, exist_ok=True)
    (conf / "kernels" / f"{name}.yaml").write_text(f"name: {name}\nRMSNorm: {{layer_name: {layer}, path: {repo}}}\n")


def sweep_command(tmp_path: Path, *args: str, tracking_uri: str | None = None) -> list[str]:
    uri = tracking_uri or f"sqlite:///{tmp_path}/mlflow.db"
    return [sys.executable, "-m", "sweep", *args, f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path}/artifacts",
            f"tracking.spool_dir={tmp_path}/spool", f"hydra.sweep.dir={tmp_path}/hydra",
            f"hydra.run.dir={tmp_path}/hydra"]


def run_sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sweep_command(tmp_path, *args), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env=LOCAL_ENV, stdin=subprocess.DEVNULL)


def job_runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kernel-sweep")
    runs = client.search_runs([experiment.experiment_id], "tags.sweep_role = 'job'", order_by=["attributes.start_time"])
    return sorted(runs, key=lambda r: r.data.metrics.get("job_index", r.info.start_time))


# --- the record ----------------------------------------------------------------------------------------------------


def test_a_job_result_survives_the_round_trip_through_json():
    result = JobResult(name="fp32 rms T=40", params={"dtype": "fp32"}, status=RunStatus.failed, reason="why",
                       metrics={"speedup": 1.25, "err_ratio": math.inf, "kl_div": math.nan},
                       tags={"run_status": "failed"}, artifacts={"config.yaml": "a: 1\n", "layers/l.png": b"\x89PNG\0"})
    record = json.loads(json.dumps(result.to_dict()))
    assert record["schema_version"] == SCHEMA_VERSION
    back = JobResult.from_dict(record)
    assert back.artifacts == result.artifacts and back.uid == result.uid and back.ended_ms == result.ended_ms
    assert back.metrics["err_ratio"] == math.inf and math.isnan(back.metrics["kl_div"])
    assert (back.name, back.params, back.status, back.reason, back.tags) == (
        result.name, result.params, result.status, result.reason, result.tags)
    with pytest.raises(ValueError, match="schema version 0"):
        JobResult.from_dict(record | {"schema_version": 0})


def test_the_default_retries_bound_each_request_to_32_seconds():
    assert worst_case_request_wait_s(TrackingConfig()) == 32  # 3 attempts x 10 s + one 2 s back-off


# --- out of memory, kernels that raise, sticky CUDA errors ---------------------------------------------------------


def assert_pristine(models: ModelCache, cfg) -> None:
    """No kernel forward is left on the cached model."""
    loaded = models.get(cfg.model, torch.float32, torch.device("cpu"))
    assert all("forward" not in module.__dict__ for module in kernel_layers(loaded.model))


# With FAST (2 input sets, no per-layer table, no generation) numerics calls each RMSNorm kernel once per input set:
# the kernel's first call in timing is call 2 * RMSNORMS + 1.
FIRST_TIMING_CALL = 2 * RMSNORMS + 1


@pytest.mark.parametrize(("at_call", "phase"), [(1, "numerics"), (FIRST_TIMING_CALL, "timing")])
def test_out_of_memory_in_a_kernel_fails_its_job_and_the_next_job_measures(make_config, tmp_path, at_call, phase):
    models = ModelCache()
    oom = write_kernel_repo(tmp_path, f"oom_{at_call}", "ExactRMSNorm", failing_rmsnorm(OOM, at_call))
    exact = write_kernel_repo(tmp_path, f"exact_{at_call}", "ExactRMSNorm", EXACT_RMSNORM)
    failed = run_job(make_config(*FAST, "kernels=none", *local_kernel("RMSNorm", oom, "ExactRMSNorm")), models)
    assert failed.status == RunStatus.failed
    assert failed.reason.startswith(f"out of GPU memory in {phase}: needed 20.00 GiB, free 1.50 GiB"), failed.reason
    assert failed.tags["failure_kind"] == "out_of_memory" and failed.tags["failure_phase"] == phase
    assert "OutOfMemoryError" in failed.artifacts["traceback.txt"]
    assert failed.metrics[f"phase_s_{phase}"] > 0
    assert models._loaded is None  # the cache was dropped
    cfg = make_config(*FAST, "kernels=none", *local_kernel("RMSNorm", exact, "ExactRMSNorm"))
    after = run_job(cfg, models)
    assert after.status == RunStatus.measured, after.reason
    assert after.metrics["kernelized_RMSNorm"] == RMSNORMS and after.metrics["max_abs_diff"] == 0.0
    assert {"phase_s_load", "phase_s_reference", "phase_s_kernelize", "phase_s_numerics", "phase_s_timing"} <= set(
        after.metrics)
    assert_pristine(models, cfg)


@pytest.mark.parametrize(("target", "phase"), [("sweep.measure.models.load_model", "load"),
                                               ("sweep.measure.workloads.prefill.reference_logits", "reference")])
def test_out_of_memory_while_loading_or_in_the_reference_names_the_phase(make_config, monkeypatch, target, phase):
    """Fault injection: the model loader or the reference forward raises torch's out-of-memory error (the GPU
    evidence provokes it for real)."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 3.25 GiB is free.")

    monkeypatch.setattr(target, out_of_memory)
    models = ModelCache()
    result = run_job(make_config(*FAST, "kernels=none"), models)
    assert result.reason.startswith(f"out of GPU memory in {phase}: needed 64.00 GiB, free 3.25 GiB")
    assert models._loaded is None
    monkeypatch.undo()
    assert run_job(make_config(*FAST, "kernels=none"), models).status == RunStatus.measured


@pytest.mark.parametrize("integrated", [False, True])
def test_out_of_memory_on_integrated_gpu_memory_says_the_system_may_run_out_first(integrated):
    """Where the GPU's memory is the system's (a GB10), CUDA's error is not the only way out: the reason says so."""
    reason = out_of_memory_reason(torch.OutOfMemoryError(OOM_MESSAGE), "timing", torch.device("cpu"), integrated)
    assert reason.startswith("out of GPU memory in timing: needed 20.00 GiB, free 1.50 GiB"), reason
    assert ("system memory, shared with the CPU" in reason and "OOM killer" in reason) == integrated, reason


def test_the_fingerprint_records_the_cpu_architecture_and_no_gpu_memory_kind_without_a_gpu():
    machine = fingerprint(torch.device("cpu"))
    assert machine["cpu_arch"] == platform.machine() and machine["gpu_memory_integrated"] == ""
    assert set(machine) <= set(FINGERPRINT)  # the report tells machines apart by every field


@pytest.mark.parametrize(("at_call", "phase"), [(1, "numerics"), (RMSNORMS + 1, "numerics"),
                                                (FIRST_TIMING_CALL, "timing"), (4 * RMSNORMS, "timing")])
def test_a_kernel_raising_in_its_forward_fails_only_its_job(make_config, tmp_path, at_call, phase):
    models = ModelCache()
    broken = write_kernel_repo(tmp_path, f"broken_{at_call}", "ExactRMSNorm",
                               failing_rmsnorm('ValueError("kernel bug at call %d" % _calls)', at_call))
    cfg = make_config(*FAST, "kernels=none", *local_kernel("RMSNorm", broken, "ExactRMSNorm"))
    failed = run_job(cfg, models)
    assert failed.status == RunStatus.failed
    assert failed.reason == f"ValueError: kernel bug at call {at_call}"
    assert failed.tags["failure_kind"] == "error" and failed.tags["failure_phase"] == phase
    assert "raise ValueError" in failed.artifacts["traceback.txt"]
    assert_pristine(models, cfg)  # switched back: the baseline of the next job runs the model's own forwards
    after = run_job(make_config(*FAST, "kernels=none"), models)
    assert after.status == RunStatus.measured, after.reason


def test_a_sticky_cuda_error_fails_the_later_jobs_of_the_process(tmp_path):
    conf = tmp_path / "conf"
    kernel_choice(conf, "exact", write_kernel_repo(tmp_path, "sticky_exact", "ExactRMSNorm", EXACT_RMSNORM))
    kernel_choice(conf, "asserts", write_kernel_repo(tmp_path, "sticky", "ExactRMSNorm",
                                                     failing_rmsnorm(DEVICE_ASSERT, 1)))
    done = run_sweep(tmp_path, "--config-dir", str(conf), "-m", *FAST, "kernels=exact,asserts",
                     "prompt.length=40,41")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    runs = job_runs(f"sqlite:///{tmp_path}/mlflow.db")
    by_name = {r.info.run_name: r.data.tags for r in runs}
    assert by_name["exact T=40"]["run_status"] == "measured"
    assert by_name["asserts T=40"]["run_status"] == "failed"
    assert "device-side assert" in by_name["asserts T=40"]["status_reason"]
    machine = {tag: by_name["exact T=40"].get(tag) for tag in FINGERPRINT}
    assert machine["gpu_name"] and machine["cpu_model"] and machine["torch_version"]
    for later in ("exact T=41", "asserts T=41"):
        assert by_name[later]["run_status"] == "failed"
        assert by_name[later]["status_reason"].startswith("CUDA context lost after asserts T=40")
        assert by_name[later]["failure_kind"] == "cuda_context_lost"
        assert {tag: by_name[later].get(tag) for tag in FINGERPRINT} == machine  # the report's machine for it
    assert "1 measured, 0 skipped, 3 failed" in done.stdout


def test_an_oom_between_two_jobs_in_a_sweep(tmp_path):
    """The CPU stand-in of the GPU evidence: measured, out of memory, measured; exit 1, all three logged."""
    conf = tmp_path / "conf"
    kernel_choice(conf, "a_fits", write_kernel_repo(tmp_path, "fits_a", "ExactRMSNorm", EXACT_RMSNORM))
    kernel_choice(conf, "b_oom", write_kernel_repo(tmp_path, "oom_b", "ExactRMSNorm", failing_rmsnorm(OOM, 1)))
    kernel_choice(conf, "c_fits", write_kernel_repo(tmp_path, "fits_c", "ExactRMSNorm", EXACT_RMSNORM))
    done = run_sweep(tmp_path, "--config-dir", str(conf), "-m", *FAST, "kernels=a_fits,b_oom,c_fits")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = {r.data.params["kernels"]: (r.data.tags["run_status"], r.data.tags["status_reason"])
                for r in job_runs(f"sqlite:///{tmp_path}/mlflow.db")}
    assert statuses["a_fits"][0] == statuses["c_fits"][0] == "measured"
    assert statuses["b_oom"] == ("failed", statuses["b_oom"][1])
    assert statuses["b_oom"][1].startswith("out of GPU memory in numerics: needed 20.00 GiB, free 1.50 GiB")
    assert "2 measured, 0 skipped, 1 failed" in done.stdout


# --- bad input is refused before any job runs ----------------------------------------------------------------------


def _no_build_dir(tmp_path: Path) -> Path:
    (tmp_path / "not-a-kernel").mkdir()
    return tmp_path / "not-a-kernel"


# Every refusal, with what its message must say. `{tmp}` is the test's folder.
# One refusal of each kind runs in the default tier, the rest in the slow tier: each is a `python -m sweep` start.
def refusal(overrides: list[str], message: str, tier: tuple[pytest.MarkDecorator, ...] = (pytest.mark.slow,)):
    return pytest.param(overrides, message, id=" ".join(overrides), marks=tier)


REFUSALS = [
    refusal(["prompt.lenght=5"], "unknown key 'prompt.lenght': prompt has text, length, batch_size", tier=()),
    refusal(["timing.budget=3"], "timing has mode, budget_s, blocks"),
    refusal(["dtype=bf17"], "Available options in 'dtype'"),
    refusal(["-m", "dtype=fp32,bf17"], "Could not find 'dtype/bf17'", tier=()),  # the second job of a multirun
    refusal(["timing.blocks=many"], "blocks"),  # a wrong type
    refusal(["-m", "prompt.length=40,0"], "prompt.length=0 is below 1", tier=()),
    refusal(["prompt.batch_size=0"], "prompt.batch_size=0 is below 1"),
    refusal(["prompt.text="], "prompt.text is empty"),
    refusal(["kernels.source=nowhere"], "kernels.source='nowhere' is not one of: auto, hub, bundled"),
    refusal(["+kernels.RMSNorm={path: {tmp}/not-a-kernel, layer_name: X}"], "has no build/ folder"),
    refusal(["+kernels.RMSNorm={path: /does/not/exist, layer_name: X}"], "is not a directory", tier=()),
    refusal(["kernels.RMSNorm.repo_id=not//a/hub id"], "is not a valid Hub id"),
    refusal(["kernels.RMSNorm.repo_id=liger-kernels"], "has no organisation"),
    refusal(["model.id=/no/such/model"], "model.id=/no/such/model is not a directory"),
    refusal(["tracking.uri=http://127.0.0.1:9"], "cannot reach MLflow server http://127.0.0.1:9"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSALS)
def test_bad_input_is_refused_with_exit_2_and_nothing_logged(tmp_path, overrides, message):
    _no_build_dir(tmp_path)
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    done = run_sweep(tmp_path, *args) if "tracking.uri" not in args[0] else subprocess.run(
        [sys.executable, "-m", "sweep", *args, f"hydra.run.dir={tmp_path}/hydra"], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=300, env=LOCAL_ENV)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert message in " ".join((done.stdout + done.stderr).split()), done.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def model_without_tokens(tmp_path: Path) -> Path:
    """A saved model whose tokenizer maps every character to nothing: the prompt builder looped forever."""
    from tokenizers import Regex, Tokenizer, models, normalizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_prompt_the_tokenizer_turns_into_no_tokens_is_refused_at_start_up(tmp_path, model_without_tokens):
    done = run_sweep(tmp_path, *FAST, "kernels=none", f"model.id={model_without_tokens}", "model.name=saved",
                     "model.tokenizer=hub")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "into no tokens" in done.stderr and "model.tokenizer=utf8" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_prompt_the_tokenizer_turns_into_no_tokens_fails_and_says_how_to_fix_it(make_config, tmp_path,
                                                                                   model_without_tokens):
    """The job itself (e.g. a Hub model, whose tokenizer start-up does not load) fails instead of looping."""
    result = run_job(make_config(*FAST, "kernels=none", f"model.id={model_without_tokens}", "model.name=saved",
                                 "model.tokenizer=hub"), ModelCache())
    assert result.status == RunStatus.failed
    assert "into no tokens" in result.reason and "model.tokenizer=utf8" in result.reason
    assert result.tags["failure_phase"] == "load"


# --- safety --------------------------------------------------------------------------------------------------------


def test_trusting_remote_code_is_per_layer_opt_in_passed_to_kernels_and_recorded(make_config, tmp_path, kernel_repos,
                                                                                  monkeypatch, caplog):
    """A Hub kernel from an organisation `kernels` does not vouch for. Offline, `kernels` cannot ask the Hub and
    warns that it skips the publisher check, unless the layer's repository was opted in: that warning shows the
    opt-in reached `kernels`."""
    import dataclasses
    import logging

    from huggingface_hub import constants as hub_constants

    from sweep.config import KernelSourceMode, kernel_selection
    from sweep.measure.kernelization import resolve_kernel

    cache_hub_kernel(tmp_path / "hub", "someone/untrusted-rms", kernel_repos["exact_rms"], "v1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for opt_in in (False, True):
        spec = {"repo_id": "someone/untrusted-rms", "layer_name": "ExactRMSNorm", "version": 1,
                "trust_remote_code": opt_in}
        selection = kernel_selection({"source": "hub", "RMSNorm": spec})
        kernel = resolve_kernel("RMSNorm", selection.specs["RMSNorm"], KernelSourceMode.hub)
        assert kernel.repository.trust_remote_code is opt_in
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            dataclasses.replace(kernel.repository, backend="cpu").load()
        skipped_check = "Skipping publisher trust check for 'someone/untrusted-rms'" in caplog.text
        assert skipped_check is not opt_in, caplog.text
    result = run_job(make_config(*FAST, "kernels=none", "kernels.source=hub",
                                 "+kernels.RMSNorm={repo_id: someone/untrusted-rms, layer_name: ExactRMSNorm, "
                                 "version: 1, trust_remote_code: true}"), ModelCache())
    assert result.status == RunStatus.measured, result.reason
    assert result.tags["kernel_trust_remote_code_RMSNorm"] == "true"
