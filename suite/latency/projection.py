"""Projection: the N-GPU latency of a strategy from one device and an interconnect profile.

One rank's shard (the heaviest under the strategy's own layout: uneven head splits and SPD's
head grouping make ranks unequal) runs for real; every collective is replaced by its modelled
cost (``Profile.seconds``), spent on the device as a timed wait off the compute path (a kernel
holding the profile's ``sms`` SMs on a communication stream on a GPU, a deadline on the CPU), so
compute issued while a collective is in flight overlaps with it, exactly as with the real
communicator, and pays for the SMs the collective takes.

The numbers a projecting communicator returns are meaningless: it carries ``carries_data = False``
and accuracy code must refuse it.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from suite.latency.interconnect import FUSED_SYNC, Profile, ProfileError, load_profile
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
    """Device side: ``wait()`` makes the current stream wait for the link (as NCCL's work.wait())."""

    def __init__(self, event, device: torch.device):
        self.event, self.device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


# One block per SM, each with 1024 threads and (set at launch) the most shared memory a block may
# have: no block that needs shared memory (GEMM, attention) fits beside it on its SM. The launch has
# one deadline: the first thread to run stamps ``start + seconds`` into a zeroed slot (compare-and-
# swap), and every thread of every block sleeps until it, on the GPU's nanosecond clock, so blocks
# that start late (compute held their SMs) end with the others instead of stretching the collective.
# Plain PTX, loaded by the driver's JIT: no CUDA toolkit, compiler or Triton is needed.
_HOLD_SMS = """
.version 7.0
.target sm_70
.address_size 64

.extern .shared .align 16 .b8 held[];

.visible .entry hold_sms(.param .u64 slot_param, .param .f64 seconds_param)
.maxntid 1024, 1, 1
{
    .reg .pred keep_waiting, first;
    .reg .f64 seconds;
    .reg .b64 slot, span, now, mine, seen, deadline, unset;

    ld.param.u64 slot, [slot_param];
    cvta.to.global.u64 slot, slot;
    ld.param.f64 seconds, [seconds_param];
    mul.f64 seconds, seconds, 0d41CDCD6500000000;  // 1e9: nanoseconds
    cvt.rzi.u64.f64 span, seconds;
    mov.u64 now, %globaltimer;
    add.u64 mine, now, span;
    mov.u64 unset, 0;
    atom.global.cas.b64 seen, [slot], unset, mine;
    setp.eq.u64 first, seen, unset;
    selp.b64 deadline, mine, seen, first;
WAIT:
    nanosleep.u32 200;
    mov.u64 now, %globaltimer;
    setp.lt.u64 keep_waiting, now, deadline;
    @keep_waiting bra WAIT;
    ret;
}
"""


@functools.cache
def _hold_kernel(device_index: int):
    """The SM-holding kernel, JIT-compiled by the driver, and the shared memory each block takes."""
    from torch.cuda import _utils

    if not hasattr(_utils, "_cuda_load_module"):
        raise ProfileError(
            f"torch {torch.__version__} cannot load a PTX kernel (torch.cuda._utils._cuda_load_module): "
            "projecting on a GPU needs torch 2.8 or newer"
        )
    with torch.cuda.device(device_index):
        kernel = _utils._cuda_load_module(_HOLD_SMS, ["hold_sms"])["hold_sms"]
        shared = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
        kernel.set_shared_memory_config(shared)
    return kernel, shared


class _DeviceLink:
    """GPU side: each collective is one ``hold_sms`` kernel of ``sms`` blocks on the link's own stream.

    The stream runs in order, so collectives queue on the link as they do on NCCL's stream; a
    collective starts once the current stream has produced its input, and waiting joins the
    current stream to it (no host sync). While it runs it holds ``sms`` SMs, as an NCCL kernel
    does with its channels: compute that overlaps it runs on the others. Works under CUDA-graph
    capture (the link stream forks from and joins the capturing stream; a replay zeroes the deadline's
    slot again). Limits: its blocks
    sleep, so they take SMs but neither memory bandwidth nor issue slots as NCCL's copies do;
    elementwise blocks without shared memory can still use the rest of a held SM's threads; the
    clock's resolution (``%globaltimer``) is about a microsecond on some GPUs.
    """

    def __init__(self, device: torch.device, sms: int):
        index = device.index if device.index is not None else torch.cuda.current_device()
        available = torch.cuda.get_device_properties(index).multi_processor_count
        if sms >= available:
            raise ProfileError(
                f"sms {sms}: the device has {available} SMs, and a modelled collective must leave some to compute"
            )
        self.device, self.sms = device, sms
        self.stream = torch.cuda.Stream(device)
        self.kernel, self.shared = _hold_kernel(index)

    def spend(self, seconds: float) -> _Joined:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):  # the slot of this launch's deadline, zeroed on the link stream
            slot = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.kernel(
            grid=(self.sms, 1, 1),
            block=(1024, 1, 1),
            args=[slot, float(seconds)],
            shared_mem=self.shared,
            stream=self.stream,
        )
        event = torch.cuda.Event()
        event.record(self.stream)
        return _Joined(event, self.device)


@dataclass
class ProjectingCommunicator(Communicator):
    """Stands for rank ``rank`` of ``world``: collectives cost their modelled time and move no data.

    Results keep the real shapes (all-reduce: the local partial; reduce-scatter: this rank's
    chunk of it; all-gather: the local piece repeated), so strategies run unchanged, but their
    values are not the model's. ``fused_sync`` is one modelled collective (TokenWeave's fused
    kernel) where the profile has it, else its parts (reduce-scatter, add, norm, all-gather).
    ``modelled_s`` accumulates the modelled link time and ``counts`` the collectives by kind, as
    issued (a CUDA graph's replays issue nothing from Python).
    """

    profile: Profile | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sms: int | None = None  # SMs a modelled collective holds on a GPU (default: the profile's)
    modelled_s: float = 0.0
    counts: Counter = field(default_factory=Counter)
    carries_data: ClassVar[bool] = False

    def __post_init__(self):
        if self.profile is None:
            raise ProfileError("a projecting communicator needs an interconnect profile")
        self.sms = self.profile.sms if self.sms is None else self.sms
        if self.sms < 1:
            raise ProfileError(f"sms {self.sms} is invalid: at least one SM spends the modelled time")
        self.device = torch.device(self.device)
        if self.world == 1:  # no collective to model: no link, and no kernel to load
            self._link = None
        else:
            self._link = _DeviceLink(self.device, self.sms) if self.device.type == "cuda" else _HostLink()

    def launch_mode(self) -> str:
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return "cuda_graph" if capturing else "eager"

    def _spend(self, collective: str, out: torch.Tensor, nbytes: int, async_op: bool):
        if self.world == 1:
            return Pending(out) if async_op else out
        seconds = self.profile.seconds(collective, self.world, nbytes, self.launch_mode())
        self.modelled_s += seconds
        self.counts[collective] += 1
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

    def fused_sync(self, partial: torch.Tensor, residual: torch.Tensor, norm=None):
        """One modelled collective; the add and norm run inside the fused kernel (its modelled time)."""
        if self.world == 1 or not self.profile.has_fused_sync:
            return super().fused_sync(partial, residual, norm)
        gathered = residual.repeat(self.world, *[1] * (residual.dim() - 1))
        return residual, self._spend(FUSED_SYNC, gathered, partial.numel() * partial.element_size(), False)


def heaviest_rank(config, tp: int, layout=None) -> int:
    """The rank with the most work: most query heads, then most KV heads, then the widest FFN slice."""
    from suite.model.sharding import default_layout

    layout = layout or default_layout(config, tp)

    def load(rank: int) -> tuple[int, int, int]:
        shards = [layer[rank] for layer in layout]
        return (
            sum(len(s.q_heads) for s in shards),
            sum(len(s.kv_heads) for s in shards),
            sum(s.ffn[1] - s.ffn[0] for s in shards),
        )

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


def projected_runner(
    model: str,
    strategy: str,
    options: dict | None,
    tp: int,
    profile: Profile,
    dtype: str = "float32",
    device: str = "cpu",
    sms: int | None = None,
    models=None,
    kernels: str = "eager",
):
    """A Runner of the heaviest rank's shard under the strategy's own layout (an SPD plan's head
    grouping included), whose collectives are modelled on ``profile``; ``models`` (a ``ModelCache``)
    keeps a loaded shard for the next cell."""
    from suite.model.sharding import check_tp
    from suite.parallel.runner import ModelCache
    from suite.parallel.strategy import bound_strategy

    models = models or ModelCache(_device(device))
    source = models.source(model)
    check_tp(source.config, tp)
    chosen = bound_strategy(strategy, options, source, tp)
    rank = heaviest_rank(source.config, tp, chosen.layout(source.config, tp))
    comm = ProjectingCommunicator(rank=rank, world=tp, profile=profile, device=models.device, sms=sms)
    return models.runner(model, dtype, chosen, comm, kernels)


def project_cell(cell, runner) -> dict:
    """Latency row fields of one cell, timed on the projected rank (no telemetry: one rank is not N GPUs)."""
    from suite.latency.measure import measure, prompts_for, share_fields
    from suite.latency.stats import summarise

    prompts = prompts_for(cell, runner.model.config.vocab_size)
    cuda_graph = cell.decode_mode == "cuda_graph"
    with _rank_threads(runner.device, runner.comm.world):
        timings = measure(
            runner, runner.comm, prompts, cell.new_tokens, cell.repetitions, cell.warmup, cuda_graph=cuda_graph
        )
    return (
        summarise(timings, cell.batch, cell.new_tokens)
        | share_fields(timings, runner.comm, runner.device, cuda_graph)
        | {"telemetry_status": "n/a: projected (one rank's shard; the interconnect is modelled)", "telemetry": {}}
    )


def project_cells(cells, sms: int | None = None):
    """Cells of one (tp, device, interconnect) with ``mode: projected``, one after the other: yields
    ``(cell, row fields, None)`` or, for a cell that fails, ``(cell, None, error)``.

    Each cell runs in this process on the heaviest rank's shard; consecutive cells reuse the
    loaded shard when they run the same rank model.
    """
    from suite.parallel.runner import ModelCache

    profile = load_profile(cells[0].interconnect)
    models = ModelCache(_device(cells[0].device))
    for cell in cells:
        try:
            runner = projected_runner(
                cell.model,
                cell.strategy,
                cell.strategy_options,
                cell.tp,
                profile,
                cell.dtype,
                cell.device,
                sms,
                models,
                cell.kernels,
            )
            yield cell, project_cell(cell, runner), None
        except Exception as exc:  # this cell fails with its reason; the rest still run
            yield cell, None, f"{exc.__class__.__name__}: {exc}"
