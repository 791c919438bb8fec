"""Shared test helpers: the single-process Hugging Face reference and multi-rank runs."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.initialization import no_init_weights

from suite.accuracy.tasks import data_dir
from suite.model.sources import ModelSource, resolve


@functools.lru_cache(maxsize=4)
def source(model: str) -> ModelSource:
    return resolve(model)


@functools.lru_cache(maxsize=4)
def hf_model(model: str) -> LlamaForCausalLM:
    """The single-device Hugging Face model on the same weights, float32, eval mode."""
    src = source(model)
    with no_init_weights():  # every weight is loaded below
        hf = LlamaForCausalLM(src.config)
    hf.load_state_dict({name: src.weights.read(name) for name in hf.state_dict()})
    return hf.eval().requires_grad_(False)


def hf_greedy(model: str, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    return _hf_greedy(model, tuple(prompt), new_tokens)


@functools.lru_cache(maxsize=64)
@torch.no_grad()
def _hf_greedy(model: str, prompt: tuple[int, ...], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of one unpadded prompt (Hugging Face's own KV cache, no EOS stop)
    and the logits after its last prompt token."""
    hf = hf_model(model)
    out = hf(torch.tensor([list(prompt)]), use_cache=True)
    first, tokens = out.logits[0, -1], []
    for _ in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, first


def require_data() -> None:
    """Skip where the offline data folder (calibration text, task data) is not found."""
    if data_dir() is None:
        pytest.skip("needs the offline data folder (SPDBENCH_DATA)")
