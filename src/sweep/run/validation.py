"""Start-up checks of every job of a sweep, before any model or GPU is touched: a sweep with one invalid job is
refused whole (exit 2), with messages that say how to fix each problem."""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig
from transformers import AutoConfig

from sweep.config import (
    KernelSourceMode,
    ModelConfig,
    PromptConfig,
    SweepConfig,
    kernel_selection,
)
from sweep.measure.compilation import baseline_problems
from sweep.measure.models import load_tokenizer, torch_dtype
from sweep.measure.prompts import prompt_inputs
from sweep.records.errors import JobConfigError

TOKENIZERS = ("auto", "utf8", "hub")
INIT_DEVICES = ("cpu", "device")


def override_problems(overrides: list[str]) -> list[str]:
    """Unknown keys among command-line overrides, each with the valid keys where it went wrong. Keys added
    with `+`, Hydra's own and those inside open nodes (kernels, model.architecture) are left to Hydra."""
    problems = []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra reports it itself
        return []
    for override in parsed:
        if override.is_add() or override.is_force_add() or override.is_delete():
            continue
        key = override.key_or_group
        if key.startswith("hydra") or override.package:
            continue
        problem = _unknown_key(key)
        if problem:
            problems.append(problem)
    return problems


def _unknown_key(key: str) -> str | None:
    node: Any = SweepConfig
    walked: list[str] = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None  # an open mapping: any key goes
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(walked) or "the top level"
            return f"unknown key {key!r}: {where} has {', '.join(fields)}"
        walked.append(part)
        node = _field_type(node, part)
    return None


def _field_type(cls: Any, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(name)


def validate_jobs(jobs: list[tuple[str, DictConfig | Exception]]) -> list[str]:
    """Every distinct problem of the sweep's jobs, prefixed by the first job (its overrides) that has it."""
    found: dict[str, str] = {}
    for label, cfg in jobs:
        problems = [_first_line_block(cfg)] if isinstance(cfg, Exception) else job_problems(cfg)
        for problem in problems:
            found.setdefault(problem, label)
    return [f"{problem} (job: {label})" if label else problem for problem, label in found.items()]


def _first_line_block(error: Exception) -> str:
    """Hydra's composition error, without its config search path listing."""
    text = str(error).split("\nConfig search path", 1)[0].strip()
    return " ".join(text.split())


def job_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    prompt, timing = cfg.prompt, cfg.timing
    minimums = (("prompt.length", prompt.length, 1), ("prompt.batch_size", prompt.batch_size, 1),
                ("timing.input_sets", timing.input_sets, 1), ("timing.blocks", timing.blocks, 2),
                ("timing.warmup", timing.warmup, 0),
                ("numerics.gen_tokens", cfg.numerics.gen_tokens, 0),
                ("tracking.http_max_retries", cfg.tracking.http_max_retries, 0),
                ("tracking.http_timeout_s", cfg.tracking.http_timeout_s, 1))
    for key, value, minimum in minimums:
        if value < minimum:
            problems.append(f"{key}={value} is below {minimum}: set {key}={max(minimum, 1)} or more")
    if timing.budget_s <= 0:
        problems.append(f"timing.budget_s={timing.budget_s} must be positive, e.g. timing.budget_s=20")
    if not prompt.text:
        problems.append("prompt.text is empty: the prompt repeats it up to prompt.length tokens; give some text")
    for key in ("torch_dtype", "reference"):
        try:
            torch_dtype(cfg.dtype[key])
        except JobConfigError as error:
            problems.append(f"dtype.{key}: {error}; use a torch dtype name such as bfloat16, float16, float32")
    problems += _model_problems(cfg.model)
    problems += _prompt_token_problems(cfg.model.id, cfg.model.name, cfg.model.tokenizer, prompt.text, prompt.length)
    problems += _kernel_problems(cfg.kernels)
    problems += baseline_problems(cfg)
    return problems


def _model_problems(model: DictConfig) -> list[str]:
    problems = []
    if model.tokenizer not in TOKENIZERS:
        problems.append(f"model.tokenizer={model.tokenizer!r} is not one of: {', '.join(TOKENIZERS)}")
    if model.init_device not in INIT_DEVICES:
        problems.append(f"model.init_device={model.init_device!r} is not one of: {', '.join(INIT_DEVICES)}")
    if model.id is None:
        if not model.architecture:
            problems.append(f"model {model.name!r} has neither model.id nor model.architecture: set one")
        return problems
    path = Path(model.id).expanduser()
    if path.exists():
        if not path.is_dir():
            problems.append(f"model.id={model.id} is a file: give the model's directory (config.json, weights)")
    elif model.id.startswith(("/", "./", "../", "~")):
        problems.append(f"model.id={model.id} is not a directory: give a saved model's directory or a Hub id")
    else:
        problems += _hub_id_problem("model.id", model.id, needs_org=False)
    return problems


@functools.cache
def _prompt_token_problems(model_id: str | None, name: str, tokenizer: str, text: str, length: int) -> list[str]:
    """For a model in a local directory, its tokenizer (no weights needed) must turn the prompt into tokens."""
    if model_id is None or not text or length < 1 or not Path(model_id).expanduser().is_dir():
        return []
    try:
        vocab_size = AutoConfig.from_pretrained(model_id).vocab_size
        loaded = load_tokenizer(ModelConfig(name=name, id=model_id, tokenizer=tokenizer), vocab_size)
        prompt_inputs(loaded, PromptConfig(text=text, length=length, batch_size=1), 1, torch.device("cpu"))
    except JobConfigError as error:
        return [f"model.id={model_id}: {error}"]
    except Exception:  # anything else is the job's to report, with the model at hand
        return []
    return []


def _kernel_problems(kernels: DictConfig) -> list[str]:
    try:
        selection = kernel_selection(kernels)
    except ValueError as error:
        return [str(error)]
    problems = []
    for layer, spec in selection.specs.items():
        if spec.path is not None:
            path = Path(spec.path).expanduser()
            if not path.is_dir():
                problems.append(f"kernels.{layer}.path={spec.path} is not a directory: give a kernel repository "
                                "(build/torch-<backend>/__init__.py inside)")
            elif not (path / "build").is_dir():
                problems.append(f"kernels.{layer}.path={spec.path} has no build/ folder: a kernel repository holds "
                                "build/torch-<backend>/__init__.py (torch-cuda, torch-cpu, ...); point at its root")
        elif spec.repo_id is not None and selection.source != KernelSourceMode.bundled:
            problems += _hub_id_problem(f"kernels.{layer}.repo_id", spec.repo_id, needs_org=True)
    return problems


def _hub_id_problem(key: str, repo_id: str, needs_org: bool) -> list[str]:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return [f"{key}={repo_id!r} is not a valid Hub id ({error}); write it as organisation/name"]
    if needs_org and "/" not in repo_id:
        return [f"{key}={repo_id!r} has no organisation: write it as organisation/name"]
    return []
