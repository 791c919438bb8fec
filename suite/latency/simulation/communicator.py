"""The simulated communicator: collectives cost their modelled time on the virtual clock's link."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from suite.latency.interconnect import FUSED_SYNC, Profile, ProfileError
from suite.latency.simulation.costing import CostMode
from suite.parallel.comm import Communicator, Pending


class _Completion:
    """``Pending.wait()``: the current stream waits for the collective's end (as NCCL's ``work.wait()``)."""

    def __init__(self, cost: CostMode, end: float):
        self.cost, self.end = cost, end

    def wait(self) -> None:
        self.cost.clock.wait(self.end)


@dataclass
class SimulatedCommunicator(Communicator):
    """Stands for rank ``rank`` of ``world`` on a virtual clock: each collective costs
    ``profile.seconds(collective, world, bytes, launch)`` on the link and moves no data.

    Results have the real shapes (all-reduce: the local partial; reduce-scatter: a chunk; all-gather:
    ``world`` times the rows), so strategies run unchanged. ``fused_sync`` is one communication op,
    TokenWeave's fused reduce-scatter + residual add + RMSNorm + all-gather kernel, where the
    profile has that kernel (multimem); elsewhere its parts run one by one.
    """

    profile: Profile | None = None
    cost: CostMode | None = None
    carries_data: ClassVar[bool] = False

    def __post_init__(self):
        if self.profile is None or self.cost is None:
            raise ProfileError("a simulated communicator needs an interconnect profile and a cost mode")

    def _collective(
        self,
        collective: str,
        nbytes: int,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        async_op: bool = False,
    ):
        clock = self.cost.clock
        self.cost.flush()  # the kernels that make the inputs are issued first
        end = clock.collective(
            self.profile.seconds(collective, self.world, nbytes, clock.launch), self.cost.ready(*inputs)
        )
        self.cost.finished(end, *outputs)
        result = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if async_op:
            return Pending(result, _Completion(self.cost, end))
        clock.wait(end)
        return result

    def all_reduce(self, x: torch.Tensor, async_op: bool = False):
        if self.world == 1:
            return Pending(x) if async_op else x
        return self._collective("all_reduce", x.numel() * x.element_size(), [x], [x], async_op)

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False):
        if self.world == 1:
            return Pending(x) if async_op else x
        out = x.new_empty((x.shape[0] // self.world, *x.shape[1:]))
        return self._collective("reduce_scatter", x.numel() * x.element_size(), [x], [out], async_op)

    def all_gather(self, x: torch.Tensor, async_op: bool = False):
        if self.world == 1:
            return Pending(x) if async_op else x
        out = x.new_empty((x.shape[0] * self.world, *x.shape[1:]))
        return self._collective("all_gather", out.numel() * out.element_size(), [x], [out], async_op)

    def fused_sync(self, partial: torch.Tensor, residual: torch.Tensor, norm=None):
        if self.world == 1 or not self.profile.has_fused_sync:
            return super().fused_sync(partial, residual, norm)
        synced = residual.new_empty(residual.shape)
        gathered = residual.new_empty((residual.shape[0] * self.world, *residual.shape[1:]))
        return self._collective(
            FUSED_SYNC, partial.numel() * partial.element_size(), [partial, residual], [synced, gathered]
        )

    def side_stream(self, device: torch.device):
        return self.cost.clock.side_stream()
