"""Simulated cells: the strategy's own code on the heaviest rank's weightless shard, on the virtual clock.

A cell is simulated the way the runner (``suite.parallel.runner``) runs it: a prefill of the whole batch
from the host (eager launches; time to first token), then decode steps of one token per row (eager
launches, or, under ``decode_mode: cuda_graph``, two copies into the graph's inputs and one replay),
each followed by the argmax; every step starts with host and device idle, as the runner's steps do (it synchronises with
the device when it makes the step's position tensor). The cell's kernel regime (``kernels``) says which
kernels run the ops. Every decode step runs the same kernels on the same shapes but the attention's key
count: over the whole static cache it is the same at every step, over the filled part it grows by one
per step and attention work is linear in it, so one step simulated at the mean filled length
(prompt + new tokens / 2) stands for all of them.

The forward context (masks, RoPE tables) is built by the model's own code on the host (the model without
blocks and with a one-token vocabulary), priced as the device would run it, then moved to the meta device.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import torch

from suite.errors import SpdbenchError
from suite.latency.device import DeviceProfile, load_device
from suite.latency.interconnect import Profile, load_profile
from suite.latency.kernel_regime import KernelRegime, load_regime
from suite.latency.projection import heaviest_rank
from suite.latency.simulation.clock import Timeline
from suite.latency.simulation.communicator import SimulatedCommunicator
from suite.latency.simulation.costing import CostMode
from suite.latency.simulation.shapes import tensor_bytes
from suite.latency.stats import Timings, summarise
from suite.model.llama import ForwardContext, Segment, Transformer
from suite.model.sharding import build_weightless_rank_model
from suite.model.sources import DTYPES, resolve
from suite.parallel.strategy import Strategy, bound_strategy, make_strategy

GB = 1e9


@dataclasses.dataclass
class MetaSegment(Segment):
    """A segment of a context moved to the meta device. Attention is priced as the regime's kernel runs it,
    whatever mask the model passes, so a lower-right causal segment (the part of a causal prefill after a
    token split) passes none: SDPA's causal bias is a tensor subclass, which cannot be made under the
    pricing mode."""

    def attention_mask(self):
        if self.causal and self.length != self.kv_len:
            return None, False
        return super().attention_mask()


class DoesNotFit(Exception):
    """The rank's weights, KV cache and activations exceed the device's memory."""


@dataclasses.dataclass
class SimulatedStep:
    """One simulated step: its time, the part of it with a collective in flight and no compute running,
    the link time, the kernels issued and the peak of live activation bytes."""

    seconds: float
    exposed_s: float
    link_s: float
    kernels: int
    peak_bytes: int


@dataclasses.dataclass
class SimulatedGeneration:
    """A simulated prefill and decode step (every decode step of the runner costs the same)."""

    batch: int
    new_tokens: int
    prefill: SimulatedStep
    decode: SimulatedStep | None  # None when only one token is generated
    memory_bytes: dict[str, float]

    @property
    def e2e_s(self) -> float:
        return self.prefill.seconds + (self.new_tokens - 1) * (self.decode.seconds if self.decode else 0.0)

    @property
    def exposed_s(self) -> float:
        return self.prefill.exposed_s + (self.new_tokens - 1) * (self.decode.exposed_s if self.decode else 0.0)


def check_expressible(strategy: Strategy) -> None:
    """The simulation builds a rank's weightless shard from ``layout()``: a strategy that builds its
    own rank model cannot be simulated."""
    if type(strategy).load_model is not Strategy.load_model:
        raise SpdbenchError(
            f"strategy {strategy.name!r} builds its own rank model (load_model); the simulation "
            f"can only build shards from a strategy's layout()"
        )


class Simulator:
    """Simulates cells on one device profile and interconnect (the op shapes it learns are kept)."""

    def __init__(self, device: DeviceProfile, link: Profile, regime: KernelRegime | str = "eager"):
        self.device, self.link = device, link
        self.clock = Timeline(device, link.sms)
        self.cost = CostMode(self.clock, regime)
        self.regime = self.cost.regime
        self._models: dict = {}  # the last rank model: (model, dtype, tp, model key) -> (rank, shard)
        self._hosts: dict = {}  # (config, dtype) -> the model without blocks, on the host
        self._contexts: dict = {}  # (host, rows, slots, first slot, kv_len) -> (context, what it issued)

    def rank_model(self, model: str, dtype: str, tp: int, strategy: Strategy) -> tuple[int, Transformer]:
        """The heaviest rank under ``strategy``'s layout and its weightless shard (kept for the next cell)."""
        key = (model, dtype, tp, strategy.model_key())
        if key not in self._models:
            config = resolve(model).config
            layout = strategy.layout(config, tp)
            rank = heaviest_rank(config, tp, layout)
            self._models = {key: (rank, build_weightless_rank_model(config, tp, rank, DTYPES[dtype], layout))}
        return self._models[key]

    def generation(
        self,
        model: Transformer,
        strategy: Strategy,
        tp: int,
        rank: int,
        batch: int,
        prompt_len: int,
        new_tokens: int,
        decode_graph: bool,
    ) -> SimulatedGeneration:
        """Prefill ``batch`` prompts of ``prompt_len`` tokens and decode ``new_tokens``; raises DoesNotFit."""
        comm = SimulatedCommunicator(rank=rank, world=tp, profile=self.link, cost=self.cost)
        max_len = prompt_len + new_tokens
        model.setup_cache(batch, max_len)
        caches = [c for layer in model.layers for c in (layer.self_attn.k_cache, layer.self_attn.v_cache)]
        for cache in caches:
            self.cost.track(cache)
        memory = {
            "weights": float(sum(tensor_bytes(p) for p in model.parameters())),
            "kv_cache": float(sum(map(tensor_bytes, caches))),
        }
        self._check_fits(memory, tp, batch)
        host = self._host(model)

        def step(phase: str, first: int, length: int, kv_len: int, graph: bool) -> SimulatedStep:
            tokens = torch.zeros(batch * length, dtype=torch.long, device="meta")
            self.cost.start_step(phase, filled=first + length, cache_len=max_len)
            with torch.no_grad(), self.cost.active():
                if graph:  # the runner first copies the step's tokens and position into the graph's inputs
                    for t in (tokens, tokens[:1]):
                        torch.empty_like(t).copy_(t)
                with self.clock.graph_replay() if graph else nullcontext():
                    ctx = self._context(host, batch, first, length, kv_len)
                    logits = model(
                        tokens, ctx, lambda layers, h, c: strategy.run_layers(layers, h, comm, c), last_only=True
                    )
                logits.argmax(-1)
                seconds = self.clock.end()
            return SimulatedStep(
                seconds,
                self.clock.exposed_communication(),
                self.clock.communication(),
                self.clock.kernels,
                self.clock.peak,
            )

        prefill = step("prefill", 0, prompt_len, prompt_len, graph=False)
        middle = prompt_len + new_tokens // 2 - 1  # the slot whose step has the mean filled length
        decode = step("decode", middle, 1, max_len, decode_graph) if new_tokens > 1 else None
        memory["activations"] = float(max(s.peak_bytes for s in (prefill, decode) if s))
        self._check_fits(memory, tp, batch)
        return SimulatedGeneration(batch, new_tokens, prefill, decode, memory)

    def _host(self, model: Transformer) -> Transformer:
        """The model without blocks and with a one-token vocabulary, on the host: what its context code
        reads (the dtype, the RoPE tables) at no cost."""
        key = (model.config.to_json_string(), model.embed_tokens.weight.dtype)
        if key not in self._hosts:
            config = copy.copy(model.config)
            config.vocab_size = 1
            host = Transformer(config, []).to(key[1]).eval().requires_grad_(False)
            host.rotary = type(host.rotary)(config)  # float32 RoPE frequencies, as the rank model keeps them
            self._hosts[key] = host
        return self._hosts[key]

    def _context(self, host, rows: int, first: int, length: int, kv_len: int) -> ForwardContext:
        """The model's own context code for unpadded rows at slots ``first .. first + length - 1``, run on
        the host (priced as device work) and moved to meta.

        Contexts of the same shape are built once; later steps issue the same kernels again."""
        key = (id(host), rows, first, length, kv_len)
        if key in self._contexts:
            ctx, issued = self._contexts[key]
            self.clock.replay(issued)
            return ctx
        with self.cost.pause():  # the runner makes these before it starts timing
            pad, slots = torch.zeros(rows, dtype=torch.long), torch.arange(first, first + length)
        with self.clock.recording() as issued:
            ctx = host.context(pad, slots, kv_len)
        with self.cost.pause():
            ctx = ForwardContext(
                [
                    MetaSegment(
                        **vars(s)
                        | dict(
                            slots=s.slots.to("meta"),
                            cos=s.cos.to("meta"),
                            sin=s.sin.to("meta"),
                            mask=None if s.mask is None else s.mask.to("meta"),
                        )
                    )
                    for s in ctx.segments
                ]
            )
        self._contexts[key] = ctx, issued
        return ctx

    def _check_fits(self, memory: dict[str, float], tp: int, batch: int) -> None:
        need = sum(memory.values())
        if need > self.device.memory_bytes:
            parts = ", ".join(f"{k.replace('_', ' ')} {v / GB:.1f} GB" for k, v in memory.items())
            raise DoesNotFit(
                f"does not fit: the heaviest rank at tp={tp}, batch={batch} needs {need / GB:.1f} GB "
                f"({parts}) and {self.device.name} has {self.device.memory_bytes / GB:.0f} GB"
            )


def load_profiles(device_profile: str, interconnect: str) -> tuple[DeviceProfile, Profile]:
    return load_device(device_profile), load_profile(interconnect)


def row_values(generation: SimulatedGeneration) -> dict:
    """Latency row fields of a simulated generation (the fields measured rows have)."""
    timings, decode = Timings(), generation.decode
    timings.add(
        1e3 * generation.prefill.seconds,
        1e3 * decode.seconds if decode else None,
        1e3 * generation.e2e_s,
        generation.exposed_s / generation.e2e_s,
    )
    return summarise(timings, generation.batch, generation.new_tokens) | {
        "comm_fraction_status": "simulated: share of the time with a collective in flight and no compute running",
        "telemetry_status": "n/a: simulated (no device ran)",
        "telemetry": {},
    }


@functools.lru_cache(maxsize=2)
def _simulator(device_profile: str, interconnect: str, kernels: str) -> Simulator:
    """One simulator per profiles and kernel regime in a process, so the op shapes it learns serve every cell."""
    return Simulator(*load_profiles(device_profile, interconnect), kernels)


def simulate_cell(cell) -> tuple[dict | None, str | None]:
    """(row fields, None) of one ``mode: simulated`` cell, or (None, why it failed, e.g. does not fit)."""
    try:
        strategy = bound_strategy(cell.strategy, cell.strategy_options, resolve(cell.model), cell.tp)
        check_expressible(strategy)
        simulator = _simulator(cell.device_profile, cell.interconnect, cell.kernels)
        if cell.decode_mode not in simulator.regime.launches:
            return None, (
                f"kernels={cell.kernels} runs its decode with {' or '.join(simulator.regime.launches)} "
                f"launches, not decode_mode={cell.decode_mode}"
            )
        rank, model = simulator.rank_model(cell.model, cell.dtype, cell.tp, strategy)
        generation = simulator.generation(
            model,
            strategy,
            cell.tp,
            rank,
            cell.batch,
            cell.prompt_len,
            cell.new_tokens,
            cell.decode_mode == "cuda_graph",
        )
        return row_values(generation), None
    except DoesNotFit as exc:
        return None, str(exc)
    except Exception as exc:  # the cell fails with its reason; the other cells still run
        return None, f"{exc.__class__.__name__}: {exc}"


def simulate_cells(cells, workers: int | None = None):
    """Cells with ``mode: simulated``: yields ``(cell, row fields, None)`` or ``(cell, None, error)`` in order.

    Cells are simulated by ``workers`` processes (default: one per CPU this process may use), each
    keeping what it learns of the op shapes across its cells; consecutive cells that share a rank
    model reuse it.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(cells), workers or usable)
    if workers <= 1:
        for cell in cells:
            yield cell, *simulate_cell(cell)
        return
    # Workers fork from a fork server, never from this process: a fork of a process whose OpenMP pool has
    # run hangs in the child's first parallel op.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for cell, (values, error) in zip(cells, pool.map(simulate_cell, cells)):
            yield cell, values, error


def check_cells(cells) -> None:
    """Raise a one-line error for a simulated cell whose profiles or kernel regime are unknown or whose
    strategy the simulation cannot express (before any cell runs)."""
    for names in sorted({(c.device_profile, c.interconnect) for c in cells}):
        load_profiles(*names)
    for name in sorted({c.kernels for c in cells}):
        load_regime(name)
    for name, options in {(c.strategy, tuple(sorted(c.strategy_options.items()))) for c in cells}:
        check_expressible(make_strategy(name, dict(options)))
