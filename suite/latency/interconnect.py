"""Interconnect profiles and the cost of a collective: one model for projected and simulated latency.

A profile gives, for each collective, launch mode (``eager`` or ``cuda_graph``) and N, a table
of latency and bus bandwidth by message size; the modelled time of one collective is

    t(N, B) = latency(N, B) + traffic(N, B) / busbw(N, B),
    traffic = 2(N-1)/N * B (all-reduce),  (N-1)/N * B (reduce-scatter, all-gather),

with latency and 1/busbw interpolated in log(size) between rows and held beyond the ends
(nccl-tests' definitions: ``B`` is the whole buffer). Profiles live in ``suite/latency/profiles``
as YAML with their sources and method; ``spdbench commbench`` measures one on the hardware at
hand.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from suite.errors import SpdbenchError

PROFILE_DIR = Path(__file__).parent / "profiles"
LAUNCHES = ("eager", "cuda_graph")
RING_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n,
               "reduce_scatter": lambda n: (n - 1) / n,
               "all_gather": lambda n: (n - 1) / n}
FUSED_SYNC = "fused_sync"  # reduce-scatter + residual add + RMSNorm + all-gather in one kernel (TokenWeave)
TRAFFIC = RING_FACTOR | {FUSED_SYNC: RING_FACTOR["all_reduce"]}  # bus bytes per buffer byte
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class ProfileError(SpdbenchError):
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
    sms: int = 1  # SMs a collective's kernel occupies while it runs (taken from compute)

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
            if coll not in TRAFFIC or not isinstance(by_launch, dict) or set(by_launch) - set(LAUNCHES):
                raise ProfileError(f"{where}: tables.{coll}: expected a collective ({', '.join(TRAFFIC)}) "
                                   f"mapping launch modes ({', '.join(LAUNCHES)}) to tables by N")
            tables[coll] = {launch: {int(n): _table(e, TRAFFIC[coll](int(n)), f"{where}: {coll}.{launch}.{n}")
                                     for n, e in by_n.items()} for launch, by_n in by_launch.items()}
        if "all_reduce" not in tables:
            raise ProfileError(f"{where}: needs an all_reduce table (other collectives fall back to it)")
        sources = data["sources"] if isinstance(data["sources"], list) else [data["sources"]]
        return cls(data["name"], data.get("description", ""), sources, data["method"], tables, path,
                   int(data.get("sms", 1)))

    def seconds(self, collective: str, n: int, nbytes: int, launch: str = "eager") -> float:
        """Modelled time of one collective of ``nbytes`` over ``n`` ranks.

        A collective without its own table for ``n`` uses the all-reduce table (same links and
        protocols; only the ring factor differs). N between two tabulated N is interpolated.
        """
        if n <= 1:
            return 0.0
        if collective == FUSED_SYNC and FUSED_SYNC not in self.tables:  # no fused kernel: the two collectives
            return self.seconds("reduce_scatter", n, nbytes, launch) + self.seconds("all_gather", n, nbytes, launch)
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
        return latency + TRAFFIC[collective](n) * nbytes * inv_busbw


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
        raise ProfileError(f"interconnect {name_or_path!r}: no such profile file or name; shipped profiles: "
                           f"{', '.join(available_profiles())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with name, sources, method, tables")
    return Profile.from_dict(data, str(path))


