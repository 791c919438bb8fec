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
    return [windows[i : i + batch] for i in range(0, windows.shape[0], batch)]


def _context(model, rows: torch.Tensor):
    model.setup_cache(*rows.shape)
    return window_context(model, *rows.shape)


def window_nll(model, h: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """Each row's summed next-token negative log-likelihood given the final residual stream ``h``."""
    h = h.view(*rows.shape, -1)
    # one row at a time keeps the [tokens, vocab] logits small
    return [
        F.cross_entropy(model.head(h[b, :-1]).float(), rows[b, 1:], reduction="sum").item()
        for b in range(rows.shape[0])
    ]


def perplexity(nll: list[float], seq_len: int) -> float:
    """Perplexity from each window's summed next-token negative log-likelihood (``seq_len - 1`` targets each)."""
    return math.exp(sum(nll) / (len(nll) * (seq_len - 1)))


def ppl_job(
    comm,
    device,
    model_name: str,
    configs: list[tuple[str, dict]],
    windows: torch.Tensor,
    batch: int,
    dtype: str = "float32",
) -> list[float]:
    """Perplexity of ``windows`` [S, L] under each (strategy, options) configuration."""
    return [
        perplexity(nll, windows.shape[1]) for nll in nll_job(comm, device, model_name, configs, windows, batch, dtype)
    ]


@torch.inference_mode()
def nll_job(
    comm,
    device,
    model_name: str,
    configs: list[tuple[str, dict]],
    windows: torch.Tensor,
    batch: int,
    dtype: str = "float32",
) -> list[list[float]]:
    """Each window's summed next-token negative log-likelihood under each (strategy, options)
    configuration (on rank 0; the other ranks return zeros)."""
    source = resolve(model_name, device)
    out = []
    for name, options in tqdm(configs, desc="models", disable=comm.rank != 0 or len(configs) == 1):
        strategy = bound_strategy(name, options, source, comm.world)
        model = strategy.load_model(source, comm.world, comm.rank, DTYPES[dtype], device)
        nll = []
        for rows in _batches(windows.to(device), batch):
            ctx = _context(model, rows)
            h = strategy.run_layers(model.layers, model.embed(rows.flatten()), comm, ctx)
            nll += window_nll(model, h, rows) if comm.rank == 0 else [0.0] * rows.shape[0]
        out.append(nll)
    return out


def strategy_ppl(
    model: str,
    tp: int,
    configs: list[tuple[str, dict]],
    samples: int,
    seq_len: int,
    results,
    command: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    backend: str = "auto",
    timeout: float = 300,
) -> list[tuple[str, dict, float]]:
    """WikiText-2 test perplexity of each (strategy, options) at N = ``tp``, appended to ``results`` as
    ``perplexity`` rows with each window's NLL; configurations already there are not run again."""
    from spd.data import wikitext2_windows
    from suite.environment import environment
    from suite.parallel import launch as launching
    from suite.results import ResultStore, Row, StrategyPerplexityScenario

    source = resolve(model)
    windows = wikitext2_windows(source, samples, seq_len)
    scenarios = [
        StrategyPerplexityScenario(
            model=model,
            strategy=name,
            strategy_options=options,
            tp=tp,
            dtype=dtype,
            dataset="wikitext2-test",
            tokens=windows.numel(),
            seq_len=seq_len,
        )
        for name, options in configs
    ]
    store = ResultStore(results)
    done = {r["cell_id"]: r["ppl"] for r in store.rows() if r.get("kind") == "perplexity" and r.get("status") == "ok"}
    todo = [s for s in scenarios if s.cell_id not in done]
    if todo:
        nll = launching.launch(
            nll_job,
            tp,
            model,
            [(s.strategy, s.strategy_options) for s in todo],
            windows,
            8,
            dtype,
            device=device,
            backend=backend,
            timeout_s=timeout,
        )
        env = environment()
        store.append(
            *[
                Row(scenario=s, values={"ppl": perplexity(n, seq_len), "window_nll": n}, env=env, command=command)
                for s, n in zip(todo, nll)
            ]
        )
        done |= {s.cell_id: perplexity(n, seq_len) for s, n in zip(todo, nll)}
    return [(s.strategy, s.strategy_options, done[s.cell_id]) for s in scenarios]
