"""A persistent pool of N rank processes that serves requests.

Tools that build a model once and then call it many times in one process (lm-eval's CLI)
cannot use ``launch`` per call: each spawn costs seconds. A ``RankPool`` launches the ranks
once; every rank builds a server object with ``make_server(comm, device, *args)`` and then
runs the same method calls, in the same order, as the parent sends them: every rank gets
an identical copy of each request, so collectives line up, and rank 0 sends the answer back.
A failing rank ends the whole pool and the pending call raises its ``RankError``.
"""

from __future__ import annotations

import threading

import torch.multiprocessing as mp

from suite.defaults import DEFAULT_TIMEOUT_S
from suite.parallel.launch import launch

_STOP = None


def _serve(comm, device, make_server, args, inboxes, outbox):
    server = make_server(comm, device, *args)
    if comm.rank == 0:
        outbox.put(("ok", "ready"))
    while (message := inboxes[comm.rank].get()) is not _STOP:
        method, call_args = message
        answer = getattr(server, method)(*call_args)
        if comm.rank == 0:
            outbox.put(("ok", answer))


class RankPool:
    """``pool.call("method", *args)`` runs ``server.method(*args)`` on every rank; returns rank 0's answer."""

    def __init__(
        self,
        make_server,
        tp: int,
        *args,
        device: str = "cpu",
        backend: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        ctx = mp.get_context("spawn")
        self._inboxes = [ctx.Queue() for _ in range(tp)]
        self._outbox = ctx.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(make_server, tp, args, device, backend, timeout_s), daemon=True
        )
        self._thread.start()
        self._answer()  # the servers are built

    def _run(self, make_server, tp, args, device, backend, timeout_s):
        try:
            launch(
                _serve,
                tp,
                make_server,
                args,
                self._inboxes,
                self._outbox,
                device=device,
                backend=backend,
                timeout_s=timeout_s,
            )
        except BaseException as exc:  # handed to the caller waiting for an answer
            self._error = exc
        self._outbox.put(("closed", None))

    def _answer(self):
        kind, payload = self._outbox.get()
        if kind == "ok":
            return payload
        self._outbox.put((kind, payload))  # later calls see the pool closed, too
        raise self._error or RuntimeError("the rank pool is closed")

    def call(self, method: str, *args):
        if not self._thread.is_alive():
            raise self._error or RuntimeError("the rank pool is closed")
        for inbox in self._inboxes:
            inbox.put((method, args))
        return self._answer()

    def close(self) -> None:
        if self._thread.is_alive():
            for inbox in self._inboxes:
                inbox.put(_STOP)
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
