"""Run a function on N tensor-parallel ranks: spawned from the CLI, or under torchrun.

``launch(fn, tp, *args)`` calls ``fn(comm, device, *args)`` on every rank and returns rank 0's
result. Under ``torchrun`` (env:// rendezvous, so multi-node works) the current process is
one rank; otherwise N processes are started (forked from a server that has the
imports done, so a launch costs no N-fold torch import). A rank that fails ends the whole run at once
(the others are terminated) with a ``RankError`` naming the rank and its error; collectives
also carry a process-group timeout, so a lost rank can never hang the run.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from suite.defaults import DEFAULT_TIMEOUT_S
from suite.errors import RankError, SpdbenchError
from suite.parallel.comm import Communicator

_GRACE_S = 1.0


class LaunchError(SpdbenchError):
    """The requested ranks cannot be placed (e.g. more NCCL ranks than GPUs)."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def local_ranks(tp: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE (several nodes share the N ranks), else all N."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if under_torchrun() and "LOCAL_WORLD_SIZE" in os.environ else tp


def choose_backend(tp: int, local: int, gpus: int, backend: str = "auto") -> str:
    """NCCL when each of this node's ``local`` ranks of ``tp`` has its own of ``gpus`` GPUs, else gloo."""
    if backend == "nccl" and local > gpus:
        raise LaunchError(
            f"tp {tp} with NCCL needs {local} GPUs on this node but {gpus} are available; "
            "lower tp or use backend gloo to share GPUs"
        )
    if backend == "auto":
        return "nccl" if local <= gpus else "gloo"
    return backend


def placement(tp: int, device: str, backend: str = "auto") -> str:
    """The process-group backend for ``tp`` ranks on ``device``; raises LaunchError if impossible."""
    if tp < 1:
        raise LaunchError(f"tp {tp} is invalid: it must be at least 1")
    if device == "cpu":
        if backend == "nccl":
            raise LaunchError("backend nccl needs device cuda")
        return "gloo"
    if not torch.cuda.is_available():
        raise LaunchError("device cuda: no CUDA GPU is available; use device cpu")
    return choose_backend(tp, local_ranks(tp), torch.cuda.device_count(), backend)


def _rank_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, backend: str, timeout_s: float, device: torch.device) -> Communicator:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 or dist.is_torchelastic_launched():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return Communicator.from_process_group()


def _worker(rank, world, port, backend, device, timeout_s, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    try:
        dev = _rank_device(device, rank)
        comm = _init(rank, world, backend, timeout_s, dev)
        out = fn(comm, dev, *args)
        # Plain pickle copies tensors into the message: torch's shared-memory handles would
        # die with this process before the parent reads them.
        results.put(("done", rank, pickle.dumps(out) if rank == 0 else None))
    except BaseException as exc:  # report, then let the parent end the others
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        results.put(("error", rank, detail + "\n" + traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _raise_if_dead(procs, exclude) -> None:
    for rank, p in enumerate(procs):
        if rank not in exclude and p.exitcode not in (None, 0):
            raise RankError(rank, f"process exited with code {p.exitcode}")


def launch(fn, tp: int, *args, device: str = "cpu", backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """``fn(comm, device, *args)`` on ``tp`` ranks; returns rank 0's result (this rank's under torchrun)."""
    backend = placement(tp, device, backend)
    if under_torchrun():
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != tp:
            raise LaunchError(f"tp {tp} does not match torchrun's world size {world}")
        dev = _rank_device(device, int(os.environ.get("LOCAL_RANK", 0)))
        return fn(_init(rank, world, backend, timeout_s, dev), dev, *args)
    if tp == 1:
        return fn(Communicator(), _rank_device(device, 0), *args)
    # A fork server imports torch and the model code once; each rank is a cheap fork of it.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["suite.parallel.runner"])
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, tp, port, backend, device, timeout_s, fn, args, results), daemon=True)
        for r in range(tp)
    ]
    for p in procs:
        p.start()
    done, answer = set(), None
    try:
        while len(done) < tp:
            try:
                kind, rank, payload = results.get(timeout=0.5)
            except queue.Empty:
                _raise_if_dead(procs, done)
                continue
            if kind == "error":
                # Peers of a failed rank fail too (broken connections); a rank that died without a
                # word is the likelier cause, so look for one before blaming the reporter.
                time.sleep(_GRACE_S)
                _raise_if_dead(procs, done | {rank})
                summary, _, trace = payload.partition("\n")
                raise RankError(rank, summary) from RuntimeError(trace)
            done.add(rank)
            if rank == 0:
                answer = pickle.loads(payload)
    finally:
        for p in procs:
            if p.is_alive() and len(done) < tp:
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return answer


def control_group(seconds: float):
    """A gloo group beside the collectives' own, whose calls give up after ``seconds`` (None on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))


def agree(group, error: str | None) -> str | None:
    """Every rank's outcome of a step, exchanged on ``group``: the lowest failing rank's error, or None.

    Ranks that all reach this agree and go on together. A rank whose peers do not arrive within the
    group's timeout (it failed alone while they wait inside a collective of the step) gets a
    RankError and should end: its exit breaks its peers' collectives instead of leaving them to wait
    for the collectives' own timeout.
    """
    if group is None:
        return error
    errors = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(errors, error, group=group)
    except Exception:  # a peer is stuck in the step or gone
        raise RankError(dist.get_rank(), error or "peers did not finish the step") from None
    return next((e for e in errors if e), None)


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
