"""What each op costs on the device: modes that price the ops a forward pass runs on the virtual clock.

Every aten op the model and the strategy run passes through ``CostMode``:

- views and metadata ops (their schema returns an alias of an input: ``view``, ``transpose``,
  ``slice``, ...) and uninitialised allocations cost nothing;
- matmuls (``mm``, ``addmm``, ``bmm``, ``baddbmm``) are GEMMs: FLOPs from ``torch.utils.flop_counter``'s
  registry, bytes from the operands' sizes, M = the output rows;
- ``F.scaled_dot_product_attention`` is priced as the attention kernel the regime runs
  (``suite.latency.simulation.attention``);
- everything else (pointwise ops, norms, reductions, indexing, copies) is an elementwise kernel
  costed by the bytes it reads and writes (a gather reads what it gathers, a scatter writes what it
  scatters, an input broadcast along a dimension is read once);
- reading a value back to the host (``.item()``, ``bool(t)``) makes the host wait for the device.

How ops become kernels is the cell's kernel regime (``suite.latency.kernel_regime``, data beside the
device and interconnect profiles): it picks one elementwise and one GEMM pricing policy when the mode is
built (``suite.latency.simulation.fusion``: one kernel per op or fused runs; separate or merged GEMMs).
Ops on meta tensors are not run: their outputs are made from the shapes they gave before
(``suite.latency.simulation.shapes``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakTensorKeyDictionary

from suite.latency.kernel_regime import KernelRegime, load_regime
from suite.latency.simulation.attention import AttentionMode
from suite.latency.simulation.clock import Buffer, Timeline
from suite.latency.simulation.fusion import policies
from suite.latency.simulation.shapes import MetaShapes, tensor_bytes, tensors

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}
HOST_READS = {aten._local_scalar_dense}
METADATA = {aten._unsafe_view}  # a view whose schema does not say so


def _plan(func) -> tuple[str, tuple[tuple[int, str], ...]]:
    """How an op is priced, and which of its arguments it writes in place (position, name)."""
    schema, packet = func._schema, func._overloadpacket
    written = tuple(
        (i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
    )
    if packet in HOST_READS:
        return "host_read", written
    if packet in METADATA or any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return "view", written
    if packet in ALLOCATIONS:
        return "allocation", written
    return ("gemm" if packet in GEMMS else "elementwise"), written


class CostMode(TorchDispatchMode):
    """Prices every op on ``clock`` with its device profile (use ``with cost.active():``)."""

    def __init__(self, clock: Timeline, regime: KernelRegime | str = "eager"):
        super().__init__()
        self.clock, self.device = clock, clock.device
        self.regime = load_regime(regime) if isinstance(regime, str) else regime
        self.gemms, self.elementwise = policies(self.regime, self)
        self.phase, self.filled, self.cache_len = "prefill", None, None  # the step's attention (``step_keys``)
        self.buffers = WeakTensorKeyDictionary()  # tensor -> Buffer (views share their base's)
        self.paused = False
        self._plans: dict = {}  # op -> (kind, written arguments)
        self._shapes = MetaShapes()
        self._flops: dict = {}  # (op, input signature) -> GEMM FLOPs
        clock.barriers.append(self.flush)

    @contextmanager
    def active(self):
        with AttentionMode(self), self:
            yield

    @contextmanager
    def pause(self):
        """Ops inside cost nothing (moving the host-built context to the meta device)."""
        self.paused, before = True, self.paused
        try:
            yield
        finally:
            self.paused = before

    def start_step(self, phase: str = "prefill", filled: int | None = None, cache_len: int | None = None) -> None:
        """A new step from idle: the clock restarts, and what earlier steps wrote is ready. ``phase``
        (prefill or decode) picks the regime's attention; ``filled`` and ``cache_len`` are the cache
        positions written by the end of the step and the static cache's length (None: as the model passes)."""
        self.phase, self.filled, self.cache_len = phase, filled, cache_len
        self.flush()
        self.clock.reset()
        for buffer in self.buffers.values():
            buffer.ready = 0.0

    def flush(self) -> None:
        """Issue the kernels still waiting to be fused or merged, the GEMM first (before anything that
        orders work across streams)."""
        self.gemms.flush()
        self.elementwise.flush()

    # ---------------------------------------------------------------- buffers

    def track(self, t: torch.Tensor) -> None:
        """Follow ``t``, made outside the mode (a KV cache): its writes set when it is ready. Its bytes
        are not live activation memory (they are counted with the cache)."""
        self.buffers[t] = Buffer(tensor_bytes(t), 0.0, None)

    def ready(self, *groups) -> float:
        """When the last writer of any of the tensors in ``groups`` (tensors, or lists of them) ends."""
        return self.latest(tensors(groups))

    def latest(self, inputs: list[torch.Tensor]) -> float:
        """When the last writer of any of ``inputs`` ends."""
        latest, get = 0.0, self.buffers.get
        for t in inputs:
            buffer = get(t)
            if buffer is not None and buffer.ready > latest:
                latest = buffer.ready
        return latest

    def output(self, t: torch.Tensor, ready: float) -> Buffer:
        """``t`` is a new buffer, written by work that ends at ``ready``."""
        buffer = self.buffers[t] = Buffer(tensor_bytes(t), ready, self.clock)
        return buffer

    def written_at(self, t: torch.Tensor, end: float) -> None:
        """``t`` was written in place by work that ends at ``end``."""
        buffer = self.buffers.get(t)
        if buffer is None:
            buffer = self.buffers[t] = Buffer(0, end, None)
        buffer.ready = end

    def finished(self, end: float, *groups) -> None:
        """The tensors in ``groups`` were written by work that ends at ``end`` (a collective)."""
        for t in tensors(groups):
            self.written_at(t, end)

    # ---------------------------------------------------------------- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plan = self._plans.get(func)
        if plan is None:
            plan = self._plans[func] = _plan(func)
        kind, writes = plan
        inputs = tensors(args, kwargs)
        written = [t for i, name in writes for t in tensors([args[i] if i < len(args) else kwargs.get(name)])]
        key = None
        if not inputs or kind == "view" or any(t.device.type != "meta" for t in inputs):
            out = func(*args, **kwargs)
        elif written:  # nothing to compute on meta tensors: the written argument is the result
            out = written[0] if len(written) == 1 else tuple(written)
        else:
            out, key = self._shapes.run(func, args, kwargs)
        if not self.paused:
            self._price(func, kind, key, args, kwargs, inputs, written, out)
        return out

    def _price(self, func, kind, key, args, kwargs, inputs, written, out) -> None:
        if kind == "host_read":
            self.clock.sync_host()
            return
        outs = tensors(out if isinstance(out, (list, tuple)) else [out])
        if kind == "view":
            base = self.buffers.get(inputs[0]) if inputs else None
            if base is not None:
                for t in outs:
                    self.buffers[t] = base
            return
        if kind == "allocation":
            for t in outs:
                self.output(t, 0.0)
            return
        packet = func._overloadpacket
        if kind == "gemm":
            flops = self._flops.get(key) if key is not None else None
            if flops is None:
                flops = flop_registry[packet](*args, **kwargs, out_val=out)
                if key is not None:
                    self._flops[key] = flops
            self.gemms.price(packet, flops, args, out, inputs)
        else:
            self.elementwise.price(packet, inputs, outs, written)
