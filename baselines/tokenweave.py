"""Token-splitting overlap (TokenWeave, arXiv 2505.11329): one half's sync runs while the other computes.

The batch's T tokens are cut in two where TokenWeave's repository (microsoft/tokenweave) cuts
them: after ``((T + 255) & ~255) // 2 + offset`` tokens, i.e. half of T rounded up to a multiple
of 256 (for any ``split_multiple`` m: ``ceil(T / m) * m // 2 + split_offset``). A row straddling
the cut is split and its second part attends to the first part's KV cache (lower-right causal
attention, the same SDPA fast path as the first part). Each half keeps its residual
token-sharded and syncs with the reduce-scatter -> residual add + RMSNorm -> all-gather of
``seqpar``: by default one ``comm.fused_sync``, TokenWeave's multimem kernel where the
interconnect has one (see ``baselines.seqpar``). Per layer:

    comm stream                              compute stream
    sync+RMSNorm of half 2 (prev MLP)        attention half 1
    sync+RMSNorm of half 1 (attention)       attention half 2
    sync+RMSNorm of half 2 (attention)       MLP half 1
    sync+RMSNorm of half 1 (MLP)             MLP half 2

On CUDA the syncs run on a second stream and the compute stream waits (an event) only right
before it reads a half's synced input; on CPU the same schedule runs sequentially.

When it splits, as TokenWeave's code decides per world size and token count: only with
communication to overlap (N > 1; at N = 1 it runs the baseline's schedule, nothing else), and
only from ``split_min_tokens`` = 1024 tokens on, the smallest count TokenWeave's per-N configs
split (below: decode batches, fused syncs only, as ``seqpar``). The schedule runs on the
strategy's modules: ``spd+tokenweave`` overlaps the syncs an SPD plan leaves the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baselines.seqpar import ScatteredStream, fused_layers, steps
from suite.parallel.strategy import Strategy, StrategyError, all_reduce_each, register


@register("tokenweave")
@dataclass
class TokenWeave(Strategy):
    split_multiple: int = 256  # the token count is rounded up to a multiple of this before halving
    split_offset: int = 0  # tokens added to the first half (TokenWeave tunes it per token count)
    split_min_tokens: int = 1024  # fewer tokens: no split
    fused: bool = True  # each sync one comm.fused_sync (false: always the separate collectives)

    def __post_init__(self):
        if self.split_multiple < 1:
            raise StrategyError(f"option split_multiple={self.split_multiple}: it must be at least 1")
        if self.split_min_tokens < 0:
            raise StrategyError(f"option split_min_tokens={self.split_min_tokens}: it must be at least 0")

    def split_point(self, tokens: int, world: int) -> int | None:
        """Size of the first half, or None when ``tokens`` are not split on ``world`` ranks."""
        if world < 2 or tokens < self.split_min_tokens:
            return None
        at = -(-tokens // self.split_multiple) * self.split_multiple // 2 + self.split_offset
        return at if 0 < at < tokens else None

    def run_layers(self, layers, h, comm, ctx):
        modules = self.stack(layers)
        if comm.world == 1:  # nothing to overlap or to shard
            return all_reduce_each(modules, h, comm, ctx)
        at = self.split_point(h.shape[0], comm.world)
        if at is None or not modules:
            return fused_layers(modules, h, comm, ctx, self.fused)
        halves = [
            ScatteredStream(x, c, modules[0].norm, comm, self.fused)
            for x, c in zip(h.split([at, h.shape[0] - at]), ctx.split(at))
        ]
        for module, next_norm in steps(modules):
            for half in halves:
                half.wait_ready()  # compute waits for this half's previous sync only now
                partial = module(half.normed, half.ctx)
                with comm.side_stream(h.device):  # waits for the partial, then overlaps what follows
                    if h.is_cuda:  # made on the compute stream: keep their memory until this stream is done
                        for t in (partial, half.residual):
                            t.record_stream(torch.cuda.current_stream(h.device))
                    half.sync(partial, next_norm)
                    half.mark_ready()
        for half in halves:
            half.wait_ready()
        return torch.cat([half.normed for half in halves])
