"""How the regime turns ops into kernels: two pricing policies for elementwise ops, two for GEMMs.

A ``CostMode`` holds one of each, chosen from its kernel regime when it is built, and each prices on that
mode's buffers, clock and device:

- elementwise (``elementwise:``): ``PerOpKernels`` issues one kernel per op (PyTorch eager, and eager
  kernels captured in a CUDA graph); ``FusedRuns`` makes each run of consecutive elementwise ops between
  two other kernels one kernel that reads what it takes from outside the run and writes what outlives
  it (Inductor, or an implementation's hand-fused kernels);
- GEMMs (``merged_gemms:``): ``SeparateGemms`` issues each GEMM; ``MergedGemms`` makes back-to-back
  GEMMs that read the same input one GEMM (a fused QKV projection).

Bytes of an elementwise op: a gather reads what it gathers, a scatter and an overwrite read their source
only; everything else reads its inputs and writes its outputs.
"""

from __future__ import annotations

import math
import weakref

import torch

from suite.latency.kernel_regime import KernelRegime
from suite.latency.simulation.clock import Buffer
from suite.latency.simulation.shapes import tensor_bytes

aten = torch.ops.aten
GATHERS = {aten.embedding, aten.index_select, aten.index, aten.gather}
SCATTERS = {
    aten.index_copy_,
    aten.index_copy,
    aten.index_put_,
    aten.index_put,
    aten.scatter_,
    aten.scatter,
    aten.index_add_,
}
OVERWRITES = {aten.copy_, aten.fill_, aten.zero_}


# ---------------------------------------------------------------- GEMMs


class SeparateGemms:
    """Every GEMM is its own kernel, issued after what waits to be fused."""

    pending: tuple[Buffer, ...] = ()  # outputs of a GEMM not yet issued: none

    def __init__(self, cost):
        self.cost = cost

    def price(self, packet, flops: float, args, out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        cost = self.cost
        nbytes = sum(map(tensor_bytes, inputs)) + tensor_bytes(out)
        rows, float32 = out.numel() // out.shape[-1], out.dtype == torch.float32
        cost.flush()
        seconds = cost.device.kernel_seconds("gemm", flops, nbytes, rows=rows, float32=float32)
        cost.output(out, cost.clock.kernel(seconds, cost.latest(inputs)))

    def flush(self) -> None:
        """Nothing waits."""


class _Gemm:
    """A GEMM waiting for the next one, in case it reads the same input."""

    def __init__(self, buffer, source, flops, nbytes, rows, float32, ready, outputs):
        self.buffer, self.source, self.flops, self.nbytes, self.rows = buffer, source, flops, nbytes, rows
        self.float32, self.ready, self.outputs = float32, ready, outputs


class MergedGemms:
    """A GEMM waits for the next: one that reads the same input (the same rows) widens it into one GEMM."""

    def __init__(self, cost):
        self.cost = cost
        self._gemm: _Gemm | None = None

    @property
    def pending(self) -> list[Buffer]:
        """Outputs of the GEMM not yet issued (ready once it is)."""
        return self._gemm.outputs if self._gemm else []

    def price(self, packet, flops: float, args, out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        cost = self.cost
        nbytes = sum(map(tensor_bytes, inputs)) + tensor_bytes(out)
        rows, float32 = out.numel() // out.shape[-1], out.dtype == torch.float32
        activation = args[1] if packet in (aten.addmm, aten.baddbmm) else args[0]
        # the buffer itself, not its id: a buffer that died may leave its id to a new one
        buffer = cost.buffers.get(activation)
        source = (tuple(activation.shape), activation.stride(), activation.storage_offset())
        pending = self._gemm
        if (
            pending is not None
            and buffer is not None
            and pending.buffer is buffer
            and pending.source == source
            and pending.rows == rows
        ):  # one GEMM, wider
            # (an elementwise run on the first GEMM's output, e.g. SiLU(gate) before up, stays open)
            pending.flops += flops
            pending.nbytes += nbytes - tensor_bytes(activation)
            pending.ready = max(pending.ready, cost.latest(inputs))
            pending.outputs.append(cost.output(out, math.inf))
            return
        cost.flush()
        self._gemm = _Gemm(
            buffer, source, flops, nbytes, rows, float32, cost.latest(inputs), [cost.output(out, math.inf)]
        )

    def flush(self) -> None:
        """Issue the waiting GEMM."""
        pending, self._gemm = self._gemm, None
        if pending is not None:
            end = self.cost.clock.kernel(
                self.cost.device.kernel_seconds(
                    "gemm", pending.flops, pending.nbytes, rows=pending.rows, float32=pending.float32
                ),
                pending.ready,
            )
            for buffer in pending.outputs:
                buffer.ready = end


# ---------------------------------------------------------------- elementwise ops


class PerOpKernels:
    """Every elementwise op is its own kernel, issued after the waiting GEMM."""

    def __init__(self, cost):
        self.cost = cost

    def price(self, packet, inputs: list[torch.Tensor], outs: list[torch.Tensor], written) -> None:
        cost = self.cost
        fresh = [t for t in outs if not any(t is w for w in written)]
        cost.flush()
        if packet in GATHERS:
            nbytes = 2 * sum(map(tensor_bytes, outs))
        elif packet in SCATTERS:
            nbytes = 2 * sum(map(tensor_bytes, inputs[1:]))
        else:
            sources = inputs[1:] if packet in OVERWRITES else inputs
            nbytes = sum(map(tensor_bytes, sources)) + sum(map(tensor_bytes, outs))
        end = cost.clock.kernel(cost.device.kernel_seconds("elementwise", 0, nbytes), cost.latest(inputs))
        for t in fresh:
            cost.output(t, end)
        for t in written:
            cost.written_at(t, end)

    def flush(self) -> None:
        """Nothing waits."""


class _Run:
    """Elementwise ops waiting to become one fused kernel."""

    def __init__(self):
        self.read, self.written, self.ready = 0, 0, 0.0
        self.waits: list[Buffer] = []  # outputs of the pending GEMM it reads (ready once that is issued)
        self.made = weakref.WeakSet()  # the buffers the run produced or wrote (a dead one's id may be reused)
        self.outputs: list[weakref.ref] = []
        self.updated: list[Buffer] = []


class FusedRuns:
    """Consecutive elementwise ops wait to become one kernel, issued before the next other kernel."""

    def __init__(self, cost):
        self.cost = cost
        self._run: _Run | None = None

    def price(self, packet, inputs: list[torch.Tensor], outs: list[torch.Tensor], written) -> None:
        cost, buffers = self.cost, self.cost.buffers
        fresh = [t for t in outs if not any(t is w for w in written)]
        run = self._run = self._run or _Run()
        outside = [t for t in inputs if buffers.get(t) not in run.made]
        pending = cost.gemms.pending
        run.waits += [b for b in map(buffers.get, outside) if any(b is p for p in pending)]
        run.ready = max(run.ready, cost.latest([t for t in outside if buffers.get(t) not in run.waits]))
        if packet in GATHERS:
            run.read += sum(map(tensor_bytes, outs)) if outside and outside[0] is inputs[0] else 0
        elif packet in SCATTERS or packet in OVERWRITES:
            run.read += sum(tensor_bytes(t) for t in outside if t is not inputs[0])
        else:
            run.read += sum(map(tensor_bytes, outside))
        for t in fresh:
            buffer = cost.output(t, math.inf)
            run.made.add(buffer)
            run.outputs.append(weakref.ref(buffer))
        for t in written:
            cost.written_at(t, math.inf)
            run.made.add(buffers[t])
            run.updated.append(buffers[t])
            run.written += sum(map(tensor_bytes, inputs[1:])) if packet in SCATTERS else tensor_bytes(t)

    def flush(self) -> None:
        """Issue the run (after the waiting GEMM, which came first)."""
        run, self._run = self._run, None
        if run is None:
            return
        alive = [b for b in (ref() for ref in run.outputs) if b is not None]
        nbytes = run.read + run.written + sum(b.nbytes for b in alive)
        ready = max([run.ready, *(b.ready for b in run.waits)])
        end = self.cost.clock.kernel(self.cost.device.kernel_seconds("elementwise", 0, nbytes), ready)
        for buffer in alive + run.updated:
            buffer.ready = end


def policies(regime: KernelRegime, cost):
    """The GEMM and elementwise pricing policies of ``regime`` for ``cost``."""
    gemms = (MergedGemms if regime.merged_gemms else SeparateGemms)(cost)
    return gemms, (FusedRuns if regime.fused else PerOpKernels)(cost)
