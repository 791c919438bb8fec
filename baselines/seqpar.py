"""Sequence-parallel fused sync: the block syncs of token splitting, without the split.

Between syncs the residual stream stays token-sharded: rank i holds its 1/N of the tokens
(the token count padded to a multiple of N). Each module's partial output is synced as

    r_i = r_i + RS(Y)_i          # reduce-scatter: rank i gets the sum of its tokens
    U   = AG(RMSNorm_next(r_i))  # the norm runs on 1/N of the tokens, then all-gather

and the next module runs on the normed full-width U (after the last module, or before a module
that norms the residual stream itself as an SPD block does: U = AG(r_i)).
Same math as the baseline's H = X + AR(Y); RMSNorm(H), up to summation order. ``seqpar``
isolates the cost of this reordering from the overlap that ``tokenweave`` adds on top.

Each sync is one ``comm.fused_sync`` by default, as TokenWeave deploys it: its single multimem
kernel for reduce-scatter + add + RMSNorm + all-gather where the interconnect has one (a modelled
interconnect with a ``fused_sync`` table: NVSwitch multimem); elsewhere, and on the
torch.distributed communicator (no multimem backend), the same reduce-scatter, add, norm and
all-gather run one by one. ``fused=false`` always runs them one by one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from suite.parallel.comm import split_sync
from suite.parallel.strategy import Strategy, register


def steps(modules):
    """Each module's computation after its norm, with the norm of the module after it (None after
    the last, or before a module that reads the residual stream itself: the all-gather carries it)."""
    return [(m.run, after.norm if after else None) for m, after in zip(modules, [*modules[1:], None])]


class ScatteredStream:
    """A run of tokens in sequence-parallel form: this rank's rows of the residual, and the
    normed full-width input U of the next module. ``ready`` marks U on a second CUDA stream."""

    def __init__(self, h: torch.Tensor, ctx, norm, comm, fused: bool):
        self.ctx, self.tokens, self.comm = ctx, h.shape[0], comm
        self._sync = comm.fused_sync if fused else functools.partial(split_sync, comm)
        rows = -(-self.tokens // comm.world)
        self.residual = self._pad(h)[comm.rank * rows : (comm.rank + 1) * rows]
        self.normed = h if norm is None else norm(h)
        self.ready: torch.cuda.Event | None = None

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, -self.tokens % self.comm.world))

    def sync(self, partial: torch.Tensor, norm) -> None:
        """r_i += RS(partial)_i;  U = AG(norm(r_i)), or AG(r_i) when ``norm`` is None."""
        self.residual, gathered = self._sync(self._pad(partial), self.residual, norm)
        self.normed = gathered[: self.tokens]

    def mark_ready(self) -> None:
        if self.normed.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def wait_ready(self) -> None:
        if self.ready is not None:
            torch.cuda.current_stream(self.normed.device).wait_event(self.ready)
            self.ready = None


def fused_layers(modules, h, comm, ctx, fused: bool):
    """The modules with reduce-scatter/RMSNorm/all-gather syncs on one stream; returns the full
    residual stream."""
    if not modules:
        return h
    stream = ScatteredStream(h, ctx, modules[0].norm, comm, fused)
    for run, norm in steps(modules):
        stream.sync(run(stream.normed, ctx), norm)
    return stream.normed


@register("seqpar")
@dataclass
class SeqPar(Strategy):
    fused: bool = True  # each sync one comm.fused_sync (false: always the separate collectives)

    def run_layers(self, layers, h, comm, ctx):
        return fused_layers(self.stack(layers), h, comm, ctx, self.fused)
