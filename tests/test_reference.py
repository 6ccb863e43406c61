"""The reference pass measures the model without changing it, and loading keeps transformers' float32 buffers."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM

from sweep.config import ModelConfig
from sweep.measure.models import load_model
from sweep.measure.numerics import forward_logits, reference_logits, reference_precision
from sweep.measure.workloads import workload

SMALL_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, bos_token_id=2, eos_token_id=3)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: tensor.detach().clone() for name, tensor in tensors}


def _assert_bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize(("dtype", "reference"), [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_reference_pass_leaves_a_from_pretrained_model_bit_identical(tmp_path, dtype, reference):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMALL_LLAMA)).save_pretrained(tmp_path)
    cfg = OmegaConf.structured(ModelConfig(name="saved", id=str(tmp_path), tokenizer="utf8"))
    model = load_model(cfg, dtype, torch.device("cpu")).model
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers loads it
    ids = torch.randint(0, 256, (1, 24))
    before, logits_before = _state(model), forward_logits(model, ids)
    reference_logits(model, ids, reference)
    _assert_bit_identical(before, _state(model))
    assert torch.equal(forward_logits(model, ids), logits_before)


@pytest.mark.parametrize("name", ["prefill", "decode", "train"])
def test_every_workloads_reference_leaves_the_model_bit_identical(tmp_path, make_config, name):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMALL_LLAMA)).save_pretrained(tmp_path)
    cfg = OmegaConf.structured(ModelConfig(name="saved", id=str(tmp_path), tokenizer="utf8"))
    loaded = load_model(cfg, torch.bfloat16, torch.device("cpu"))
    model = loaded.model
    job = make_config(f"workload={name}", "prompt.length=24", "timing=quick")
    work = workload(job.workload)
    inputs = work.inputs(loaded.tokenizer, job, torch.device("cpu"))
    before, logits_before = _state(model), forward_logits(model, inputs[0])
    flags = [(p.requires_grad, p.grad) for p in model.parameters()]
    reference = work.reference(model, inputs, torch.float32, job)
    _assert_bit_identical(before, _state(model))
    assert torch.equal(forward_logits(model, inputs[0]), logits_before)
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == flags and not model.training
    assert reference is not None


class LowPrecisionRequests(TorchFunctionMode):
    """Records each op asked for a float32 result by a `dtype=` keyword, and each op that takes a float64 tensor
    and returns a lower floating precision."""

    def __init__(self):
        super().__init__()
        self.asked: list[str] = []
        self.lowered: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if kwargs.get("dtype") == torch.float32:
            self.asked.append(func.__name__)
        takes_float64 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)
        if takes_float64 and isinstance(output, torch.Tensor) and output.dtype.itemsize < 8:
            self.lowered.append(func.__name__)
        return output


def test_float64_reference_runs_eager_attentions_float32_softmax_in_float64():
    """transformers' eager attention takes `softmax(..., dtype=torch.float32)`; in the reference that is float64."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SMALL_LLAMA, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 24))
    with reference_precision(model, torch.float64), LowPrecisionRequests() as spy:
        forward_logits(model, ids)
    assert spy.asked.count("softmax") == SMALL_LLAMA["num_hidden_layers"]  # one per layer's attention
    assert spy.lowered == []


def test_random_init_keeps_the_buffers_transformers_keeps_in_float32():
    architecture = {"model_type": "llama", **SMALL_LLAMA}
    cfg = OmegaConf.structured(ModelConfig(name="small", architecture=architecture, tokenizer="utf8"))
    model = load_model(cfg, torch.bfloat16, torch.device("cpu")).model
    buffers = dict(model.named_buffers())
    assert buffers["model.rotary_emb.inv_freq"].dtype == torch.float32
    assert buffers["model.rotary_emb.original_inv_freq"].dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The same float32 draw as before, only cast: the weights do not depend on the dtype asked for.
    full = load_model(cfg, torch.float32, torch.device("cpu")).model
    assert torch.equal(model.lm_head.weight, full.lm_head.weight.to(torch.bfloat16))
    assert torch.equal(buffers["model.rotary_emb.inv_freq"], full.model.rotary_emb.inv_freq)


def test_the_dtypes_of_a_sweep_cast_one_float32_draw(monkeypatch):
    """Drawing tiny-llama's float32 weights took 0.6 to 1.3 s on the H100 machines' hosts: each dtype's model is
    cast from a copy of one draw, which no load changes."""
    draws = []
    build = AutoModelForCausalLM.from_config

    def counted(config, **kwargs):
        if kwargs.get("dtype") == torch.float32 and not str(torch.get_default_device()).startswith("meta"):
            draws.append(config)
        return build(config, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", counted)
    architecture = {"model_type": "llama", **SMALL_LLAMA}
    cfg = OmegaConf.structured(ModelConfig(name="drawn-once", architecture=architecture, tokenizer="utf8"))
    half = load_model(cfg, torch.bfloat16, torch.device("cpu")).model
    full = load_model(cfg, torch.float32, torch.device("cpu")).model
    drawn = full.lm_head.weight.detach().clone()
    full.lm_head.weight.data.add_(1.0)  # a job's model is its own: changing it leaves the next load's untouched
    again = load_model(cfg, torch.float32, torch.device("cpu")).model
    assert len(draws) == 1
    assert torch.equal(half.lm_head.weight, drawn.to(torch.bfloat16))
    assert torch.equal(again.lm_head.weight, drawn)
    assert half.config.dtype == torch.bfloat16 and again.config.dtype == torch.float32
