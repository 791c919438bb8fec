"""Attention on the virtual clock: ``F.scaled_dot_product_attention`` priced as the regime's kernel runs it.

SDPA is composite (it decomposes before a dispatch mode sees it), so a function mode prices it: FLOPs from
the flop counter's SDPA formula, times the share of query/key pairs a causal kernel computes; an explicit
mask does not shorten the work; its output has the [batch, length, heads, dim] layout fused kernels write.
Whatever the model's code passes, the regime says how the kernel runs: over the filled cache or the whole
static cache, with the causal pairs skipped or an explicit mask read, and K/V shared by the query heads or
copied to them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import sdpa_flop_count

from suite.latency.simulation.shapes import tensor_bytes


def lower_right_share(q_len: int, k_len: int) -> float:
    """Share of the pairs kept when the last of ``q_len`` queries sees all ``k_len`` keys (a chunk, or a
    decode token, attending to the cache before it)."""
    hidden = max(q_len - k_len, 0)  # leading queries that see no key
    seen = q_len - hidden  # the others see k_len - seen + 1 .. k_len keys
    return (seen * (k_len - seen) + seen * (seen + 1) / 2) / (q_len * k_len)


class AttentionMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to ``price_attention`` (unless ``cost`` is paused)."""

    def __init__(self, cost):
        super().__init__()
        self.cost = cost

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and not self.cost.paused:
            return price_attention(self.cost, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def price_attention(
    cost, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """``F.scaled_dot_product_attention`` as the regime's attention kernel runs it on the clock of
    ``cost`` (a ``CostMode``); returns an output of the right shape.

    ``filled`` keys: the positions written so far, the causal pairs skipped (an explicit mask: read,
    every pair computed); ``static_cache`` keys: every slot of the static cache. Repeated K/V heads
    are one copy kernel (read the shared heads, write one per query head) before the attention."""
    regime, clock, device = cost.regime, cost.clock, cost.device
    batch, heads, q_len, head_dim = query.shape
    keys, mask = regime.attention[cost.phase]
    if keys == "filled":  # a prefill chunk passes its own keys; decode may pass the whole cache
        k_len = min(cost.filled or key.shape[-2], key.shape[-2])
    else:
        k_len = regime.static_cache_len(cost.cache_len or key.shape[-2])
    out = query.new_empty((batch, q_len, heads, value.shape[-1])).transpose(1, 2)
    share = lower_right_share(q_len, k_len) if mask == "causal" else 1.0
    kv_heads, size = key.shape[1], key.element_size()
    kv_bytes = 2 * batch * kv_heads * k_len * head_dim * size
    cost.flush()
    ready = cost.ready(query, key, value)
    if regime.kv_heads == "repeated" and kv_heads != heads:
        repeated = kv_bytes * heads // kv_heads
        ready = clock.kernel(device.kernel_seconds("elementwise", 0, kv_bytes + repeated), ready)
        kv_bytes = repeated
    mask_bytes = q_len * k_len if mask == "explicit" else 0  # a boolean mask broadcast over rows and heads
    flops = (
        sdpa_flop_count(
            (batch, heads, q_len, head_dim), (batch, heads, k_len, head_dim), (batch, heads, k_len, value.shape[-1])
        )
        * share
    )
    nbytes = 2 * tensor_bytes(query) + kv_bytes + mask_bytes
    end = clock.kernel(device.kernel_seconds("attention", flops, nbytes, keys=k_len, causal=share < 1), ready)
    cost.buffers[out].ready = end
    return out
