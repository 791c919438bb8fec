"""Projection: the N-GPU latency of a strategy from one device and an interconnect profile.

One rank's shard (the heaviest under the strategy's own layout: uneven head splits and SPD's
head grouping make ranks unequal) runs for real; every collective is replaced by its modelled
cost (``suite.latency.interconnect``), spent on the device as a timed wait off the compute path
(spin kernels on communication streams on a GPU, a deadline on the CPU), so compute issued while
a collective is in flight overlaps with it, exactly as with the real communicator.

The numbers a projecting communicator returns are meaningless: it carries ``projected = True``
and accuracy code must refuse it.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from suite.latency.interconnect import Profile, ProfileError, load_profile
from suite.parallel.comm import Communicator, Pending


# --- spending the modelled time ---------------------------------------------------------------

class _Deadline:
    """Host side: ``wait()`` returns when the modelled collective has finished."""

    SPIN_S = 2e-4  # sleep until this close to the deadline, then spin (sleep overshoots)

    def __init__(self, at: float):
        self.at = at

    def wait(self) -> None:
        while (left := self.at - time.perf_counter()) > 0:
            if left > self.SPIN_S:
                time.sleep(left - self.SPIN_S)


class _HostLink:
    """One link, as on a communication stream: a collective starts when issued or when the previous ends."""

    def __init__(self):
        self.free_at = 0.0

    def spend(self, seconds: float) -> _Deadline:
        self.free_at = max(time.perf_counter(), self.free_at) + seconds
        return _Deadline(self.free_at)


class _Joined:
    """Device side: ``wait()`` makes the current stream wait for the spin kernels (as NCCL's work.wait())."""

    def __init__(self, events: list, device: torch.device):
        self.events, self.device = events, device

    def wait(self) -> None:
        stream = torch.cuda.current_stream(self.device)
        for event in self.events:
            stream.wait_event(event)


@functools.cache
def _spin_cycles_per_second(device_index: int) -> float:
    """Clock rate seen by ``torch.cuda._sleep``'s spin kernel, timed with CUDA events."""
    cycles = 20_000_000
    with torch.cuda.device(device_index):
        torch.cuda._sleep(cycles // 10)  # warm up the clocks
        rates = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            rates.append(cycles / (start.elapsed_time(end) / 1e3))
    return statistics.median(rates)


class _DeviceLink:
    """GPU side: ``sms`` spin kernels (``torch.cuda._sleep``) on their own streams, one per SM that an
    NCCL kernel would occupy.

    Each stream runs in order, so collectives queue on the link as they do on NCCL's stream;
    a collective starts once the current stream has produced its input, and waiting joins the
    current stream to it (no host sync). Works under CUDA-graph capture: the streams fork from
    and join the capturing stream. Limits: a spin kernel is a single one-thread block, so it
    takes a block slot on an SM but not the registers and shared memory an NCCL block holds;
    it counts SM clock cycles, calibrated once, so a clock that drops under load lengthens it.
    """

    def __init__(self, device: torch.device, sms: int):
        self.device = device
        self.streams = [torch.cuda.Stream(device) for _ in range(sms)]
        self.cycles_per_s = _spin_cycles_per_second(device.index if device.index is not None else 0)

    def spend(self, seconds: float) -> _Joined:
        compute = torch.cuda.current_stream(self.device)
        events = []
        for stream in self.streams:
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                torch.cuda._sleep(max(1, round(seconds * self.cycles_per_s)))
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
        return _Joined(events, self.device)


@dataclass
class ProjectingCommunicator(Communicator):
    """Stands for rank ``rank`` of ``world``: collectives cost their modelled time and move no data.

    Results keep the real shapes (all-reduce: the local partial; reduce-scatter: this rank's
    chunk of it; all-gather: the local piece repeated), so strategies run unchanged, but their
    values are not the model's. ``modelled_s`` accumulates the modelled link time.
    """

    profile: Profile | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sms: int = 1
    modelled_s: float = 0.0
    carries_data: ClassVar[bool] = False

    def __post_init__(self):
        if self.profile is None:
            raise ProfileError("a projecting communicator needs an interconnect profile")
        if self.sms < 1:
            raise ProfileError(f"sms {self.sms} is invalid: at least one SM spends the modelled time")
        self.device = torch.device(self.device)
        self._link = _DeviceLink(self.device, self.sms) if self.device.type == "cuda" else _HostLink()

    def launch_mode(self) -> str:
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return "cuda_graph" if capturing else "eager"

    def _spend(self, collective: str, out: torch.Tensor, nbytes: int, async_op: bool):
        if self.world == 1:
            return Pending(out) if async_op else out
        seconds = self.profile.seconds(collective, self.world, nbytes, self.launch_mode())
        self.modelled_s += seconds
        if self.stats.enabled:
            self.stats.calls += 1
        pending = Pending(out, self._link.spend(seconds), self.stats)
        return pending if async_op else pending.wait()

    def all_reduce(self, x: torch.Tensor, async_op: bool = False):
        return self._spend("all_reduce", x, x.numel() * x.element_size(), async_op)

    def reduce_scatter(self, x: torch.Tensor, async_op: bool = False):
        chunk = x.shape[0] // self.world
        out = x.narrow(0, self.rank * chunk, chunk).clone() if self.world > 1 else x
        return self._spend("reduce_scatter", out, x.numel() * x.element_size(), async_op)

    def all_gather(self, x: torch.Tensor, async_op: bool = False):
        out = x.repeat(self.world, *[1] * (x.dim() - 1)) if self.world > 1 else x
        return self._spend("all_gather", out, out.numel() * out.element_size(), async_op)


def heaviest_rank(config, tp: int, layout=None) -> int:
    """The rank with the most work: most query heads, then most KV heads, then the widest FFN slice."""
    from suite.model.sharding import default_layout

    layout = layout or default_layout(config, tp)

    def load(rank: int) -> tuple[int, int, int]:
        shards = [layer[rank] for layer in layout]
        return (sum(len(s.q_heads) for s in shards), sum(len(s.kv_heads) for s in shards),
                sum(s.ffn[1] - s.ffn[0] for s in shards))
    return max(range(tp), key=lambda r: (load(r), -r))


# --- projected cells -------------------------------------------------------------------------

@contextmanager
def _rank_threads(device: torch.device, tp: int):
    """On a CPU, the projected rank gets the share of cores each of ``tp`` ranks would have."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(name: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def projected_runner(model: str, strategy: str, options: dict | None, tp: int, profile: Profile,
                     dtype: str = "float32", device: str = "cpu", sms: int = 1):
    """A Runner of the heaviest rank's shard whose collectives are modelled on ``profile``."""
    from suite.model.sharding import check_tp
    from suite.parallel.runner import ModelCache
    from suite.parallel.strategy import bound_strategy

    models = ModelCache(_device(device))
    source = models.source(model)
    check_tp(source.config, tp)
    chosen = bound_strategy(strategy, options, source, tp)
    rank = heaviest_rank(source.config, tp, chosen.layout(source.config, tp))
    comm = ProjectingCommunicator(rank=rank, world=tp, profile=profile, device=models.device, sms=sms)
    return models.runner(model, dtype, chosen, comm)


def project_cell(cell, runner) -> dict:
    """Latency row fields of one cell, timed on the projected rank (no telemetry: one rank is not N GPUs)."""
    from suite.latency.measure import measure, prompts_for
    from suite.latency.stats import summarise

    prompts = prompts_for(cell, runner.model.config.vocab_size)
    with _rank_threads(runner.device, runner.comm.world):
        timings = measure(runner, runner.comm, prompts, cell.new_tokens, cell.repetitions, cell.warmup,
                          cuda_graph=cell.decode_mode == "cuda_graph")
    return summarise(timings, cell.batch, cell.new_tokens) | {
        "telemetry_status": "n/a: projected (one rank's shard; the interconnect is modelled)", "telemetry": {}}


def project_cells(cells, sms: int = 1):
    """Cells of one (tp, device, interconnect) with ``mode: projected``, one after the other: yields
    ``(cell, row fields, None)`` or, for a cell that fails, ``(cell, None, error)``.

    Each cell runs in this process on the heaviest rank's shard; consecutive cells reuse the
    loaded shard when they run the same rank model.
    """
    from suite.parallel.runner import ModelCache
    from suite.parallel.strategy import bound_strategy

    profile = load_profile(cells[0].interconnect)
    models = ModelCache(_device(cells[0].device))
    for cell in cells:
        try:
            source = models.source(cell.model)
            strategy = bound_strategy(cell.strategy, cell.strategy_options, source, cell.tp)
            rank = heaviest_rank(source.config, cell.tp, strategy.layout(source.config, cell.tp))
            comm = ProjectingCommunicator(rank=rank, world=cell.tp, profile=profile, device=models.device, sms=sms)
            yield cell, project_cell(cell, models.runner(cell.model, cell.dtype, strategy, comm)), None
        except Exception as exc:  # this cell fails with its reason; the rest still run
            yield cell, None, f"{exc.__class__.__name__}: {exc}"
