"""Device profiles and the cost of one kernel: the compute side of simulated latency.

A device profile (``suite/latency/devices/*.yaml``, under the same rules as interconnect profiles:
name, sources, method, tables) says what one GPU achieves per kernel class. A kernel costs

    t = floor(class) + max(flops / achievable FLOP/s(class, shape), bytes / achievable bandwidth)

- ``gemm``: matmul FLOP/s by the number of output rows M (tokens), interpolated in log(M) and held
  beyond the ends; float32 matmuls at ``fp32_fraction`` of that;
- ``attention``: fused attention FLOP/s by key length, causal or full;
- ``elementwise`` (pointwise ops, norms, reductions, copies): bandwidth-bound;
- ``floor``: the time a kernel of the class takes however small its work (ramp-up and tail).

Launch overhead (``launch_us``): in eager mode the host spends ``eager`` per kernel issued (the device
starts a kernel only once it has been issued); a CUDA-graph replay costs the host ``graph_replay``
once and each node ``graph_node`` on the device. ``sms`` and ``memory_gb`` give the SM count (the
share a collective's kernel takes from compute) and the memory a rank may fill. This module imports
no torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suite.errors import SpdbenchError
from suite.latency.profile_files import read_mapping

DEVICE_DIR = Path(__file__).parent / "devices"
KERNEL_CLASSES = ("gemm", "attention", "elementwise")
LAUNCH_KEYS = ("eager", "graph_node", "graph_replay")
REQUIRED = (
    "name",
    "sources",
    "method",
    "sms",
    "memory_gb",
    "bandwidth_gbps",
    "floor_us",
    "launch_us",
    "gemm_tflops",
    "fp32_fraction",
    "attention_tflops",
)


class DeviceProfileError(SpdbenchError):
    """A device profile is missing or malformed."""


def _rows(value, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``[[x, y], ...]`` with increasing positive x -> (log x, y)."""
    try:
        xs, ys = zip(*((float(x), float(y)) for x, y in value))
    except (TypeError, ValueError) as exc:
        raise DeviceProfileError(f"{where}: expected rows [[size, value], ...] ({exc})") from None
    if min(xs) <= 0 or min(ys) <= 0 or list(xs) != sorted(set(xs)):
        raise DeviceProfileError(f"{where}: sizes must increase and every value must be positive")
    return np.log(xs), np.array(ys)


def _interpolate(table: tuple[np.ndarray, np.ndarray], x: float) -> float:
    """The table's value at ``x``: linear in log(x) between rows, held beyond the ends."""
    return float(np.interp(math.log(max(x, 1)), *table))


@dataclass
class DeviceProfile:
    """What one GPU achieves per kernel class, its launch overhead, SM count and memory."""

    name: str
    description: str
    sources: list[str]
    method: str
    sms: int
    memory_bytes: float
    bandwidth: float  # achievable bytes/s of a bandwidth-bound kernel
    floor_s: dict[str, float]
    launch_s: dict[str, float]
    gemm_flops: tuple[np.ndarray, np.ndarray]  # by log(M)
    fp32_fraction: float
    attention_flops: dict[str, tuple[np.ndarray, np.ndarray]]  # "causal" / "full", by log(key length)
    path: str | None = None

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None) -> DeviceProfile:
        where = path or data.get("name", "device profile")
        missing = [k for k in REQUIRED if data.get(k) in (None, "", [], {})]
        if missing:
            raise DeviceProfileError(
                f"{where}: missing {', '.join(missing)} (every profile states its source "
                f"and method and gives {', '.join(REQUIRED[3:])})"
            )
        floor, launch, attention = data["floor_us"], data["launch_us"], data["attention_tflops"]
        if not isinstance(floor, dict) or set(floor) != set(KERNEL_CLASSES):
            raise DeviceProfileError(f"{where}: floor_us must give {', '.join(KERNEL_CLASSES)} in microseconds")
        if not isinstance(launch, dict) or set(launch) != set(LAUNCH_KEYS):
            raise DeviceProfileError(f"{where}: launch_us must give {', '.join(LAUNCH_KEYS)} in microseconds")
        if not isinstance(attention, dict) or set(attention) != {"causal", "full"}:
            raise DeviceProfileError(f"{where}: attention_tflops must give causal and full tables by key length")
        try:
            numbers = {k: float(data[k]) for k in ("sms", "memory_gb", "bandwidth_gbps", "fp32_fraction")}
            floor_s = {k: float(v) * 1e-6 for k, v in floor.items()}
            launch_s = {k: float(v) * 1e-6 for k, v in launch.items()}
        except (TypeError, ValueError) as exc:
            raise DeviceProfileError(f"{where}: expected numbers ({exc})") from None
        if min(numbers.values()) <= 0 or min(floor_s.values()) < 0 or min(launch_s.values()) < 0:
            raise DeviceProfileError(
                f"{where}: sms, memory, bandwidth and fp32_fraction must be positive, "
                f"floors and launch times non-negative"
            )

        def scaled(rows, key):
            logs, tflops = _rows(rows, f"{where}: {key}")
            return logs, tflops * 1e12

        sources = data["sources"] if isinstance(data["sources"], list) else [data["sources"]]
        return cls(
            data["name"],
            data.get("description", ""),
            sources,
            data["method"],
            int(numbers["sms"]),
            numbers["memory_gb"] * 1e9,
            numbers["bandwidth_gbps"] * 1e9,
            floor_s,
            launch_s,
            scaled(data["gemm_tflops"], "gemm_tflops"),
            numbers["fp32_fraction"],
            {k: scaled(v, f"attention_tflops.{k}") for k, v in attention.items()},
            path,
        )

    def flops_per_s(
        self, kind: str, rows: int = 1, keys: int = 1, causal: bool = False, float32: bool = False
    ) -> float:
        """Achievable FLOP/s of a kernel class at its shape (elementwise kernels: unbounded)."""
        if kind == "gemm":
            return _interpolate(self.gemm_flops, rows) * (self.fp32_fraction if float32 else 1.0)
        if kind == "attention":
            return _interpolate(self.attention_flops["causal" if causal else "full"], keys)
        return math.inf

    def kernel_seconds(
        self,
        kind: str,
        flops: float,
        nbytes: float,
        rows: int = 1,
        keys: int = 1,
        causal: bool = False,
        float32: bool = False,
    ) -> float:
        """Device time of one kernel: its class's floor plus the roofline of its work."""
        rate = self.flops_per_s(kind, rows, keys, causal, float32)
        return self.floor_s[kind] + max(flops / rate, nbytes / self.bandwidth)


def available_devices() -> list[str]:
    return sorted(p.stem for p in DEVICE_DIR.glob("*.yaml"))


def load_device(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A shipped device profile by name (``h100-sxm``) or a profile file (e.g. from ``spdbench devbench``)."""
    data, path = read_mapping(
        name_or_path, DEVICE_DIR, "device_profile", DeviceProfileError, " (or measure one with spdbench devbench)"
    )
    return DeviceProfile.from_dict(data, path)
