"""Latency statistics of repeated runs (torch-free): per-repetition timings and the row fields they give."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Timings:
    """Per-repetition figures of the slowest rank, in milliseconds."""

    prefill_ms: list[float] = field(default_factory=list)
    decode_ms_per_token: list[float] = field(default_factory=list)  # empty when one token is generated
    e2e_ms: list[float] = field(default_factory=list)
    comm_fraction: list[float] = field(default_factory=list)  # empty when nothing was communicated

    def add(
        self, prefill_ms: float, decode_ms_per_token: float | None, e2e_ms: float, comm_fraction: float | None
    ) -> None:
        self.prefill_ms.append(prefill_ms)
        self.e2e_ms.append(e2e_ms)
        if decode_ms_per_token is not None:
            self.decode_ms_per_token.append(decode_ms_per_token)
        if comm_fraction is not None:
            self.comm_fraction.append(comm_fraction)


def quantile(values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile (q in 0..1), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(t: Timings, batch: int, new_tokens: int) -> dict:
    """Row fields: medians, p10/p90, throughput, communication share and the raw samples."""
    e2e = statistics.median(t.e2e_ms)
    return {
        "prefill_ms_median": statistics.median(t.prefill_ms),
        "prefill_ms_p10": quantile(t.prefill_ms, 0.1),
        "prefill_ms_p90": quantile(t.prefill_ms, 0.9),
        "decode_ms_per_token_median": quantile(t.decode_ms_per_token, 0.5),
        "decode_ms_per_token_p10": quantile(t.decode_ms_per_token, 0.1),
        "decode_ms_per_token_p90": quantile(t.decode_ms_per_token, 0.9),
        "e2e_ms_median": e2e,
        "tokens_per_s": batch * new_tokens / (e2e / 1e3),
        "comm_fraction": statistics.median(t.comm_fraction) if t.comm_fraction else None,
        "samples": {"prefill_ms": t.prefill_ms, "decode_ms_per_token": t.decode_ms_per_token, "e2e_ms": t.e2e_ms},
    }
