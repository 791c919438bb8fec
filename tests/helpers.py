"""Shared test helpers: the single-process Hugging Face reference and multi-rank runs."""

from __future__ import annotations

import functools

import torch
from transformers import LlamaForCausalLM

from suite.sources import ModelSource, resolve


@functools.lru_cache(maxsize=4)
def source(model: str) -> ModelSource:
    return resolve(model)


@functools.lru_cache(maxsize=4)
def hf_model(model: str) -> LlamaForCausalLM:
    """The single-device Hugging Face model on the same weights, float32, eval mode."""
    src = source(model)
    hf = LlamaForCausalLM(src.config)
    hf.load_state_dict({name: src.weights.read(name) for name in hf.state_dict()})
    return hf.eval().requires_grad_(False)


def hf_greedy(model: str, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    return _hf_greedy(model, tuple(prompt), new_tokens)


@functools.lru_cache(maxsize=64)
@torch.no_grad()
def _hf_greedy(model: str, prompt: tuple[int, ...], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of one unpadded prompt (no EOS stop; each step a full forward, no
    cache) and the logits after its last prompt token."""
    hf = hf_model(model)
    ids = torch.tensor([list(prompt)])
    first = None
    for _ in range(new_tokens):
        logits = hf(ids).logits[0, -1]
        first = logits if first is None else first
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist(), first
