"""Interconnect profiles and the cost of a collective: one model for projected and simulated latency.

A profile gives, for each collective, launch mode (``eager`` or ``cuda_graph``) and N, a table
of latency and bus bandwidth by message size; the modelled time of one collective is

    t(N, B) = latency(N, B) + traffic(N, B) / busbw(N, B),
    traffic = 2(N-1)/N * B (all-reduce, fused_sync),  (N-1)/N * B (reduce-scatter, all-gather),

with latency and 1/busbw interpolated in log(size) between rows and held beyond the ends
(nccl-tests' definitions: ``B`` is the whole buffer). ``Profile.seconds`` is that cost, the one
function projection and simulation use.

Profiles live in ``suite/latency/profiles`` as YAML: ``name``, ``description``, ``sources``, the
``method`` (one text per launch mode, or one for all), ``sms`` (the SMs a collective's kernel
holds while it runs, taken from compute) with ``sms_source``, optionally ``floors_us`` (the
smallest all-reduce times the sources measured, by launch mode and N: the model never goes
below them), and ``tables``. A table for one N is rows ``[bytes, latency_us, busbw_GBps]``,
``{latency_us: L, busbw_GBps: [[bytes, GBps], ...]}`` or measured ``{samples_us: [[bytes, us],
...]}``. ``spdbench profile NAME`` prints what a profile models; ``spdbench commbench``
measures one on the hardware at hand.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from suite.errors import SpdbenchError
from suite.latency.profile_files import read_mapping

PROFILE_DIR = Path(__file__).parent / "profiles"
LAUNCHES = ("eager", "cuda_graph")
RING_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
}
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
    """One N's table: rows ``[bytes, latency_us, busbw_GBps]``, ``{latency_us, busbw_GBps: [[bytes, GBps], ...]}``
    or ``{samples_us: [[bytes, us], ...]}``."""
    try:
        if isinstance(entry, dict) and "samples_us" in entry:
            return rows_from_samples([(parse_bytes(b), float(us) * 1e-6) for b, us in entry["samples_us"]], factor)
        if isinstance(entry, dict):
            entry = [(b, entry["latency_us"], bw) for b, bw in entry["busbw_GBps"]]
        rows = [(parse_bytes(b), float(lat) * 1e-6, 1 / (float(bw) * 1e9)) for b, lat, bw in entry]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ProfileError(
            f"{where}: expected rows [bytes, latency_us, busbw_GBps], {{latency_us, busbw_GBps: "
            f"[[bytes, GBps], ...]}} or {{samples_us: [[bytes, us], ...]}} ({exc})"
        ) from None
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
    method: dict[str, str]  # launch mode -> how its tables were obtained
    tables: dict[str, dict[str, dict[int, list[tuple[int, float, float]]]]]  # [collective][launch][N] -> rows
    sms: int  # SMs a collective's kernel holds while it runs (taken from compute)
    sms_source: str
    floors: dict[str, dict[int, float]] = field(default_factory=dict)  # [launch][N] -> measured floor (s)
    path: str | None = None

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None) -> Profile:
        where = path or data.get("name", "profile")
        missing = [
            k
            for k in ("name", "sources", "method", "tables", "sms", "sms_source")
            if data.get(k) is None or data.get(k) == "" or data.get(k) == []
        ]
        if missing:
            raise ProfileError(
                f"{where}: missing {', '.join(missing)} (every profile states its source and method, "
                "and the SMs a collective holds with their source)"
            )
        if not isinstance(data["tables"], dict):
            raise ProfileError(f"{where}: tables must map collectives to launch modes to tables by N")
        tables = {}
        for coll, by_launch in data["tables"].items():
            if coll not in TRAFFIC or not isinstance(by_launch, dict) or set(by_launch) - set(LAUNCHES):
                raise ProfileError(
                    f"{where}: tables.{coll}: expected a collective ({', '.join(TRAFFIC)}) "
                    f"mapping launch modes ({', '.join(LAUNCHES)}) to tables by N"
                )
            tables[coll] = {
                launch: {
                    int(n): _table(e, TRAFFIC[coll](int(n)), f"{where}: {coll}.{launch}.{n}") for n, e in by_n.items()
                }
                for launch, by_n in by_launch.items()
            }
        if "all_reduce" not in tables:
            raise ProfileError(f"{where}: needs an all_reduce table (other collectives fall back to it)")
        method = data["method"]
        launches = sorted({launch for by_launch in tables.values() for launch in by_launch})
        method = method if isinstance(method, dict) else dict.fromkeys(launches, str(method))
        if set(launches) - set(method):
            raise ProfileError(f"{where}: method must describe every launch mode of its tables ({', '.join(launches)})")
        sms = data["sms"]
        if not isinstance(sms, int) or sms < 0:  # 0: a transfer by the copy engines, no SM held
            raise ProfileError(f"{where}: sms {sms!r} must be a whole number of SMs (0 or more)")
        try:
            floors = {
                launch: {int(n): float(us) * 1e-6 for n, us in by_n.items()}
                for launch, by_n in (data.get("floors_us") or {}).items()
            }
        except (AttributeError, TypeError, ValueError) as exc:
            raise ProfileError(f"{where}: floors_us must map launch modes to {{N: us}} ({exc})") from None
        if set(floors) - set(LAUNCHES):
            raise ProfileError(f"{where}: floors_us keys must be launch modes ({', '.join(LAUNCHES)})")
        sources = data["sources"] if isinstance(data["sources"], list) else [data["sources"]]
        return cls(
            data["name"],
            data.get("description", ""),
            sources,
            method,
            tables,
            sms,
            str(data["sms_source"]),
            floors,
            path,
        )

    def ns(self, launch: str) -> list[int]:
        """The N the all-reduce table of ``launch`` covers (tabulated; N between them are interpolated)."""
        return sorted(self.tables["all_reduce"].get(launch, {}))

    def launches(self) -> list[str]:
        return [launch for launch in LAUNCHES if self.ns(launch)]

    @property
    def has_fused_sync(self) -> bool:
        """Whether the interconnect runs TokenWeave's fused kernel (a ``fused_sync`` table: multimem)."""
        return FUSED_SYNC in self.tables

    def collectives(self) -> list[str]:
        """The collectives this profile prices: ``fused_sync`` only where it has the fused kernel."""
        return [coll for coll in TRAFFIC if coll != FUSED_SYNC or self.has_fused_sync]

    def seconds(self, collective: str, n: int, nbytes: int, launch: str = "eager") -> float:
        """Modelled time of one collective of ``nbytes`` over ``n`` ranks.

        A collective without its own table for ``n`` uses the all-reduce table (same links and
        protocols; only the ring factor differs; its latency is the all-reduce's). ``fused_sync``
        exists only where the profile has its table (``has_fused_sync``). N between two tabulated N
        is interpolated.
        """
        if n <= 1:
            return 0.0
        if collective == FUSED_SYNC and not self.has_fused_sync:
            raise ProfileError(f"profile {self.name!r} has no fused_sync kernel (no multimem): price its parts")
        by_n = self.tables.get(collective, {}).get(launch, {})
        if not _covers(by_n, n):
            by_n = self.tables["all_reduce"].get(launch, {})
        if not by_n:
            raise ProfileError(
                f"profile {self.name!r} has no {launch} tables; measure them with "
                f"'spdbench commbench{' --cuda-graph' if launch == 'cuda_graph' else ''}'"
            )
        if not _covers(by_n, n):
            raise ProfileError(
                f"profile {self.name!r} covers N = {', '.join(map(str, sorted(by_n)))} ({launch}), "
                f"not N = {n}; measure it with 'spdbench commbench --tp {n}'"
            )
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
    data, path = read_mapping(name_or_path, PROFILE_DIR, "interconnect", ProfileError)
    return Profile.from_dict(data, path)


SIZES = [4**k for k in range(5, 16)]  # 1 KiB .. 1 GiB, the sizes ``spdbench profile`` shows


def modelled_times(profile: Profile, sizes: list[int] | None = None) -> list[dict]:
    """Every collective the profile prices, launch mode, tabulated N and size of ``profile``:
    ``{collective, launch, n, bytes, us}``."""
    return [
        {
            "collective": coll,
            "launch": launch,
            "n": n,
            "bytes": size,
            "us": 1e6 * profile.seconds(coll, n, size, launch),
        }
        for coll in profile.collectives()
        for launch in profile.launches()
        for n in profile.ns(launch)
        for size in sizes or SIZES
    ]
