"""Prompts of exactly `length` tokens: BOS, then the text repeated, never an EOS."""

from __future__ import annotations

import torch
from utf8_tokenizer.tokenizer import UTF8Tokenizer

from sweep.config import PromptConfig
from sweep.records.errors import JobConfigError


def prompt_inputs(tokenizer: object, cfg: PromptConfig, n_sets: int, device: torch.device) -> list[torch.Tensor]:
    """`n_sets` different batches of shape (batch_size, length); set k starts the text k characters later."""
    if cfg.length < 2:
        raise ValueError(f"prompt.length must be at least 2 (BOS and one token), got {cfg.length}")
    batches = []
    for set_index in range(n_sets):
        rows = [_row(tokenizer, cfg, set_index * cfg.batch_size + b) for b in range(cfg.batch_size)]
        batches.append(torch.stack(rows).to(device))
    return batches


def _row(tokenizer: object, cfg: PromptConfig, shift: int) -> torch.Tensor:
    text = cfg.text[shift % len(cfg.text):] + cfg.text * (cfg.length // max(len(cfg.text), 1) + 2)
    bos = getattr(tokenizer, "bos_token_id", None)
    body_length = cfg.length - (1 if bos is not None else 0)
    if isinstance(tokenizer, UTF8Tokenizer):
        # UTF8Tokenizer gives one tensor per text (unpadded: where numba is installed its padding JIT-compiles on first
        # use, 0.7 s); it adds EOS with special tokens, so BOS is added by hand.
        body = tokenizer([text], add_special_tokens=False)["input_ids"][0]
    else:
        body = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if body.numel() == 0 and body_length > 0:
        raise JobConfigError(
            f"the tokenizer ({type(tokenizer).__name__}) turns prompt.text={cfg.text!r} into no tokens: give the "
            "model directory its tokenizer files (tokenizer.json, tokenizer_config.json), set model.tokenizer=utf8 "
            "for a byte-level model, or choose another prompt.text"
        )
    while body.numel() < body_length:
        body = torch.cat([body, body])
    body = body[:body_length].long()
    return torch.cat([torch.tensor([bos]), body]) if bos is not None else body
