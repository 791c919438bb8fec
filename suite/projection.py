"""Projection: the N-GPU latency of a strategy from one device and a communication-cost model.

One rank's shard (the heaviest: uneven head splits make ranks unequal) runs for real; every
collective is replaced by its modelled cost on a named interconnect profile,

    t(N, B) = latency(N, B) + traffic(N, B) / busbw(N, B),
    traffic = 2(N-1)/N * B (all-reduce),  (N-1)/N * B (reduce-scatter, all-gather),

spent on the device as a timed wait off the compute path (a spin kernel on a communication
stream on a GPU, a deadline on the CPU), so compute issued while a collective is in flight
overlaps with it, exactly as with the real communicator. Profiles (``suite/profiles/*.yaml``)
give latency and bus bandwidth by N, message size and launch mode (``eager`` or
``cuda_graph``); ``spdbench commbench`` measures one on the hardware at hand and
``spdbench validate-projection`` compares projected with measured cells.

The numbers a projecting communicator returns are meaningless: it carries ``projected = True``
and accuracy code must refuse it.
"""

from __future__ import annotations

import bisect
import functools
import gc
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import yaml

from suite.comm import Communicator, Pending

PROFILE_DIR = Path(__file__).parent / "profiles"
LAUNCHES = ("eager", "cuda_graph")
RING_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n,
               "reduce_scatter": lambda n: (n - 1) / n,
               "all_gather": lambda n: (n - 1) / n}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class ProfileError(ValueError):
    """An interconnect profile is missing, malformed, or does not cover the request."""


def parse_bytes(value) -> int:
    """``4096``, ``"8K"``, ``"1M"``, ``"1G"`` (binary units) -> bytes."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    try:
        return int(float(text.removesuffix(unit)) * _UNITS[unit])
    except ValueError:
        raise ProfileError(f"size {value!r}: expected bytes such as 4096, 8K, 1M or 1G") from None


def rows_from_samples(samples: list[tuple[int, float]], factor: float) -> list[tuple[int, float, float]]:
    """Measured (bytes, seconds) -> rows (bytes, latency s, seconds per bus byte) that reproduce them.

    Times are first made non-decreasing in size (a right-to-left running minimum drops slow
    outliers); the latency is the smallest message's time and the bandwidth at each size
    carries the rest: t = latency + factor * bytes * inv_busbw.
    """
    samples = sorted(samples)
    times = [t for _, t in samples]
    for i in range(len(times) - 2, -1, -1):
        times[i] = min(times[i], times[i + 1])
    floor = times[0]
    return [(b, floor, (t - floor) / (factor * b)) for (b, _), t in zip(samples, times)]


def _table(entry, factor: float, where: str) -> list[tuple[int, float, float]]:
    """One N's table: rows ``[bytes, latency_us, busbw_GBps]`` or ``{samples_us: [[bytes, us], ...]}``."""
    try:
        if isinstance(entry, dict):
            return rows_from_samples([(parse_bytes(b), float(us) * 1e-6) for b, us in entry["samples_us"]], factor)
        rows = [(parse_bytes(b), float(lat) * 1e-6, 1 / (float(bw) * 1e9)) for b, lat, bw in entry]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ProfileError(f"{where}: expected rows [bytes, latency_us, busbw_GBps] or samples_us "
                           f"[[bytes, us], ...] ({exc})") from None
    if not rows or [r[0] for r in rows] != sorted({r[0] for r in rows}):
        raise ProfileError(f"{where}: rows must be non-empty with increasing sizes")
    return rows


def _at_size(rows: list[tuple[int, float, float]], nbytes: int) -> tuple[float, float]:
    """(latency, inverse bus bandwidth) at ``nbytes``, interpolated in log(size), held beyond the ends."""
    sizes = [r[0] for r in rows]
    i = bisect.bisect_right(sizes, nbytes)
    if i == 0:
        return rows[0][1:]
    if i == len(rows):
        return rows[-1][1:]
    (b0, lat0, inv0), (b1, lat1, inv1) = rows[i - 1], rows[i]
    w = (math.log(max(nbytes, 1)) - math.log(max(b0, 1))) / (math.log(max(b1, 1)) - math.log(max(b0, 1)))
    return lat0 + w * (lat1 - lat0), inv0 + w * (inv1 - inv0)


@dataclass
class Profile:
    """Latency and bus bandwidth of each collective by launch mode, N and message size."""

    name: str
    description: str
    sources: list[str]
    method: str
    tables: dict[str, dict[str, dict[int, list[tuple[int, float, float]]]]]  # [collective][launch][N] -> rows
    path: str | None = None

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None) -> Profile:
        where = path or data.get("name", "profile")
        missing = [k for k in ("name", "sources", "method", "tables") if not data.get(k)]
        if missing:
            raise ProfileError(f"{where}: missing {', '.join(missing)} (every profile states its source and method)")
        if not isinstance(data["tables"], dict):
            raise ProfileError(f"{where}: tables must map collectives to launch modes to tables by N")
        tables = {}
        for coll, by_launch in data["tables"].items():
            if coll not in RING_FACTOR or not isinstance(by_launch, dict) or set(by_launch) - set(LAUNCHES):
                raise ProfileError(f"{where}: tables.{coll}: expected a collective ({', '.join(RING_FACTOR)}) "
                                   f"mapping launch modes ({', '.join(LAUNCHES)}) to tables by N")
            tables[coll] = {launch: {int(n): _table(e, RING_FACTOR[coll](int(n)), f"{where}: {coll}.{launch}.{n}")
                                     for n, e in by_n.items()} for launch, by_n in by_launch.items()}
        if "all_reduce" not in tables:
            raise ProfileError(f"{where}: needs an all_reduce table (other collectives fall back to it)")
        sources = data["sources"] if isinstance(data["sources"], list) else [data["sources"]]
        return cls(data["name"], data.get("description", ""), sources, data["method"], tables, path)

    def seconds(self, collective: str, n: int, nbytes: int, launch: str = "eager") -> float:
        """Modelled time of one collective of ``nbytes`` over ``n`` ranks.

        A collective without its own table for ``n`` uses the all-reduce table (same links and
        protocols; only the ring factor differs). N between two tabulated N is interpolated.
        """
        if n <= 1:
            return 0.0
        by_n = self.tables.get(collective, {}).get(launch, {})
        if not _covers(by_n, n):
            by_n = self.tables["all_reduce"].get(launch, {})
        if not by_n:
            raise ProfileError(f"profile {self.name!r} has no {launch} tables; measure them with "
                               f"'spdbench commbench{' --cuda-graph' if launch == 'cuda_graph' else ''}'")
        if not _covers(by_n, n):
            raise ProfileError(f"profile {self.name!r} covers N = {', '.join(map(str, sorted(by_n)))} ({launch}), "
                               f"not N = {n}; measure it with 'spdbench commbench --tp {n}'")
        ns = sorted(by_n)
        hi = ns[bisect.bisect_left(ns, n)]
        lo = ns[max(bisect.bisect_left(ns, n) - 1, 0)] if hi != n else n
        (lat_lo, inv_lo), (lat_hi, inv_hi) = _at_size(by_n[lo], nbytes), _at_size(by_n[hi], nbytes)
        w = 0.0 if hi == lo else (n - lo) / (hi - lo)
        latency, inv_busbw = lat_lo + w * (lat_hi - lat_lo), inv_lo + w * (inv_hi - inv_lo)
        return latency + RING_FACTOR[collective](n) * nbytes * inv_busbw


def _covers(by_n: dict, n: int) -> bool:
    return bool(by_n) and min(by_n) <= n <= max(by_n)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A shipped profile by name (``h100-nvswitch``) or a profile file (e.g. written by commbench)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(f"--interconnect {name_or_path!r}: no such profile file or name; shipped profiles: "
                           f"{', '.join(available_profiles())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with name, sources, method, tables")
    return Profile.from_dict(data, str(path))


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
    projected: ClassVar[bool] = True

    def __post_init__(self):
        if self.profile is None:
            raise ProfileError("a projecting communicator needs an interconnect profile")
        if self.sms < 1:
            raise ProfileError(f"--sms {self.sms} is invalid: at least one SM spends the modelled time")
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
            self.stats.bytes += nbytes
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
    from suite.sharding import default_layout

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
    from suite.generate import DTYPES, Runner
    from suite.sharding import check_tp
    from suite.sources import resolve
    from suite.strategy import make_strategy

    dev = _device(device)
    chosen = make_strategy(strategy, options)
    source = resolve(model, dev)
    check_tp(source.config, tp)
    rank = heaviest_rank(source.config, tp)
    comm = ProjectingCommunicator(rank=rank, world=tp, profile=profile, device=dev, sms=sms)
    return Runner(chosen.load_model(source, tp, rank, DTYPES[dtype], dev), chosen, comm)


def project_cell(cell: dict, runner) -> dict:
    """Latency row fields of one cell, timed on the projected rank (no telemetry: one rank is not N GPUs)."""
    from suite.measure import measure, prompts_for, summarise

    prompts = prompts_for(cell, runner.model.config.vocab_size)
    with _rank_threads(runner.device, runner.comm.world):
        timings = measure(runner, runner.comm, prompts, cell["new_tokens"], cell["repetitions"], cell["warmup"],
                          cuda_graph=cell["decode_mode"] == "cuda_graph")
    return summarise(timings, cell["batch"], cell["new_tokens"]) | {
        "telemetry_status": "n/a: projected (one rank's shard; the interconnect is modelled)",
        "energy_j": None, "j_per_token": None, "power_w_mean": None, "telemetry": {}}


def run_projected_group(cells: list[dict], store, command: str = "", sms: int = 1) -> None:
    """``spdbench bench`` hook: cells of one (tp, device, interconnect) with ``mode: projected``.

    Each cell runs in this process on the heaviest rank's shard; its row (provenance
    ``projected``, the profile name in ``interconnect``) is appended as soon as it finishes.
    Consecutive cells reuse the loaded shard (a strategy that builds its own, e.g. SPD, only with
    the same options). A cell that fails gets a failed row and the others still run.
    """
    from suite.bench import label, latency_row
    from suite.generate import DTYPES, Runner
    from suite.results import environment
    from suite.sources import resolve
    from suite.strategy import Strategy, make_strategy

    profile = load_profile(cells[0]["interconnect"])
    env, sources, loaded, model, builder = environment(), {}, None, None, None
    for cell in cells:
        strategy = None
        try:
            dev, tp = _device(cell["device"]), cell["tp"]
            strategy = make_strategy(cell["strategy"], cell["strategy_options"])
            if cell["model"] not in sources:
                sources[cell["model"]] = resolve(cell["model"], dev)
            source = sources[cell["model"]]
            rank = heaviest_rank(source.config, tp)
            own = type(strategy).load_model is not Strategy.load_model  # e.g. SPD: its own weights or layout
            key = (cell["model"], cell["dtype"], *([cell["strategy"], sorted(strategy.options().items())] if own
                                                   else []))
            if key != loaded:
                model = loaded = None
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                model, builder = strategy.load_model(source, tp, rank, DTYPES[cell["dtype"]], dev), strategy
                loaded = key
            elif own:
                strategy = builder  # the instance that built this shard (and checked itself against it)
            comm = ProjectingCommunicator(rank=rank, world=tp, profile=profile, device=dev, sms=sms)
            fields = project_cell(cell, Runner(model, strategy, comm))
            row = latency_row(cell, fields, strategy=strategy, env=env, command=command)
        except Exception as exc:  # this cell fails with its reason; the rest still run
            print(f"bench: projected cell {label(cell)} failed: {exc}", file=sys.stderr)
            row = latency_row(cell, error=f"{exc.__class__.__name__}: {exc}", strategy=strategy, env=env,
                              command=command)
        store.append(row)


# --- commbench: measure a profile --------------------------------------------------------------

def _timed_loop(op, iters: int, device: torch.device, graph: bool) -> float:
    """Seconds per collective over ``iters`` back-to-back calls (replayed from a CUDA graph if asked)."""
    import torch.distributed as dist

    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                op()
        g.replay()
        run = g.replay
    else:
        def run():
            for _ in range(iters):
                op()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _commbench_job(comm, device, sizes, collectives, launches, iters, warmup, repeats):
    """On every rank: median seconds per collective by [collective][launch] -> [(bytes, s)], slowest rank.

    The collectives are the suite's communicator's, i.e. exactly what a projection replaces.
    """
    import torch.distributed as dist

    n, out = comm.world, {}
    for coll in collectives:
        for launch in launches:
            points = []
            for size in sizes:
                count = max(n, size // 4 // n * n)  # float32 elements of the full buffer, divisible by N
                full, part = torch.zeros(count, device=device), torch.zeros(count // n, device=device)
                op = {"all_reduce": lambda: comm.all_reduce(full),
                      "reduce_scatter": lambda: comm.reduce_scatter(full),
                      "all_gather": lambda: comm.all_gather(part)}[coll]
                nbytes = count * full.element_size()
                for _ in range(max(warmup, 1)):  # NCCL sets up before any graph capture
                    op()
                times = [_timed_loop(op, iters, device, launch == "cuda_graph") for _ in range(repeats)]
                slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                points.append((nbytes, float(slowest)))
            out.setdefault(coll, {})[launch] = points
    return out


def commbench(tps: list[int], device: str = "cpu", backend: str = "auto", sizes: list[int] | None = None,
              collectives=tuple(RING_FACTOR), launches=("eager",), iters: int = 20, warmup: int = 5,
              repeats: int = 3, timeout_s: float = 300) -> dict:
    """Measured [collective][launch][N] -> [(bytes, seconds)] on this machine (N ranks per launch)."""
    from suite import launch as launching

    sizes = sizes or [4**k for k in range(5, 13)]  # 1 KiB .. 16 MiB
    measured: dict = {}
    for tp in tps:
        if tp < 2:
            raise ProfileError(f"--tp {tp}: a collective needs at least 2 ranks")
        result = launching.launch(_commbench_job, tp, sizes, list(collectives), list(launches), iters, warmup,
                                  repeats, device=device, backend=backend, timeout_s=timeout_s)
        for coll, by_launch in result.items():
            for launch, points in by_launch.items():
                measured.setdefault(coll, {}).setdefault(launch, {})[tp] = points
    return measured


def profile_document(measured: dict, name: str, description: str, source: str, iters: int, repeats: int) -> dict:
    """A profile (YAML-ready) whose tables are the measured samples."""
    tables = {coll: {launch: {n: {"samples_us": [[b, round(s * 1e6, 2)] for b, s in points]}
                              for n, points in by_n.items()} for launch, by_n in by_launch.items()}
              for coll, by_launch in measured.items()}
    method = (f"Measured: median of {repeats} timed loops of {iters} back-to-back collectives per size "
              "(float32 buffers, sizes are whole buffers as in nccl-tests), the slowest rank's time. "
              "Latency = the smallest message's time; bus bandwidth at each size carries the rest "
              "(suite.projection.rows_from_samples), interpolated in log(size) between samples.")
    return {"name": name, "description": description, "sources": [source], "method": method, "tables": tables}


def bandwidth_table(measured: dict) -> str:
    """nccl-tests style: size, time, algbw, busbw per collective, launch mode and N."""
    import pandas as pd

    rows = [{"collective": coll, "launch": launch, "N": n, "size_B": b, "time_us": s * 1e6,
             "algbw_GBps": b / s / 1e9, "busbw_GBps": b / s / 1e9 * RING_FACTOR[coll](n)}
            for coll, by_launch in measured.items() for launch, by_n in by_launch.items()
            for n, points in by_n.items() for b, s in points]
    return pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}")


def cmd_commbench(args, parser) -> int:
    import datetime
    import socket

    from suite import launch as launching
    from suite.results import environment

    try:
        sizes = [parse_bytes(s) for s in args.sizes] if args.sizes else None
    except ProfileError as exc:
        parser.error(f"--sizes: {exc}")
    for tp in args.tp:
        if tp < 2:
            parser.error(f"--tp {tp}: a collective needs at least 2 ranks")
        launching.placement(tp, args.device, args.backend)
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda (NCCL collectives captured in a CUDA graph)")
    if min(args.iters, args.repeats) < 1 or args.warmup < 0:
        parser.error("--iters and --repeats must be at least 1, --warmup at least 0")
    launches = ("eager", "cuda_graph") if args.cuda_graph else ("eager",)
    measured = commbench(args.tp, args.device, args.backend, sizes, launches=launches, iters=args.iters,
                         warmup=args.warmup, repeats=args.repeats, timeout_s=args.timeout)
    print(bandwidth_table(measured))
    env = environment()
    backend = launching.placement(args.tp[0], args.device, args.backend)
    host = socket.gethostname()
    name = args.name or f"measured-{host}-{backend}"
    what = ", ".join(env["gpus"]) if args.device == "cuda" else env["cpu"]
    description = (f"{backend} on {host} ({args.device}: {what}; torch {env['torch']}, NCCL {env['nccl']})")
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    source = f"spdbench commbench on {host} at {when} (commit {env['commit']})"
    document = profile_document(measured, name, description, source, args.iters, args.repeats)
    out = Path(args.out or f"{name}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120))
    Profile.from_dict(document, str(out))  # it loads back
    print(f"profile {name!r} written to {out}; use it with --interconnect {out}")
    return 0


# --- validate-projection ------------------------------------------------------------------------

def _cells(args) -> list[dict]:
    return [{"batch": b, "prompt_len": p, "new_tokens": args.new_tokens, "repetitions": args.repetitions,
             "warmup": args.warmup, "decode_mode": "cuda_graph" if args.cuda_graph else "eager", "seed": 0}
            for b in args.batch for p in args.prompt_len]


def _measured_job(comm, device, args, strategies, cells):
    """On every rank: the cells' timings with the real communicator."""
    from suite.generate import load_runner
    from suite.measure import measure, prompts_for, summarise

    out = []
    for name in strategies:
        runner = load_runner(comm, device, args.model, name, args.options, args.dtype)
        for cell in cells:
            prompts = prompts_for(cell, runner.model.config.vocab_size)
            timings = measure(runner, comm, prompts, cell["new_tokens"], cell["repetitions"], cell["warmup"],
                              cuda_graph=cell["decode_mode"] == "cuda_graph")
            out.append(summarise(timings, cell["batch"], cell["new_tokens"]))
    return out


def validate(args, profile: Profile) -> list[dict]:
    """Per cell: measured and projected prefill / decode medians and the relative error."""
    from suite import launch as launching

    strategies, cells = args.strategy.split(","), _cells(args)
    measured = launching.launch(_measured_job, args.tp, args, strategies, cells, device=args.device,
                                backend=args.backend, timeout_s=args.timeout)
    results = []
    for i, name in enumerate(strategies):
        runner = projected_runner(args.model, name, args.options, args.tp, profile, args.dtype, args.device,
                                  args.sms)
        for j, cell in enumerate(cells):
            real, proj = measured[i * len(cells) + j], project_cell(cell, runner)
            row = {"strategy": name, "tp": args.tp, "batch": cell["batch"], "prompt_len": cell["prompt_len"]}
            for key in ("prefill_ms_median", "decode_ms_per_token_median"):
                m, p = real[key], proj[key]
                row |= {f"{key}_measured": m, f"{key}_projected": p,
                        f"{key.split('_')[0]}_error_pct": None if m is None or p is None else 100 * (p / m - 1)}
            results.append(row)
    return results


def cmd_validate(args, parser) -> int:
    import json

    import pandas as pd

    from suite import launch as launching
    from suite.sharding import check_tp
    from suite.sources import resolve
    from suite.strategy import make_strategy

    if args.tp < 2:
        parser.error(f"--tp {args.tp}: validation compares N >= 2 real ranks with their projection")
    if min([args.new_tokens, args.repetitions, *args.batch, *args.prompt_len]) < 1 or args.warmup < 0:
        parser.error("--batch, --prompt-len, --new-tokens and --repetitions must be at least 1, --warmup at least 0")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    for name in args.strategy.split(","):
        make_strategy(name, args.options)
    launching.placement(args.tp, args.device, args.backend)
    check_tp(resolve(args.model).config, args.tp)
    try:
        profile = load_profile(args.interconnect)
        profile.seconds("all_reduce", args.tp, 1, "cuda_graph" if args.cuda_graph else "eager")  # covers N
    except ProfileError as exc:
        parser.error(str(exc))
    results = validate(args, profile)
    if args.json:
        print(json.dumps(results))
        return 0
    table = pd.DataFrame(results)
    print(f"projection on {profile.name!r} vs measured ({args.device}, tp={args.tp}); error = projected/measured - 1")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def add_command(subparsers) -> None:
    from suite.cli import add_model_args

    p = subparsers.add_parser("commbench", help="measure an interconnect profile (nccl-tests style sweep)")
    p.add_argument("--tp", type=int, nargs="+", default=[2], help="rank counts N to measure (e.g. 2 4 8)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--sizes", nargs="+", metavar="SIZE", help="buffer sizes (e.g. 1K 64K 1M 16M); default 1K..16M x4")
    p.add_argument("--iters", type=int, default=20, help="collectives per timed loop")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed loops per size (the median is kept)")
    p.add_argument("--cuda-graph", action="store_true", help="also measure collectives replayed from a CUDA graph")
    p.add_argument("--name", help="profile name (default measured-HOST-BACKEND)")
    p.add_argument("--out", help="profile file to write (default NAME.yaml)")
    p.add_argument("--timeout", type=float, default=300, help="seconds a collective may wait")
    p.set_defaults(handler=cmd_commbench)

    v = subparsers.add_parser("validate-projection",
                              help="run the same cells measured on N ranks and projected; report the error",
                              description="Runs each cell (strategy x batch x prompt length) measured on --tp real "
                              "ranks and projected on the heaviest rank with --interconnect, and reports the "
                              "relative error of prefill and decode time. --strategy takes a comma-separated list.")
    add_model_args(v)
    v.add_argument("--interconnect", required=True,
                   help=f"profile name ({', '.join(available_profiles())}) or file from 'spdbench commbench'")
    v.add_argument("--batch", type=int, nargs="+", default=[1])
    v.add_argument("--prompt-len", type=int, nargs="+", default=[32])
    v.add_argument("--new-tokens", type=int, default=8)
    v.add_argument("--repetitions", type=int, default=3)
    v.add_argument("--warmup", type=int, default=1)
    v.add_argument("--cuda-graph", action="store_true", help="decode in a CUDA graph (--device cuda)")
    v.add_argument("--sms", type=int, default=1, help="SMs the modelled collective holds on a GPU")
    v.add_argument("--json", action="store_true", help="print the per-cell results as JSON")
    v.set_defaults(handler=cmd_validate)
