"""Device and interconnect profiles against published per-kernel times (``suite/latency/published/vidur-*``).

Each published kernel time is compared with the profile's price of the same kernel, as the simulation
prices it: a GEMM as floor + max(FLOPs / FLOP/s(M), bytes / bandwidth); an attention kernel from its
FLOPs (causal pairs skipped) and the bytes of Q, K, V and the output; an all-reduce as the interconnect
profile's CUDA-graph price (the published times are kernel times, launch excluded). error = modelled /
published - 1. Cells a profile was derived from are marked: they check the arithmetic, not the model.
"""

from __future__ import annotations

import statistics

from torch.utils.flop_counter import sdpa_flop_count

from suite.latency.device import load_device
from suite.latency.interconnect import load_profile
from suite.latency.simulation.attention import lower_right_share
from suite.latency.simulation.validation import load_published

DTYPE_BYTES = 2  # every published kernel time here is fp16


def _row(published_ms: float, modelled_ms: float, **keys) -> dict:
    return {
        **keys,
        "published_ms": published_ms,
        "modelled_ms": modelled_ms,
        "error_pct": 100 * (modelled_ms / published_ms - 1),
    }


def summary(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """Median and worst |error| of the independent checks, per value of the ``by`` keys."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if not row.get("profile_from"):
            groups.setdefault(tuple(row[k] for k in by), []).append(abs(row["error_pct"]))
    return [
        {
            **dict(zip(by, key)),
            "cells": len(e),
            "median_abs_error_pct": statistics.median(e),
            "worst_abs_error_pct": max(e),
        }
        for key, e in groups.items()
    ]


def gemm_seconds(device, m: int, k: int, n: int) -> float:
    return device.kernel_seconds("gemm", 2 * m * k * n, DTYPE_BYTES * (m * k + k * n + m * n), rows=m)


def gemms(published: dict) -> list[dict]:
    """Each published GEMM time (a cell's ``k`` and ``n``, else the table's ``shape``) against its price."""
    rows = []
    for cell in published["cells"]:
        device = load_device(cell["device_profile"])
        k, n = cell.get("k", published.get("shape", {}).get("k")), cell.get("n", published.get("shape", {}).get("n"))
        for m, ms in cell["times_ms"]:
            keys = {key: cell[key] for key in ("model", "tp", "op") if key in cell}
            rows.append(
                _row(ms, 1e3 * gemm_seconds(device, m, k, n), device_profile=device.name, m=m, k=k, n=n, **keys)
                | {"profile_from": m in cell.get("profile_from", [])}
            )
    return rows


def attention(published: dict) -> list[dict]:
    """Published prefill and decode attention times against the device profile's attention kernel."""
    device = load_device(published["device_profile"])
    heads, kv_heads, dim = (published["heads"][k] for k in ("query", "kv", "dim"))

    def price(batch: int, queries: int, keys: int) -> float:  # as price_attention: Q and the output, K and V
        share = lower_right_share(queries, keys)
        flops = sdpa_flop_count((batch, heads, queries, dim), (batch, heads, keys, dim), (batch, heads, keys, dim))
        nbytes = DTYPE_BYTES * batch * dim * (2 * heads * queries + 2 * kv_heads * keys)
        return 1e3 * device.kernel_seconds("attention", flops * share, nbytes, keys=keys, causal=share < 1)

    # each query attends over the cached keys and the chunk's own
    rows = [_row(c["ms"], price(c["batch"], c["tokens"], c["cached"] + c["tokens"]), **c) for c in published["cells"]]
    return [r | {"device_profile": device.name} for r in rows]


def all_reduces(published: dict) -> list[dict]:
    """Median published all-reduce kernel time per size range against the profile's CUDA-graph price at
    the range's median size (the price grows with size: the median of the prices)."""
    rows = []
    for cell in published["cells"]:
        profile = load_profile(cell["interconnect"])
        modelled = 1e3 * profile.seconds("all_reduce", cell["n"], cell["median_bytes"], launch="cuda_graph")
        rows.append(_row(cell["median_us"] / 1e3, modelled, **cell))
    return rows


def checks(gemm_points: str = "vidur-gemm") -> dict:
    """Every per-kernel comparison of docs/validation.md; ``gemm_points``: the GEMM times the device
    profiles were derived from (a shipped name or a file)."""
    tables = {name: load_published(name) for name in ("vidur-gemm-checks", "vidur-attention", "vidur-all-reduce")}
    gemm_rows = gemms(tables["vidur-gemm-checks"])
    return {
        "gemm_points": gemms(load_published(gemm_points)),
        "gemm": summary(gemm_rows, ("device_profile", "model")),
        "gemm_by_m": summary(gemm_rows, ("device_profile", "m")),
        "attention": attention(tables["vidur-attention"]),
        "all_reduce": all_reduces(tables["vidur-all-reduce"]),
        "sources": {name: table["sources"] for name, table in tables.items()},
    }
