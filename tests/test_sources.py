"""Where models, tokenizers and kernels come from: the Hub code paths, run against local caches and
directories the tests create (no network), and the bundled fallback."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import HUB_COMMIT, SHORT_PROMPT, cache_hub_kernel, offline_hub_job
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig, AutoModelForCausalLM
from utf8_tokenizer.tokenizer import UTF8Tokenizer

from sweep.config import PromptConfig
from sweep.measure.prompts import prompt_inputs
from sweep.records.results import RunStatus
from sweep.run.job import run_job


def test_hub_kernel_from_the_local_hub_cache(tmp_path, kernel_repos):
    """kernels-community/liger-kernels version 3, resolved and loaded by `kernels` from an offline Hub cache."""
    # The cached kernel names its layer ExactRMSNorm; the mission's config asks for LigerRMSNorm.
    run = offline_hub_job(tmp_path, kernel_repos["exact_rms"], "kernels.RMSNorm.layer_name=ExactRMSNorm")
    assert run.data.tags["run_status"] == "measured", run.data.tags["status_reason"]
    assert run.data.tags["kernel_source_RMSNorm"] == f"hub:kernels-community/liger-kernels@{HUB_COMMIT}"
    assert run.data.metrics["kernelized_RMSNorm"] == 9


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path / "empty-cache"))


def test_hub_source_without_the_hub_fails_and_says_what_to_do(make_config, models, offline_empty_cache):
    result = run_job(make_config("dtype=fp32", "kernels=rms", "kernels.source=hub", *SHORT_PROMPT), models)
    assert result.status == RunStatus.failed
    assert "kernels-community/liger-kernels" in result.reason and "kernels.source=bundled" in result.reason


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """Online, but the Hub endpoint refuses connections (a port nobody listens on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path / "empty-cache"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip of the bundled copy")
@pytest.mark.parametrize(("hub", "why"), [("offline_empty_cache", "offline"), ("unreachable_hub", "ConnectError")])
def test_auto_source_falls_back_to_the_bundled_copy_and_records_it(make_config, models, request, hub, why):
    request.getfixturevalue(hub)
    result = run_job(make_config("dtype=fp32", "kernels=both", *SHORT_PROMPT), models)
    assert result.tags["kernel_source_RMSNorm"] == "bundled:liger_rmsnorm"
    assert result.tags["kernel_source_SiLU"] == "bundled:triton_silu"
    assert result.params["kernel_RMSNorm"].startswith("bundled:liger_rmsnorm@")
    assert "Hub unavailable" in result.tags["kernel_note_RMSNorm"] and why in result.tags["kernel_note_RMSNorm"]
    assert result.status == RunStatus.skipped  # the bundled kernels are CUDA-only


@pytest.mark.parametrize(("override", "message"), [
    ("kernels.RMSNorm.version=99", "has no version=99"),
    ("kernels.RMSNorm.revision=nosuchbranch", "revision 'nosuchbranch' is not in the local cache"),
])
def test_auto_source_fails_on_a_version_the_cached_repository_does_not_have(
        make_config, models, tmp_path, monkeypatch, kernel_repos, override, message):
    """The repository is known (cached), so a wrong version is the user's error, never a silent fallback."""
    cache_hub_kernel(tmp_path / "hub", "kernels-community/liger-kernels", kernel_repos["exact_rms"], "v3")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path / "hub"))
    overrides = [override] + (["kernels.RMSNorm.version=null"] if "revision" in override else [])
    result = run_job(make_config("dtype=fp32", "kernels=rms", *overrides, *SHORT_PROMPT), models)
    assert result.status == RunStatus.failed, result.reason
    assert message in result.reason and "kernel_note_RMSNorm" not in result.tags


def test_model_from_a_saved_directory(make_config, models, tmp_path, kernel_repos):
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=256, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "saved")
    result = run_job(make_config("dtype=fp32", "kernels=none", f"model.id={tmp_path / 'saved'}", "model.name=saved",
                                 "model.tokenizer=auto", *SHORT_PROMPT,
                                 f"+kernels.RMSNorm={{path: {kernel_repos['exact_rms']}, layer_name: ExactRMSNorm}}"),
                     models)
    assert result.status == RunStatus.measured, result.reason
    assert result.metrics["kernelized_RMSNorm"] == 5  # 2 layers x 2 + the final norm
    assert result.params["model"] == str(tmp_path / "saved")


def test_unavailable_model_fails_with_a_message_that_says_so(make_config, models, monkeypatch, tmp_path):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "no-cache"))
    result = run_job(make_config("model=utf8-lm-tiny", "kernels=none", *SHORT_PROMPT), models)
    assert result.status == RunStatus.failed
    assert "cannot load the weights of 'sign/utf8-lm-tiny'" in result.reason
    assert "Hugging Face cache" in result.reason


@pytest.mark.parametrize("length", [2, 40, 118])
def test_prompts_are_bos_then_exactly_length_tokens_without_eos(length):
    tokenizer = UTF8Tokenizer()
    batches = prompt_inputs(tokenizer, PromptConfig(length=length, batch_size=2), 3, torch.device("cpu"))
    assert len(batches) == 3
    for batch in batches:
        assert batch.shape == (2, length)
        assert (batch[:, 0] == tokenizer.bos_token_id).all()
        assert not (batch[:, 1:] == tokenizer.eos_token_id).any()
    assert tokenizer.decode(batches[0][0, 1:].tolist()) == ("Hello world! " * 20)[: length - 1]
    if length > 2:
        assert not torch.equal(batches[0], batches[1])  # input sets differ, for cache rotation
