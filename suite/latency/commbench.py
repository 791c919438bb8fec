"""``spdbench commbench``: measure an interconnect profile on the hardware at hand (nccl-tests style).

Each collective of the suite's communicator (exactly what a projection or simulation replaces)
is timed over a sweep of sizes, back to back, eager or replayed from a CUDA graph; the slowest
rank's median is kept and written as a profile whose tables reproduce the measurements.
"""

from __future__ import annotations

import datetime
import socket
import statistics
import time
from pathlib import Path

import torch
import yaml

from suite.latency.interconnect import RING_FACTOR, Profile, ProfileError


def _timed_loop(op, iters: int, device: torch.device, graph: bool) -> float:
    """Seconds per collective over ``iters`` back-to-back calls (replayed from a CUDA graph if asked)."""
    import torch.distributed as dist

    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):  # NCCL's watchdog thread runs meanwhile
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
                op = {
                    "all_reduce": lambda: comm.all_reduce(full),
                    "reduce_scatter": lambda: comm.reduce_scatter(full),
                    "all_gather": lambda: comm.all_gather(part),
                }[coll]
                nbytes = count * full.element_size()
                for _ in range(max(warmup, 1)):  # NCCL sets up before any graph capture
                    op()
                times = [_timed_loop(op, iters, device, launch == "cuda_graph") for _ in range(repeats)]
                slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                points.append((nbytes, float(slowest)))
            out.setdefault(coll, {})[launch] = points
    return out


def commbench(
    tps: list[int],
    device: str = "cpu",
    backend: str = "auto",
    sizes: list[int] | None = None,
    collectives=tuple(RING_FACTOR),
    launches=("eager",),
    iters: int = 20,
    warmup: int = 5,
    repeats: int = 3,
    timeout_s: float = 300,
) -> dict:
    """Measured [collective][launch][N] -> [(bytes, seconds)] on this machine (N ranks per launch)."""
    from suite.parallel import launch as launching

    sizes = sizes or [4**k for k in range(5, 13)]  # 1 KiB .. 16 MiB
    measured: dict = {}
    for tp in tps:
        if tp < 2:
            raise ProfileError(f"tp {tp}: a collective needs at least 2 ranks")
        result = launching.launch(
            _commbench_job,
            tp,
            sizes,
            list(collectives),
            list(launches),
            iters,
            warmup,
            repeats,
            device=device,
            backend=backend,
            timeout_s=timeout_s,
        )
        for coll, by_launch in result.items():
            for launch, points in by_launch.items():
                measured.setdefault(coll, {}).setdefault(launch, {})[tp] = points
    return measured


def profile_document(
    measured: dict, name: str, description: str, source: str, iters: int, repeats: int, sms: int
) -> dict:
    """A profile (YAML-ready) whose tables are the measured samples; ``sms`` is stated, not measured."""
    tables = {
        coll: {
            launch: {n: {"samples_us": [[b, round(s * 1e6, 2)] for b, s in points]} for n, points in by_n.items()}
            for launch, by_n in by_launch.items()
        }
        for coll, by_launch in measured.items()
    }
    method = (
        f"Measured: median of {repeats} timed loops of {iters} back-to-back collectives per size "
        "(float32 buffers, sizes are whole buffers as in nccl-tests), the slowest rank's time. "
        "Latency = the smallest message's time; bus bandwidth at each size carries the rest "
        "(suite.latency.projection.rows_from_samples), interpolated in log(size) between samples."
    )
    sms_source = (
        f"not measured: given to commbench (--sms {sms}); NCCL's kernels take one SM per channel, and "
        "TokenWeave's repository reserves 16 CTAs for its communication kernel"
    )
    return {
        "name": name,
        "description": description,
        "sources": [source],
        "method": method,
        "sms": sms,
        "sms_source": sms_source,
        "tables": tables,
    }


def bandwidth_table(measured: dict) -> str:
    """nccl-tests style: size, time, algbw, busbw per collective, launch mode and N."""
    import pandas as pd

    rows = [
        {
            "collective": coll,
            "launch": launch,
            "N": n,
            "size_B": b,
            "time_us": s * 1e6,
            "algbw_GBps": b / s / 1e9,
            "busbw_GBps": b / s / 1e9 * RING_FACTOR[coll](n),
        }
        for coll, by_launch in measured.items()
        for launch, by_n in by_launch.items()
        for n, points in by_n.items()
        for b, s in points
    ]
    return pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}")


def write_profile(
    measured: dict,
    out: str | None,
    name: str | None,
    device: str,
    backend: str,
    iters: int,
    repeats: int,
    sms: int = 16,
) -> Path:
    """The measured profile as a YAML file (default ``NAME.yaml``); it loads back before it is kept."""
    from suite.environment import environment

    env, host = environment(), socket.gethostname()
    name = name or f"measured-{host}-{backend}"
    what = ", ".join(env["gpus"]) if device == "cuda" else env["cpu"]
    description = f"{backend} on {host} ({device}: {what}; torch {env['torch']}, NCCL {env['nccl']})"
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    source = f"spdbench commbench on {host} at {when} (commit {env['commit']})"
    document = profile_document(measured, name, description, source, iters, repeats, sms)
    path = Path(out or f"{name}.yaml")
    Profile.from_dict(document, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120))
    return path
