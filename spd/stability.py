"""How far to trust a sensitivity analysis: a bootstrap over its calibration windows.

The analysis keeps every window's negative log-likelihood at every step k (SPD on blocks
k..L-1). A bootstrap replicate draws as many windows with replacement, recomputes every
perplexity and sensitivity from them, and compares with the analysis on all windows:

- rank correlation: Spearman's rho between the replicate's sensitivities and the full ones
  (1: the same block order);
- chosen-set agreement at a budget of n blocks: the share of the n least sensitive blocks that
  the replicate also chooses (1: the same plan);
- class agreement: the share of blocks in the same class (ISB/SB/ESB under the default
  quantile thresholds);
- per block, the 5th-95th percentile interval of its sensitivity.

Means and 5th percentiles over the replicates are reported. Few windows give a wide spread:
that is the point of reporting it.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BUDGETS = (25, 50, 75)


def sensitivities(nll: np.ndarray, tokens: int) -> np.ndarray:
    """``nll[k, w]``: window w's summed NLL with SPD on blocks k..L-1 -> sensitivity per block [L, ...]."""
    ppl = np.exp(nll.sum(axis=1) / (nll.shape[1] * tokens))
    return ppl[:-1] - ppl[1:]


def least_sensitive(sens: np.ndarray, n: int) -> np.ndarray:
    """The n least sensitive blocks, ties to the lower index (as a plan chooses them)."""
    return np.lexsort((np.arange(len(sens)), sens))[:n]


def _ranks(sens: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(sens))
    ranks[np.lexsort((np.arange(len(sens)), sens))] = np.arange(len(sens))
    return ranks


def classes(sens: np.ndarray) -> np.ndarray:
    """0/1/2 = ISB/SB/ESB under the default thresholds (1/3 and 2/3 quantiles, inclusive)."""
    t1, t2 = np.quantile(sens, [1 / 3, 2 / 3])
    return (sens > t1).astype(int) + (sens > t2).astype(int)


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "p05": float(np.percentile(values, 5))}


def bootstrap(
    nll: list[list[float]], tokens: int, budgets=DEFAULT_BUDGETS, resamples: int = 1000, seed: int = 0
) -> dict:
    """The stability report of an analysis whose per-window NLLs are ``nll[k][w]``."""
    nll = np.asarray(nll, dtype=float)
    n_layers, windows = nll.shape[0] - 1, nll.shape[1]
    full = sensitivities(nll, tokens)
    rng = np.random.default_rng(seed)
    full_ranks, full_classes = _ranks(full), classes(full)
    chosen = {b: set(least_sensitive(full, round(b / 100 * n_layers)).tolist()) for b in budgets}
    rho, agree, same_class, replicates = [], {b: [] for b in budgets}, [], []
    for _ in range(resamples):
        sens = sensitivities(nll[:, rng.integers(0, windows, windows)], tokens)
        replicates.append(sens)
        rho.append(float(np.corrcoef(_ranks(sens), full_ranks)[0, 1]))
        same_class.append(float(np.mean(classes(sens) == full_classes)))
        for b in budgets:
            if chosen[b]:
                agree[b].append(len(chosen[b] & set(least_sensitive(sens, len(chosen[b])).tolist())) / len(chosen[b]))
    low, high = np.percentile(np.stack(replicates), [5, 95], axis=0)
    return {
        "resamples": resamples,
        "seed": seed,
        "windows": windows,
        "rank_correlation": _summary(rho),
        "class_agreement": _summary(same_class),
        "chosen_set_agreement": {f"{b}%": _summary(agree[b]) for b in budgets if agree[b]},
        "sensitivity_interval": {str(k): [float(low[k]), float(high[k])] for k in range(n_layers)},
    }
