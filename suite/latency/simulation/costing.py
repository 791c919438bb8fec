"""What each op costs on the device: modes that price the ops a forward pass runs on the virtual clock.

Every aten op the model and the strategy run passes through ``CostMode``:

- views and metadata ops (their schema returns an alias of an input: ``view``, ``transpose``,
  ``slice``, ...) and uninitialised allocations cost nothing;
- matmuls (``mm``, ``addmm``, ``bmm``, ``baddbmm``) are GEMMs: FLOPs from ``torch.utils.flop_counter``'s
  registry, bytes from the operands' sizes, M = the output rows;
- ``F.scaled_dot_product_attention`` is composite (it decomposes before a dispatch mode sees it), so a
  function mode prices it as the attention kernel the regime runs (below): FLOPs from the flop counter's
  SDPA formula, times the share of query/key pairs a causal kernel computes; an explicit mask does not
  shorten the work; its output has the [batch, length, heads, dim] layout fused kernels write;
- everything else (pointwise ops, norms, reductions, indexing, copies) is an elementwise kernel
  costed by the bytes it reads and writes (a gather reads what it gathers, a scatter writes what it
  scatters, an input broadcast along a dimension is read once);
- reading a value back to the host (``.item()``, ``bool(t)``) makes the host wait for the device.

How ops become kernels is the cell's kernel regime (``suite.latency.kernel_regime``, data beside the
device and interconnect profiles): ``elementwise: per_op`` issues one kernel per op (PyTorch eager, and
eager kernels captured in a CUDA graph); ``elementwise: fused`` makes each run of consecutive elementwise
ops between two other kernels one kernel that reads what it takes from outside the run and writes what
outlives it (Inductor, or an implementation's hand-fused kernels); ``merged_gemms`` makes back-to-back
GEMMs that read the same input one GEMM (a fused QKV projection). Attention is priced as the regime's
kernel runs it, whatever the model's code passes: over the filled cache or the whole static cache, with
the causal pairs skipped or an explicit mask read, and K/V shared by the query heads or copied to them.

Tensors on the meta device carry no data, so their ops are not run: an op's outputs are made from
the shapes it gave the first time it saw inputs of the same shapes (every layer repeats them).
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count
from torch.utils.weak import WeakTensorKeyDictionary

from suite.latency.kernel_regime import KernelRegime, load_regime
from suite.latency.simulation.clock import Buffer, Timeline

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
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
ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}
HOST_READS = {aten._local_scalar_dense}
METADATA = {aten._unsafe_view}  # a view whose schema does not say so


def _tensors(*groups) -> list[torch.Tensor]:
    """The tensors among the values of ``groups`` (aten arguments: tensors, or lists of them)."""
    out = []
    for group in groups:
        for x in group.values() if isinstance(group, dict) else group:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, (list, tuple)):
                out += [y for y in x if isinstance(y, torch.Tensor)]
    return out


def _meta_like(spec):
    """A result rebuilt from its recorded shapes: a tensor, or a tuple/list of results and constants."""
    if isinstance(spec, _Shape):
        return torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="meta")
    if isinstance(spec, (list, tuple)):
        return type(spec)(_meta_like(x) for x in spec)
    return spec


class _Shape:
    __slots__ = ("shape", "stride", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype = tuple(t.shape), t.stride(), t.dtype


def _shapes(result):
    if isinstance(result, torch.Tensor):
        return _Shape(result)
    if isinstance(result, (list, tuple)):
        return type(result)(_shapes(x) for x in result)
    return result


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read or write ``t``: a dimension broadcast with stride 0 counts once."""
    if t.is_contiguous():
        return t.numel() * t.element_size()
    if t.numel() == 0:
        return 0
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride) * t.element_size()


def _signature(values) -> tuple:
    return tuple(
        (v.shape, v.stride(), v.dtype, v.device.type)
        if isinstance(v, torch.Tensor)
        else _signature(v)
        if isinstance(v, (list, tuple))
        else v
        for v in values
    )


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


def lower_right_share(q_len: int, k_len: int) -> float:
    """Share of the pairs kept when the last of ``q_len`` queries sees all ``k_len`` keys (a chunk, or a
    decode token, attending to the cache before it)."""
    hidden = max(q_len - k_len, 0)  # leading queries that see no key
    seen = q_len - hidden  # the others see k_len - seen + 1 .. k_len keys
    return (seen * (k_len - seen) + seen * (seen + 1) / 2) / (q_len * k_len)


class _Run:
    """Elementwise ops waiting to become one fused kernel (``elementwise: fused``)."""

    def __init__(self):
        self.read, self.written, self.ready = 0, 0, 0.0
        self.waits: list[Buffer] = []  # outputs of the pending GEMM it reads (ready once that is issued)
        self.made = weakref.WeakSet()  # the buffers the run produced or wrote (a dead one's id may be reused)
        self.outputs: list[weakref.ref] = []
        self.updated: list[Buffer] = []


class _Gemm:
    """A GEMM waiting for the next one, in case it reads the same input (``merged_gemms``)."""

    def __init__(self, buffer, source, flops, nbytes, rows, float32, ready, outputs):
        self.buffer, self.source, self.flops, self.nbytes, self.rows = buffer, source, flops, nbytes, rows
        self.float32, self.ready, self.outputs = float32, ready, outputs


class _Attention(TorchFunctionMode):
    def __init__(self, cost: CostMode):
        super().__init__()
        self.cost = cost

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and not self.cost.paused:
            return self.cost.attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class CostMode(TorchDispatchMode):
    """Prices every op on ``clock`` with its device profile (use ``with cost.active():``)."""

    def __init__(self, clock: Timeline, regime: KernelRegime | str = "eager"):
        super().__init__()
        self.clock, self.device = clock, clock.device
        self.regime = load_regime(regime) if isinstance(regime, str) else regime
        self.phase, self.filled, self.cache_len = "prefill", None, None  # the step's attention (``step_keys``)
        self.buffers = WeakTensorKeyDictionary()  # tensor -> Buffer (views share their base's)
        self.paused = False
        self._plans: dict = {}  # op -> (kind, written arguments)
        self._shapes: dict = {}  # (op, input signature) -> output shapes
        self._flops: dict = {}  # (op, input signature) -> GEMM FLOPs
        self._run: _Run | None = None
        self._gemm: _Gemm | None = None
        clock.barriers.append(self.flush)

    @contextmanager
    def active(self):
        with _Attention(self), self:
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

    # ---------------------------------------------------------------- buffers

    def track(self, t: torch.Tensor) -> None:
        """Follow ``t``, made outside the mode (a KV cache): its writes set when it is ready. Its bytes
        are not live activation memory (they are counted with the cache)."""
        self.buffers[t] = Buffer(tensor_bytes(t), 0.0, None)

    def ready(self, *tensors) -> float:
        """When the last writer of any of ``tensors`` (or lists of them) ends."""
        return self._latest(_tensors(tensors))

    def _latest(self, tensors: list[torch.Tensor]) -> float:
        latest, get = 0.0, self.buffers.get
        for t in tensors:
            buffer = get(t)
            if buffer is not None and buffer.ready > latest:
                latest = buffer.ready
        return latest

    def _output(self, t: torch.Tensor, ready: float) -> Buffer:
        buffer = self.buffers[t] = Buffer(tensor_bytes(t), ready, self.clock)
        return buffer

    def _written_at(self, t: torch.Tensor, end: float) -> None:
        buffer = self.buffers.get(t)
        if buffer is None:
            buffer = self.buffers[t] = Buffer(0, end, None)
        buffer.ready = end

    def finished(self, end: float, *tensors) -> None:
        """``tensors`` were written by work that ends at ``end`` (a collective)."""
        for t in _tensors(tensors):
            self._written_at(t, end)

    # ---------------------------------------------------------------- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plan = self._plans.get(func)
        if plan is None:
            plan = self._plans[func] = _plan(func)
        kind, writes = plan
        inputs = _tensors(args, kwargs)
        written = [t for i, name in writes for t in _tensors([args[i] if i < len(args) else kwargs.get(name)])]
        key = None
        if not inputs or kind == "view" or any(t.device.type != "meta" for t in inputs):
            out = func(*args, **kwargs)
        elif written:  # nothing to compute on meta tensors: the written argument is the result
            out = written[0] if len(written) == 1 else tuple(written)
        else:
            try:
                key = (func, _signature(args), _signature(kwargs.values()), tuple(kwargs))
                shapes = self._shapes.get(key)
            except TypeError:  # an unhashable argument: run the op
                shapes = None
            out = func(*args, **kwargs) if shapes is None else _meta_like(shapes)
            if shapes is None and key is not None:
                self._shapes[key] = _shapes(out)
        if not self.paused:
            self._price(func, kind, key, args, kwargs, inputs, written, out)
        return out

    def _price(self, func, kind, key, args, kwargs, inputs, written, out) -> None:
        if kind == "host_read":
            self.clock.sync_host()
            return
        outs = _tensors(out if isinstance(out, (list, tuple)) else [out])
        if kind == "view":
            base = self.buffers.get(inputs[0]) if inputs else None
            if base is not None:
                for t in outs:
                    self.buffers[t] = base
            return
        if kind == "allocation":
            for t in outs:
                self._output(t, 0.0)
            return
        packet = func._overloadpacket
        if kind == "gemm":
            flops = self._flops.get(key) if key is not None else None
            if flops is None:
                flops = flop_registry[packet](*args, **kwargs, out_val=out)
                if key is not None:
                    self._flops[key] = flops
            self._price_gemm(packet, flops, args, out, inputs)
        else:
            self._price_elementwise(packet, inputs, outs, written)

    # ---------------------------------------------------------------- GEMMs

    def _price_gemm(self, packet, flops: float, args, out, inputs) -> None:
        nbytes = sum(map(tensor_bytes, inputs)) + tensor_bytes(out)
        rows, float32 = out.numel() // out.shape[-1], out.dtype == torch.float32
        if not self.regime.merged_gemms:
            self._flush_run()
            seconds = self.device.kernel_seconds("gemm", flops, nbytes, rows=rows, float32=float32)
            self._output(out, self.clock.kernel(seconds, self._latest(inputs)))
            return
        activation = args[1] if packet in (aten.addmm, aten.baddbmm) else args[0]
        # the buffer itself, not its id: a buffer that died may leave its id to a new one
        buffer = self.buffers.get(activation)
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
            pending.ready = max(pending.ready, self._latest(inputs))
            pending.outputs.append(self._output(out, math.inf))
            return
        self._flush_run()
        self._gemm = _Gemm(
            buffer, source, flops, nbytes, rows, float32, self._latest(inputs), [self._output(out, math.inf)]
        )

    def _flush_gemm(self) -> None:
        pending, self._gemm = self._gemm, None
        if pending is not None:
            end = self.clock.kernel(
                self.device.kernel_seconds(
                    "gemm", pending.flops, pending.nbytes, rows=pending.rows, float32=pending.float32
                ),
                pending.ready,
            )
            for buffer in pending.outputs:
                buffer.ready = end

    # ---------------------------------------------------------------- elementwise kernels

    def _price_elementwise(self, packet, inputs, outs, written) -> None:
        """Bytes read and written: a gather reads what it gathers, a scatter and an overwrite read their
        source only; everything else reads its inputs and writes its outputs."""
        fresh = [t for t in outs if not any(t is w for w in written)]
        if not self.regime.fused:
            self._flush_gemm()
            if packet in GATHERS:
                nbytes = 2 * sum(map(tensor_bytes, outs))
            elif packet in SCATTERS:
                nbytes = 2 * sum(map(tensor_bytes, inputs[1:]))
            else:
                sources = inputs[1:] if packet in OVERWRITES else inputs
                nbytes = sum(map(tensor_bytes, sources)) + sum(map(tensor_bytes, outs))
            end = self.clock.kernel(self.device.kernel_seconds("elementwise", 0, nbytes), self._latest(inputs))
            for t in fresh:
                self._output(t, end)
            for t in written:
                self._written_at(t, end)
            return
        run = self._run = self._run or _Run()
        outside = [t for t in inputs if self.buffers.get(t) not in run.made]
        pending = self._gemm.outputs if self._gemm else []
        run.waits += [b for b in map(self.buffers.get, outside) if any(b is p for p in pending)]
        run.ready = max(run.ready, self._latest([t for t in outside if self.buffers.get(t) not in run.waits]))
        if packet in GATHERS:
            run.read += sum(map(tensor_bytes, outs)) if outside and outside[0] is inputs[0] else 0
        elif packet in SCATTERS or packet in OVERWRITES:
            run.read += sum(tensor_bytes(t) for t in outside if t is not inputs[0])
        else:
            run.read += sum(map(tensor_bytes, outside))
        for t in fresh:
            buffer = self._output(t, math.inf)
            run.made.add(buffer)
            run.outputs.append(weakref.ref(buffer))
        for t in written:
            self._written_at(t, math.inf)
            run.made.add(self.buffers[t])
            run.updated.append(self.buffers[t])
            run.written += sum(map(tensor_bytes, inputs[1:])) if packet in SCATTERS else tensor_bytes(t)

    def _flush_run(self) -> None:
        """Issue the pending GEMM (it came first), then the run."""
        self._flush_gemm()
        run, self._run = self._run, None
        if run is None:
            return
        alive = [b for b in (ref() for ref in run.outputs) if b is not None]
        nbytes = run.read + run.written + sum(b.nbytes for b in alive)
        ready = max([run.ready, *(b.ready for b in run.waits)])
        end = self.clock.kernel(self.device.kernel_seconds("elementwise", 0, nbytes), ready)
        for buffer in alive + run.updated:
            buffer.ready = end

    def flush(self) -> None:
        """Issue the kernels still waiting to be fused (before anything that orders work across streams)."""
        self._flush_run()

    # ---------------------------------------------------------------- attention

    def attention(
        self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        """``F.scaled_dot_product_attention`` as the regime's attention kernel runs it; returns an output of
        the right shape.

        ``filled`` keys: the positions written so far, the causal pairs skipped (an explicit mask: read,
        every pair computed); ``static_cache`` keys: every slot of the static cache. Repeated K/V heads
        are one copy kernel (read the shared heads, write one per query head) before the attention."""
        batch, heads, q_len, head_dim = query.shape
        keys, mask = self.regime.attention[self.phase]
        if keys == "filled":  # a prefill chunk passes its own keys; decode may pass the whole cache
            k_len = min(self.filled or key.shape[-2], key.shape[-2])
        else:
            k_len = self.regime.static_cache_len(self.cache_len or key.shape[-2])
        out = query.new_empty((batch, q_len, heads, value.shape[-1])).transpose(1, 2)
        share = lower_right_share(q_len, k_len) if mask == "causal" else 1.0
        kv_heads, size = key.shape[1], key.element_size()
        kv_bytes = 2 * batch * kv_heads * k_len * head_dim * size
        self.flush()
        ready = self.ready(query, key, value)
        if self.regime.kv_heads == "repeated" and kv_heads != heads:
            repeated = kv_bytes * heads // kv_heads
            ready = self.clock.kernel(self.device.kernel_seconds("elementwise", 0, kv_bytes + repeated), ready)
            kv_bytes = repeated
        mask_bytes = q_len * k_len if mask == "explicit" else 0  # a boolean mask broadcast over rows and heads
        flops = (
            sdpa_flop_count(
                (batch, heads, q_len, head_dim), (batch, heads, k_len, head_dim), (batch, heads, k_len, value.shape[-1])
            )
            * share
        )
        nbytes = 2 * tensor_bytes(query) + kv_bytes + mask_bytes
        end = self.clock.kernel(
            self.device.kernel_seconds("attention", flops, nbytes, keys=k_len, causal=share < 1), ready
        )
        self.buffers[out].ready = end
        return out
