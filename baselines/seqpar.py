"""Sequence-parallel fused sync: the block syncs of token splitting, without the split.

Between syncs the residual stream stays token-sharded: rank i holds its 1/N of the tokens
(the token count padded to a multiple of N). Each module's partial output is synced as

    r_i = r_i + RS(Y)_i          # reduce-scatter: rank i gets the sum of its tokens
    U   = AG(RMSNorm_next(r_i))  # the norm runs on 1/N of the tokens, then all-gather

and the next module runs on the normed full-width U (after the last module: U = AG(r_i)).
Same math as the baseline's H = X + AR(Y); RMSNorm(H), up to summation order. ``seqpar``
isolates the cost of this reordering from the overlap that ``tokenweave`` adds on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from suite.parallel.strategy import Strategy, register


def modules(layers):
    """The 2L modules in order: (partial(U, ctx), the RMSNorm of the module after it, None after the last)."""
    steps = []
    for i, layer in enumerate(layers):
        after_mlp = layers[i + 1].input_layernorm if i + 1 < len(layers) else None
        steps.append((lambda u, ctx, l=layer: l.self_attn(u, ctx), layer.post_attention_layernorm))
        steps.append((lambda u, ctx, l=layer: l.mlp(u), after_mlp))
    return steps


class ScatteredStream:
    """A run of tokens in sequence-parallel form: this rank's rows of the residual, and the
    normed full-width input U of the next module. ``ready`` marks U on a second CUDA stream."""

    def __init__(self, h: torch.Tensor, ctx, norm, comm):
        self.ctx, self.tokens, self.comm = ctx, h.shape[0], comm
        rows = -(-self.tokens // comm.world)
        self.residual = self._pad(h)[comm.rank * rows: (comm.rank + 1) * rows]
        self.normed = norm(h)
        self.ready: torch.cuda.Event | None = None

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, -self.tokens % self.comm.world))

    def sync(self, partial: torch.Tensor, norm) -> None:
        """r_i += RS(partial)_i;  U = AG(norm(r_i)), or AG(r_i) when ``norm`` is None."""
        self.residual = self.residual + self.comm.reduce_scatter(self._pad(partial))
        out = self.residual if norm is None else norm(self.residual)
        self.normed = self.comm.all_gather(out)[: self.tokens]

    def mark_ready(self) -> None:
        if self.normed.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def wait_ready(self) -> None:
        if self.ready is not None:
            torch.cuda.current_stream(self.normed.device).wait_event(self.ready)
            self.ready = None


def fused_layers(layers, h, comm, ctx):
    """The decoder stack with fused syncs on one stream; returns the full residual stream."""
    if not layers:
        return h
    stream = ScatteredStream(h, ctx, layers[0].input_layernorm, comm)
    for module, norm in modules(layers):
        stream.sync(module(stream.normed, ctx), norm)
    return stream.normed


@register("seqpar")
@dataclass
class SeqPar(Strategy):
    def run_layers(self, layers, h, comm, ctx):
        return fused_layers(layers, h, comm, ctx)
