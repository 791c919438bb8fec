"""The virtual clock of one simulated rank: a host that issues work, compute streams and one link.

Times are seconds from the start of a step, when host and device are idle (the runner synchronises
with the device at the start of every step). A kernel starts once

- it has been issued: in eager mode the host spends ``launch_us.eager`` per kernel, so a run of small
  kernels is launch-bound; a CUDA-graph replay is issued once (``graph_replay``) and each node adds
  ``graph_node`` on the device;
- its stream has finished the work issued before it;
- its inputs are ready: a tensor made on another stream is ready when its producer ends (data
  dependencies stand for the CUDA events a strategy records and waits for).

Collectives run one after another on the link (one communication stream: they queue). A collective
starts once the stream that issues it has finished what it issued before (NCCL's stream waits for the
current one); a synchronous collective, or ``wait()`` on an async one, makes the issuing stream wait
for its end. While a collective is in flight its kernel holds ``sms`` of the device's SMs, and a
compute kernel progresses at the remaining share, so overlap is not free. Compute kernels of two
streams do not run faster together than one after the other: a kernel waits while kernels of another
stream, placed before it, hold the device.
"""

from __future__ import annotations

import bisect
import math
from contextlib import contextmanager

from suite.errors import SpdbenchError
from suite.latency.device import DeviceProfile

COMPUTE = "compute"
SIDE = "side"


class Buffer:
    """The memory behind a tensor and its views: its size, and when its last writer ends.

    Its size counts as live memory until the last tensor that uses it is gone.
    """

    __slots__ = ("nbytes", "ready", "clock", "__weakref__")

    def __init__(self, nbytes: int, ready: float, clock: Timeline | None):
        self.nbytes, self.ready, self.clock = nbytes, ready, clock
        if clock is not None:
            clock.live += nbytes
            clock.peak = max(clock.peak, clock.live)

    def __del__(self):
        if self.clock is not None:
            self.clock.live -= self.nbytes


class Timeline:
    """One step of one rank on the virtual clock (``reset`` starts the next step)."""

    def __init__(self, device: DeviceProfile, collective_sms: int):
        if not 0 <= collective_sms < device.sms:
            raise SpdbenchError(
                f"sms {collective_sms}: a collective's kernel must leave some of the "
                f"{device.sms} SMs of {device.name} to compute"
            )
        self.device = device
        self.share = 1 - collective_sms / device.sms  # compute's share of the SMs while a collective runs
        self.barriers = []  # callbacks run before anything that orders work across streams
        self.live = self.peak = 0
        self.log: list | None = None
        self.reset()

    def reset(self) -> None:
        self.host = 0.0
        self.free = {COMPUTE: 0.0}
        self.stream = COMPUTE
        self.graph = False
        self.links: list[tuple[float, float]] = []  # collectives in issue order (one link: they never overlap)
        self._link_ends: list[float] = []
        self.busy: list[tuple[float, float]] = []  # compute kernels of every stream
        self._stream_kernels: dict[str, tuple[list, list]] = {}  # each stream's kernels and their ends, in order
        self.kernels = 0
        self.peak = self.live

    @property
    def launch(self) -> str:
        """The launch mode of work issued now (an interconnect profile's table key)."""
        return "cuda_graph" if self.graph else "eager"

    def _barrier(self) -> None:
        for flush in self.barriers:
            flush()

    def _issued(self) -> float:
        """Host side of issuing one kernel; the earliest time the device may start it."""
        if not self.graph:
            self.host += self.device.launch_s["eager"]
        return self.host

    def kernel(self, seconds: float, ready: float = 0.0) -> float:
        """A compute kernel of ``seconds`` (at the whole device) on the current stream whose inputs are
        ready at ``ready``; returns its end."""
        if self.log is not None:
            self.log.append(seconds)
        start = max(self._issued(), self.free[self.stream], ready)
        work = seconds + (self.device.launch_s["graph_node"] if self.graph else 0.0)
        others = [
            k
            for stream, (kernels, ends) in self._stream_kernels.items()
            if stream != self.stream
            for k in kernels[bisect.bisect_right(ends, start) :]
        ]
        end = self._shared(start, work, others) if others else self._progress(start, work)
        self.free[self.stream] = end
        self.busy.append((start, end))
        kernels, ends = self._stream_kernels.setdefault(self.stream, ([], []))
        kernels.append((start, end))
        ends.append(end)
        self.kernels += 1
        return end

    def _progress(self, start: float, work: float) -> float:
        """When ``work`` seconds of compute started at ``start`` end, at ``share`` while a collective runs."""
        t, left, links = start, work, self.links
        for i in range(bisect.bisect_right(self._link_ends, t), len(links)):
            begin, end = links[i]
            if begin > t:
                if left <= begin - t:
                    return t + left
                left, t = left - (begin - t), begin
            span = (end - t) * self.share
            if left <= span:
                return t + left / self.share
            left, t = left - span, end
        return t + left

    def _shared(self, start: float, work: float, others: list[tuple[float, float]]) -> float:
        """As ``_progress``, with kernels of other streams placed before: the device runs them first
        (two compute kernels share the SMs and the memory: the total work is what it is)."""
        links = self.links[bisect.bisect_right(self._link_ends, start) :]
        t, left = start, work
        while True:
            busy_until = max((end for begin, end in others if begin <= t < end), default=None)
            if busy_until is not None:
                t = busy_until
                continue
            rate = self.share if any(begin <= t < end for begin, end in links) else 1.0
            edges = [x for begin, end in links for x in (begin, end) if x > t] + [b for b, _ in others if b > t]
            edge = min(edges, default=math.inf)
            if left <= (edge - t) * rate:
                return t + left / rate
            left, t = left - (edge - t) * rate, edge

    def collective(self, seconds: float, ready: float = 0.0) -> float:
        """A collective of ``seconds`` on the link, issued from the current stream; returns its end."""
        self._barrier()
        start = max(self._issued(), self.free[self.stream], ready, self._link_ends[-1] if self.links else 0.0)
        end = start + seconds
        self.links.append((start, end))
        self._link_ends.append(end)
        return end

    def wait(self, until: float) -> None:
        """The current stream waits until ``until`` (a synchronous collective, or ``Pending.wait()``)."""
        self._barrier()
        self.free[self.stream] = max(self.free[self.stream], until)

    def sync_host(self) -> None:
        """The host waits for the device (a value read back, e.g. ``.item()``)."""
        self._barrier()  # the kernels it waits for are issued (and recorded) first
        if self.log is not None:
            self.log.append(None)
        self.host = self.end()

    @contextmanager
    def recording(self):
        """Yields the list of what is issued inside (kernel seconds, None for a host sync), for ``replay``."""
        self._barrier()
        self.log = []
        try:
            yield self.log
        finally:
            self._barrier()
            self.log = None

    def replay(self, issued: list) -> None:
        """Issue again what a ``recording`` saw (on the current stream, in order)."""
        for seconds in issued:
            if seconds is None:
                self.sync_host()
            else:
                self.kernel(seconds)

    def end(self) -> float:
        """When everything issued so far has finished."""
        self._barrier()
        return max([self.host, *self.free.values(), *self._link_ends])

    @contextmanager
    def side_stream(self):
        """Work on a second stream that first waits for the current one (``wait_stream``)."""
        self._barrier()
        before = self.stream
        self.free[SIDE] = max(self.free.get(SIDE, 0.0), self.free[before])
        self.stream = SIDE
        try:
            yield
        finally:
            self._barrier()
            self.stream = before

    @contextmanager
    def graph_replay(self):
        """The kernels issued inside are the nodes of one CUDA-graph replay."""
        self._barrier()
        self.host += self.device.launch_s["graph_replay"]
        self.graph = True
        try:
            yield
        finally:
            self._barrier()
            self.graph = False

    def exposed_communication(self) -> float:
        """Time with a collective in flight and no compute kernel running on any stream."""
        self._barrier()
        merged: list[list[float]] = []
        for start, end in sorted(self.busy):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        starts, exposed = [m[0] for m in merged], 0.0
        for begin, end in self.links:
            exposed += end - begin
            for a, b in merged[max(bisect.bisect_right(starts, begin) - 1, 0) : bisect.bisect_left(starts, end)]:
                exposed -= max(0.0, min(end, b) - max(begin, a))
        return exposed

    def communication(self) -> float:
        """Total time collectives occupied the link."""
        return sum(end - begin for begin, end in self.links)
