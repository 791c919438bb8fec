"""Communicators: the seam between what a strategy does and where it runs.

``Communicator`` wraps torch.distributed (NCCL when every rank has its own GPU, gloo on CPU or
when ranks share a device). Every collective has a synchronous form and an async form that
returns a ``Pending`` whose ``wait()`` yields the result, so strategies can overlap a
collective with compute. The time spent waiting for collectives is accumulated in ``stats``.

``LocalGroup`` runs N ranks as threads of one process (tooling that needs every rank's view of
a model in one place); its communicators sum in-process, and autograd flows through the sums.
"""

from __future__ import annotations

import functools
import threading
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
    norm): two collectives with the add and norm between them (one region: ``RMSNorm.add_forward``); returns
    both."""
    if norm is None:
        residual = residual + comm.reduce_scatter(partial)
        return residual, comm.all_gather(residual)
    residual, normed = norm.add_forward(residual, comm.reduce_scatter(partial))
    return residual, comm.all_gather(normed)


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
        return self._run(lambda a: dist.all_reduce(x, group=self.group, async_op=a), x, async_op)

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False):
        """Rank i gets chunk i (along dim 0) of the sum over ranks; dim 0 must divide by the world size."""
        out = x.new_empty((x.shape[0] // self.world, *x.shape[1:])) if self.world > 1 else x
        return self._run(lambda a: _reduce_scatter(out, x.contiguous(), group=self.group, async_op=a), out, async_op)

    def all_gather(self, x: torch.Tensor, async_op: bool = False):
        """Concatenation over ranks along dim 0."""
        out = x.new_empty((x.shape[0] * self.world, *x.shape[1:])) if self.world > 1 else x
        return self._run(lambda a: _all_gather(out, x.contiguous(), group=self.group, async_op=a), out, async_op)

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


class _PeerFailed(RuntimeError):
    """Raised in the ranks of a ``LocalGroup`` that wait for a rank that failed."""


class LocalGroup:
    """N ranks as N threads of one process that take turns, meeting at every collective.

    ``run(fn, items)`` calls ``fn(comm, item)`` for rank i's item in thread i and returns the
    results in rank order. One rank computes at a time (so each has the process's intra-op
    threads to itself): rank i runs until its next collective, hands in its tensor and passes
    the turn to rank i + 1; the last rank computes the collective's result once from every
    rank's tensor (so autograd flows through it to every rank's input) and passes the turn back
    to rank 0. The threads inherit the caller's grad and inference mode (both are
    thread-local). Results are shared between ranks: never modify them in place.
    """

    def __init__(self, world: int):
        self.world = world
        self._turn = threading.Condition()
        self._rank = 0  # whose turn it is
        self._failed = False
        self._inputs: list = [None] * world
        self._result = None

    def _wait_turn(self, rank: int) -> None:
        with self._turn:
            self._turn.wait_for(lambda: self._rank == rank or self._failed)
            if self._failed:
                raise _PeerFailed("another rank of the local group failed")

    def _pass_turn(self, rank: int) -> None:
        with self._turn:
            self._rank = (rank + 1) % self.world
            self._turn.notify_all()

    def collective(self, rank: int, x: torch.Tensor, combine) -> torch.Tensor:
        """``combine(inputs of all ranks)``, computed once, for every rank."""
        self._inputs[rank] = x
        if rank == self.world - 1:
            self._result, self._inputs = combine(self._inputs), [None] * self.world
        self._pass_turn(rank)
        self._wait_turn(rank)
        return self._result

    def run(self, fn, items: list) -> list:
        if len(items) != self.world:
            raise ValueError(f"LocalGroup of {self.world} ranks got {len(items)} items")
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        results, errors = [None] * self.world, {}
        self._rank, self._failed, self._inputs = 0, False, [None] * self.world

        def rank_thread(rank: int) -> None:
            try:
                self._wait_turn(rank)
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    results[rank] = fn(LocalCommunicator(rank, self.world, self), items[rank])
                self._pass_turn(rank)
            except BaseException as exc:  # release the ranks waiting for this one
                errors[rank] = exc
                with self._turn:
                    self._failed = True
                    self._turn.notify_all()

        threads = [threading.Thread(target=rank_thread, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self._inputs = [None] * self.world
            raise next((e for e in errors.values() if not isinstance(e, _PeerFailed)), errors[min(errors)])
        return results


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(torch.add, tensors)  # in rank order


@dataclass
class LocalCommunicator(Communicator):
    """Rank ``rank`` of a ``LocalGroup`` (``group``): collectives computed in-process."""

    def all_reduce(self, x: torch.Tensor, async_op: bool = False):
        out = self.group.collective(self.rank, x, _sum)
        return Pending(out) if async_op else out

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False):
        out = self.group.collective(self.rank, x, _sum).chunk(self.world)[self.rank]
        return Pending(out) if async_op else out

    def all_gather(self, x: torch.Tensor, async_op: bool = False):
        out = self.group.collective(self.rank, x, torch.cat)
        return Pending(out) if async_op else out
