"""Communicators: the seam between what a strategy does and where it runs.

``Communicator`` wraps torch.distributed (NCCL when every rank has its own GPU, gloo on CPU or
when ranks share a device). Every collective has a synchronous form and an async form that
returns a ``Pending`` whose ``wait()`` yields the result, so strategies can overlap a
collective with compute. Time spent inside collectives is accumulated in ``stats``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor collectives (the old names warn); older releases have only those.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommStats:
    """Wall time spent blocked in collectives (sync calls and ``wait()``), and their count."""

    seconds: float = 0.0
    calls: int = 0
    enabled: bool = False

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


class Pending:
    """An in-flight collective; ``wait()`` returns its result."""

    def __init__(self, result: torch.Tensor, work=None, stats: CommStats | None = None):
        self._result, self._work, self._stats = result, work, stats

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            timed = self._stats is not None and self._stats.enabled
            start = time.perf_counter() if timed else 0.0
            self._work.wait()
            if timed:
                self._stats.seconds += time.perf_counter() - start
            self._work = None
        return self._result


@dataclass
class Communicator:
    """Collectives over a torch.distributed process group (world of 1: identities)."""

    rank: int = 0
    world: int = 1
    group: object = None
    stats: CommStats = field(default_factory=CommStats)
    carries_data: ClassVar[bool] = True  # False: collectives only model their cost (outputs are meaningless)

    @classmethod
    def from_process_group(cls, group=None) -> Communicator:
        if not dist.is_initialized():
            return cls()
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def _run(self, op, out: torch.Tensor, async_op: bool):
        if self.world == 1:
            return Pending(out) if async_op else out
        if self.stats.enabled:
            self.stats.calls += 1
        if async_op:
            return Pending(out, op(True), self.stats)
        start = time.perf_counter() if self.stats.enabled else 0.0
        op(False)
        if self.stats.enabled:
            self.stats.seconds += time.perf_counter() - start
        return out

    def all_reduce(self, x: torch.Tensor, async_op: bool = False):
        """Sum of ``x`` over ranks (in place)."""
        return self._run(lambda a: dist.all_reduce(x, group=self.group, async_op=a),
                         x, async_op)

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False):
        """Rank i gets chunk i (along dim 0) of the sum over ranks; dim 0 must divide by the world size."""
        out = x.new_empty((x.shape[0] // self.world, *x.shape[1:])) if self.world > 1 else x
        return self._run(lambda a: _reduce_scatter(out, x.contiguous(), group=self.group, async_op=a),
                         out, async_op)

    def all_gather(self, x: torch.Tensor, async_op: bool = False):
        """Concatenation over ranks along dim 0."""
        out = x.new_empty((x.shape[0] * self.world, *x.shape[1:])) if self.world > 1 else x
        return self._run(lambda a: _all_gather(out, x.contiguous(), group=self.group, async_op=a),
                         out, async_op)

    def fused_sync(self, partial: torch.Tensor, residual: torch.Tensor, norm=None):
        """TokenWeave's sync of a token-sharded residual: ``residual_i += RS(partial)_i``, then
        ``AG(norm(residual_i))`` (``AG(residual_i)`` without a norm); returns both. Here the two
        collectives with the add and norm between them; a modelled communicator may cost it as one
        fused kernel (``fused_sync`` in an interconnect profile)."""
        residual = residual + self.reduce_scatter(partial)
        return residual, self.all_gather(residual if norm is None else norm(residual))

    def side_stream(self, device: torch.device):
        """A context running work on a second stream (CUDA), or inline where streams do not exist."""
        if device.type != "cuda":
            return nullcontext()
        if not hasattr(self, "_stream"):
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(self._stream)
