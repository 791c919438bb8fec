"""Perplexity of token windows on N tensor-parallel ranks (rank 0 computes the loss).

``ppl_job`` evaluates whole models (one per strategy configuration); ``sensitivity_job`` is the
progressive drop of the sensitivity analysis: blocks 0..k-1 are untouched when SPD covers
blocks k..L-1, so their output is computed once (baseline) and each step runs only blocks k..L-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spd.strategy import run_blocks
from suite.model.sharding import build_rank_model
from suite.model.sources import DTYPES, resolve
from suite.parallel.strategy import bound_strategy


def _batches(windows: torch.Tensor, batch: int):
    return [windows[i: i + batch] for i in range(0, windows.shape[0], batch)]


def _context(model, rows: torch.Tensor):
    n, length = rows.shape
    model.setup_cache(n, length)
    slots = torch.arange(length, device=rows.device)
    return model.context(torch.zeros(n, dtype=torch.long, device=rows.device), slots, length)


def nll_sum(model, h: torch.Tensor, rows: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``rows`` given the final residual stream ``h``."""
    h = h.view(*rows.shape, -1)
    total = 0.0
    for b in range(rows.shape[0]):  # one row at a time keeps the [tokens, vocab] logits small
        logits = model.head(h[b, :-1]).float()
        total += F.cross_entropy(logits, rows[b, 1:], reduction="sum").item()
    return total


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
            total += nll_sum(model, h, rows) if comm.rank == 0 else 0.0
        out.append(math.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))
    return out


@torch.inference_mode()
def sensitivity_job(comm, device, model_name: str, windows: torch.Tensor, batch: int, steps: list[int],
                    on_step=None) -> dict[int, float]:
    """Perplexity with SPD on blocks k..L-1 for every k in ``steps`` (k = L: no SPD block).

    ``on_step(k, ppl)`` is called on rank 0 after each step (to save progress).
    """
    source = resolve(model_name, device)
    model = build_rank_model(source, comm.world, comm.rank, torch.float32, device)
    n_layers = len(model.layers)
    batches = _batches(windows.to(device), batch)
    inputs = []  # per batch: the residual stream entering every block, and the final one (baseline TP)
    for rows in batches:
        ctx = _context(model, rows)
        h, hs = model.embed(rows.flatten()), []
        for layer in model.layers:
            hs.append(h)
            h = run_blocks([layer], h, comm, ctx, drop=set())
        inputs.append(hs + [h])
    result = {}
    for k in tqdm(steps, desc="sensitivity", disable=comm.rank != 0):
        total = 0.0
        for rows, hs in zip(batches, inputs):
            ctx = _context(model, rows)
            h = run_blocks(model.layers[k:], hs[k], comm, ctx, drop=set(range(n_layers - k)))
            total += nll_sum(model, h, rows) if comm.rank == 0 else 0.0
        result[k] = math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
        if comm.rank == 0 and on_step:
            on_step(k, result[k])
    return result
