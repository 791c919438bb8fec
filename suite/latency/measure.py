"""Timing one latency cell on a rank: warm-up, repetitions, the slowest rank, communication share.

``measure(runner, comm, prompts, new_tokens, repetitions, warmup, cuda_graph)`` works with any
communicator that has ``rank``, ``world`` and ``stats`` (the real one, or a projecting one that
runs a single rank's shard). Every rank calls it in step. Each repetition is one
``Runner.generate``: its prefill time is the time to first token, its decode steps give the time
per output token, and end-to-end is their sum. After each repetition the ranks exchange their
timings and keep the slowest rank's (a TP step is as slow as its slowest rank).

The communication share (``comm_fraction``) is the share of that rank's end-to-end time spent
waiting for collectives (``comm.stats``), and ``comm_fraction_status`` says how it was obtained:

- CPU (gloo, or a projection's modelled deadlines): the host's wall time blocked in collectives,
  in every timed repetition;
- GPU, eager decode: CUDA events on the stream that waits for each collective (how long it stood
  still), in one extra repetition after the timed ones, so the events do not perturb them;
- GPU with CUDA-graph decode: n/a, a replayed graph's collectives are not timed one by one.

Host time around a non-blocking NCCL call (its enqueue) is never used.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from suite.latency.stats import Timings, summarise
from suite.parallel.comm import Communicator


def _exchanges(comm) -> bool:
    """True when the ranks are separate processes of a torch.distributed group."""
    return isinstance(comm, Communicator) and comm.world > 1 and dist.is_initialized()


def gather_rows(comm, row: list[float]) -> torch.Tensor:
    """[world, len(row)] of every rank's row (just this rank's when there is nothing to exchange)."""
    mine = torch.tensor([row], dtype=torch.float64)
    if not _exchanges(comm):
        return mine
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(comm.group) == "nccl" else "cpu"
    out = [torch.empty_like(mine, device=device) for _ in range(comm.world)]
    dist.all_gather(out, mine.to(device), group=comm.group)
    return torch.cat(out).cpu()


def barrier(comm) -> None:
    """All ranks start the next repetition together."""
    if _exchanges(comm):
        gather_rows(comm, [0.0])


def prompts_for(cell, vocab_size: int) -> list[list[int]]:
    """``batch`` prompts of ``prompt_len`` random token ids, the same on every rank (seeded by ``seed``)."""
    gen = torch.Generator().manual_seed(cell.seed)
    return torch.randint(1, vocab_size, (cell.batch, cell.prompt_len), generator=gen).tolist()


def repetition(runner, comm, prompts: list[list[int]], new_tokens: int, cuda_graph: bool = False):
    """One timed generation on every rank -> the slowest rank's (prefill_ms, decode_ms_per_token or None,
    e2e_ms, comm_fraction or None); ``comm.stats`` must be enabled for the communication share."""
    comm.stats.reset()
    gen = runner.generate(prompts, new_tokens, cuda_graph=cuda_graph)
    decode_s = sum(gen.decode_s)
    per_token_s = decode_s / len(gen.decode_s) if gen.decode_s else float("nan")
    ranks = gather_rows(
        comm, [gen.prefill_s, per_token_s, gen.prefill_s + decode_s, comm.stats.total(), comm.stats.calls]
    )
    _, _, e2e_s, comm_s, calls = ranks[int(ranks[:, 2].argmax())].tolist()
    return (
        1e3 * float(ranks[:, 0].max()),
        1e3 * float(ranks[:, 1].max()) if gen.decode_s else None,
        1e3 * e2e_s,
        comm_s / e2e_s if calls else None,
    )


def comm_share_status(comm, device: torch.device, cuda_graph: bool) -> str:
    """How a cell's communication share is obtained (``measured: ...``, ``modelled: ...``) or why it
    is not (``n/a: ...``)."""
    if comm.world == 1:
        return "n/a: one rank communicates nothing"
    if device.type == "cuda" and cuda_graph:
        return "n/a: decode is replayed from a CUDA graph, whose collectives are not timed one by one"
    kind, what = (
        ("measured", "collectives") if comm.carries_data else ("modelled", "the projection's modelled collectives")
    )
    if device.type == "cuda":
        return (
            f"{kind}: time the waiting stream stood still for {what} (CUDA events), in one extra repetition "
            "after the timed ones"
        )
    return f"{kind}: host time blocked on {what}"


def measure(
    runner,
    comm,
    prompts: list[list[int]],
    new_tokens: int,
    repetitions: int,
    warmup: int,
    cuda_graph: bool = False,
    sampler=None,
    device: torch.device | None = None,
) -> Timings:
    """Warm up, then time ``repetitions`` generations; ``sampler`` (telemetry) spans the timed ones.

    The communication share is taken as ``comm_share_status`` says: in the timed repetitions on a
    CPU, in one extra repetition on a GPU, not at all from a CUDA graph."""
    for _ in range(warmup):
        runner.generate(prompts, new_tokens, cuda_graph=cuda_graph)
    timings = Timings()
    device = device or runner.device
    status = comm_share_status(comm, device, cuda_graph)
    separate = device.type == "cuda"
    comm.stats.enabled = not separate
    try:
        barrier(comm)
        with sampler if sampler is not None else nullcontext():
            for _ in range(repetitions):
                barrier(comm)
                timings.add(*repetition(runner, comm, prompts, new_tokens, cuda_graph))
        if separate and not status.startswith("n/a"):
            comm.stats.enabled = True
            barrier(comm)
            *_, fraction = repetition(runner, comm, prompts, new_tokens, cuda_graph)
            if fraction is not None:
                timings.comm_fraction.append(fraction)
    finally:
        comm.stats.enabled = False
    return timings


def share_fields(timings: Timings, comm, device: torch.device, cuda_graph: bool) -> dict:
    """``comm_fraction_status`` of a cell's row (``comm_fraction`` itself comes from ``summarise``)."""
    status = comm_share_status(comm, device, cuda_graph)
    if not status.startswith("n/a") and not timings.comm_fraction:
        status = "n/a: the strategy issued no collective"
    return {"comm_fraction_status": status}


def gather_objects(comm, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not _exchanges(comm):
        return [obj]
    out = [None] * comm.world
    dist.all_gather_object(out, obj, group=comm.group)
    return out


def measure_cell(cell, runner, comm, device: torch.device) -> dict:
    """Row fields of one latency cell (a ``LatencyScenario``: timings + telemetry); every rank calls it in step."""
    from suite.latency.telemetry import Sampler, combine

    prompts = prompts_for(cell, runner.model.config.vocab_size)
    sampler = Sampler(device)
    timings = measure(
        runner,
        comm,
        prompts,
        cell.new_tokens,
        cell.repetitions,
        cell.warmup,
        cuda_graph=cell.decode_mode == "cuda_graph",
        sampler=sampler,
        device=device,
    )
    tokens = cell.repetitions * cell.batch * cell.new_tokens
    return (
        summarise(timings, cell.batch, cell.new_tokens)
        | share_fields(timings, comm, device, cell.decode_mode == "cuda_graph")
        | combine(gather_objects(comm, sampler.summary()), tokens)
    )
