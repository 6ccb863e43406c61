"""Model and tokenizer loading: random-init architectures from a config, or `from_pretrained`."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)
from utf8_tokenizer.tokenizer import UTF8Tokenizer

from sweep.config import ModelConfig
from sweep.records.errors import JobConfigError


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    name: str
    num_parameters: int


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise JobConfigError(f"{name!r} is not a torch dtype")
    return dtype


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    model = _from_pretrained(cfg, dtype, device) if cfg.id else _random_init(cfg, dtype, device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(cfg, model.config.vocab_size),
        name=cfg.name,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )


def _random_init(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    if not cfg.architecture:
        raise JobConfigError(f"model {cfg.name!r} has neither an id nor an architecture to build")
    if cfg.init_device == "cpu":
        # Drawn in float32 on the host, then cast: the same weights on every machine, and for every dtype.
        model = copy.deepcopy(host_float32_draw(cfg))
        _cast_like_transformers(model, model.config, dtype)
        return model.to(device=device)
    if cfg.init_device != "device":
        raise JobConfigError(f"model.init_device must be 'cpu' or 'device', got {cfg.init_device!r}")
    torch.manual_seed(cfg.init_seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.init_seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(_architecture(cfg), dtype=dtype)


_host_draws: dict[str, PreTrainedModel] = {}  # the last model configuration's float32 draw
_host_draw_lock = threading.Lock()  # a draw started in the background (sweep/startup.py) finishes before it is used


def draws_on_host(cfg: ModelConfig) -> bool:
    return cfg.id is None and bool(cfg.architecture) and cfg.init_device == "cpu"


def host_float32_draw(cfg: ModelConfig) -> PreTrainedModel:
    """The float32 weights `cfg` draws on the host, drawn once for all the dtypes a sweep casts them to (a draw
    took 0.6 to 1.3 s on the H100 machines' hosts). Only the last configuration's draw is kept; never modify it."""
    key = repr(cfg)
    with _host_draw_lock:
        if key not in _host_draws:
            _host_draws.clear()
            torch.manual_seed(cfg.init_seed)
            _host_draws[key] = AutoModelForCausalLM.from_config(_architecture(cfg), dtype=torch.float32)
        return _host_draws[key]


def _architecture(cfg: ModelConfig) -> object:
    architecture = dict(cfg.architecture)
    config = AutoConfig.for_model(architecture.pop("model_type"), **architecture)
    config._attn_implementation = cfg.attn_implementation
    return config


def _cast_like_transformers(model: PreTrainedModel, config: object, dtype: torch.dtype) -> None:
    """Cast each parameter and buffer to the dtype transformers itself gives it in a `dtype` model (built on the
    meta device, so nothing is allocated): buffers its code keeps in float32, like RoPE's `inv_freq`, stay
    float32 where `model.to(dtype)` would round them."""
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config, dtype=dtype)
    wanted = {name: t.dtype for name, t in [*shape.named_parameters(), *shape.named_buffers()]}
    for name, parameter in model.named_parameters():
        parameter.data = parameter.data.to(wanted[name])
    for name, buffer in model.named_buffers():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer.to(wanted[name]))


def _from_pretrained(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    assert cfg.id is not None
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.id, dtype=dtype, device_map=str(device), attn_implementation=cfg.attn_implementation
        )
    except OSError as error:
        where = "local directory" if Path(cfg.id).exists() else "Hub id"
        raise JobConfigError(
            f"cannot load the weights of {cfg.id!r} ({where}): {error}. Without network access the model must be "
            "in the Hugging Face cache (download it once online, e.g. `hf download "
            f"{cfg.id}`) or passed as a local directory with model.id=/path/to/model."
        ) from None


def load_tokenizer(cfg: ModelConfig, vocab_size: int) -> object:
    """The model's tokenizer, or the byte-level one for a byte-sized vocabulary; needs no weights."""
    if cfg.tokenizer == "utf8":
        return UTF8Tokenizer()
    if cfg.tokenizer not in ("auto", "hub"):
        raise JobConfigError(f"model.tokenizer must be auto, utf8 or hub, got {cfg.tokenizer!r}")
    if cfg.id is not None:
        try:
            return AutoTokenizer.from_pretrained(cfg.id)
        except (OSError, ValueError) as error:
            if cfg.tokenizer == "hub":
                raise JobConfigError(f"cannot load the tokenizer of {cfg.id!r}: {error}") from None
    if vocab_size <= 256 + 16:
        return UTF8Tokenizer()
    raise JobConfigError(
        f"model {cfg.name!r} has no tokenizer and a vocabulary of {vocab_size}: "
        "set model.tokenizer=utf8 only for byte-level models"
    )


@dataclass(frozen=True)
class ReferenceKey:
    """Everything besides the model (which the cache holds one of) that determines a workload's reference."""

    workload: str
    prompt_text: str
    prompt_length: int
    batch_size: int
    reference_dtype: str
    forward_path: str


@dataclass(frozen=True)
class GenerationKey:
    """Everything besides the model that determines the baseline's greedy tokens."""

    prompt_text: str
    prompt_length: int
    batch_size: int
    new_tokens: int


DerivedKey = TypeVar("DerivedKey", ReferenceKey, GenerationKey)


class ModelCache:
    """One model per process at a time, reused by the jobs of a sweep that share (model, dtype, device);
    with it, what is derived from the model alone and is the same for every kernel subset: its high-precision
    references (`ReferenceKey`) and its own (baseline) greedy tokens (`GenerationKey`)."""

    def __init__(self) -> None:
        self._key: tuple[str, str, str] | None = None
        self._loaded: LoadedModel | None = None
        self._derived: dict[ReferenceKey | GenerationKey, Any] = {}

    def get(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LoadedModel:
        key = (repr(cfg), str(dtype), str(device))
        if key != self._key or self._loaded is None:
            self.clear()
            self._loaded = load_model(cfg, dtype, device)
            self._key = key
        return self._loaded

    def derived(self, key: ReferenceKey | GenerationKey, compute: Callable[[], Any]) -> Any:
        """What `key` names for the current model: computed by `compute` the first time, then kept."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def derived_keys(self, kind: type[DerivedKey]) -> list[DerivedKey]:
        return [key for key in self._derived if isinstance(key, kind)]

    def clear(self) -> None:
        self._key, self._loaded, self._derived = None, None, {}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
