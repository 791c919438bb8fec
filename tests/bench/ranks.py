"""A group of N ranks for pytest-benchmark: rank 0 is the pytest process, ranks 1..N-1 are spawned.

pytest-benchmark times a callable in its own process, so that process must be a rank. The other
ranks run the same number of rounds on their own; every round starts with a barrier (the
benchmark's untimed ``setup``) and ends with an exchange of the ranks' timings, so the time
pytest-benchmark records for a round ends when the slowest rank has finished it.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from suite.latency.measure import Timings, barrier, repetition
from suite.parallel.comm import Communicator
from suite.parallel.runner import load_runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> Communicator:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm = Communicator.from_process_group()
    comm.stats.enabled = True
    return comm


def _follow(rank, world, port, scenario, rounds):
    comm = _join(rank, world, port)
    try:
        runner = load_runner(
            comm,
            torch.device("cpu"),
            scenario["model"],
            scenario["strategy"],
            scenario["strategy_options"],
            scenario["dtype"],
        )
        for _ in range(rounds):
            barrier(comm)
            repetition(runner, comm, scenario["prompts"], scenario["new_tokens"])
    finally:
        dist.destroy_process_group()


class RankGroup:
    """``with RankGroup(scenario, rounds) as g``: ``g.barrier`` and ``g.round`` are rank 0's part of a round."""

    def __init__(self, scenario: dict, rounds: int):
        self.scenario, self.rounds, self.timings = scenario, rounds, Timings()
        self.world = scenario["tp"]

    def __enter__(self) -> RankGroup:
        self._threads = torch.get_num_threads()
        port = _free_port()
        ctx = mp.get_context("spawn")
        self._procs = [
            ctx.Process(target=_follow, args=(r, self.world, port, self.scenario, self.rounds), daemon=True)
            for r in range(1, self.world)
        ]
        for p in self._procs:
            p.start()
        self.comm = _join(0, self.world, port)
        s = self.scenario
        self.runner = load_runner(
            self.comm, torch.device("cpu"), s["model"], s["strategy"], s["strategy_options"], s["dtype"]
        )
        return self

    def barrier(self) -> None:
        barrier(self.comm)

    def round(self) -> None:
        self.timings.add(*repetition(self.runner, self.comm, self.scenario["prompts"], self.scenario["new_tokens"]))

    def __exit__(self, *exc) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        torch.set_num_threads(self._threads)
        failed = [p.exitcode for p in self._procs if p.exitcode]
        if failed and exc[0] is None:
            raise RuntimeError(f"a follower rank exited with code {failed[0]}")
