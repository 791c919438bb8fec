"""Perplexity of token windows: on N tensor-parallel ranks (``ppl_job``, rank 0 computes the loss),
and the per-window negative log-likelihood both it and the sensitivity analysis use."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spd.ranks import window_context
from suite.model.sources import DTYPES, resolve
from suite.parallel.strategy import bound_strategy


def _batches(windows: torch.Tensor, batch: int):
    return [windows[i: i + batch] for i in range(0, windows.shape[0], batch)]


def _context(model, rows: torch.Tensor):
    model.setup_cache(*rows.shape)
    return window_context(model, *rows.shape)


def window_nll(model, h: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """Each row's summed next-token negative log-likelihood given the final residual stream ``h``."""
    h = h.view(*rows.shape, -1)
    # one row at a time keeps the [tokens, vocab] logits small
    return [F.cross_entropy(model.head(h[b, :-1]).float(), rows[b, 1:], reduction="sum").item()
            for b in range(rows.shape[0])]


@torch.inference_mode()
def ppl_job(comm, device, model_name: str, configs: list[tuple[str, dict]], windows: torch.Tensor,
            batch: int, dtype: str = "float32") -> list[float]:
    """Perplexity of ``windows`` [S, L] under each (strategy, options) configuration."""
    source = resolve(model_name, device)
    out = []
    for name, options in tqdm(configs, desc="models", disable=comm.rank != 0 or len(configs) == 1):
        strategy = bound_strategy(name, options, source, comm.world)
        model = strategy.load_model(source, comm.world, comm.rank, DTYPES[dtype], device)
        total = 0.0
        for rows in _batches(windows.to(device), batch):
            ctx = _context(model, rows)
            h = strategy.run_layers(model.layers, model.embed(rows.flatten()), comm, ctx)
            total += sum(window_nll(model, h, rows)) if comm.rank == 0 else 0.0
        out.append(math.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))
    return out
