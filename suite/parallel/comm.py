"""Communicators: the seam between what a strategy does and where it runs.

``Communicator`` wraps torch.distributed (NCCL when every rank has its own GPU, gloo on CPU or
when ranks share a device). Every collective has a synchronous form and an async form that
returns a ``Pending`` whose ``wait()`` yields the result, so strategies can overlap a
collective with compute. The time spent waiting for collectives is accumulated in ``stats``.
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
    """Time spent waiting for collectives (sync calls and ``wait()``), and their count.

    On a CPU the host is blocked while a collective runs: its wall time is the waiting time. On a
    GPU collectives are asynchronous to the host (its time would only be the enqueue): the waiting
    time is the span between two CUDA events recorded on the stream that waits, before the
    collective (or its ``wait()``) and after it, i.e. how long that stream stood still for it.
    ``total()`` reads the spans (one synchronisation). Collectives captured in a CUDA graph are
    not timed (events inside a graph do not time its replays).
    """

    seconds: float = 0.0
    calls: int = 0
    enabled: bool = False
    spans: list = field(default_factory=list)  # (start, end) CUDA events not yet read

    def reset(self) -> None:
        self.seconds, self.calls, self.spans = 0.0, 0, []

    def start(self, x: torch.Tensor):
        """A mark before waiting for a collective on ``x``'s device (None: not timed)."""
        if not self.enabled:
            return None
        if not x.is_cuda:
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, mark) -> None:
        if isinstance(mark, float):
            self.seconds += time.perf_counter() - mark
        elif mark is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((mark, end))

    def total(self) -> float:
        """Seconds spent waiting so far."""
        if self.spans:
            self.spans[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
            self.spans = []
        return self.seconds


def split_sync(comm, partial: torch.Tensor, residual: torch.Tensor, norm=None):
    """``residual_i += RS(partial)_i``, then ``AG(norm(residual_i))`` (``AG(residual_i)`` without a
    norm): two collectives with the add and norm between them; returns both."""
    residual = residual + comm.reduce_scatter(partial)
    return residual, comm.all_gather(residual if norm is None else norm(residual))


class Pending:
    """An in-flight collective; ``wait()`` returns its result."""

    def __init__(self, result: torch.Tensor, work=None, stats: CommStats | None = None):
        self._result, self._work, self._stats = result, work, stats

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            mark = self._stats.start(self._result) if self._stats is not None else None
            self._work.wait()
            if mark is not None:
                self._stats.stop(mark)
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
        mark = self.stats.start(out)
        op(False)
        self.stats.stop(mark)
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
        """TokenWeave's sync of a token-sharded residual in one kernel (multimem reduce-scatter +
        residual add + RMSNorm + all-gather); returns ``(residual_i, gathered)`` as ``split_sync``.
        torch.distributed has no such kernel (NVLS multimem is not exposed): this runs
        ``split_sync``; a modelled communicator costs it as one ``fused_sync`` collective."""
        return split_sync(self, partial, residual, norm)

    def side_stream(self, device: torch.device):
        """A context running work on a second stream (CUDA), or inline where streams do not exist."""
        if device.type != "cuda":
            return nullcontext()
        if not hasattr(self, "_stream"):
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(self._stream)
