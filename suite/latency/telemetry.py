"""NVML telemetry of the GPU a rank uses, sampled in a background thread during a cell.

Each rank samples its own GPU, found by UUID (``torch.cuda.get_device_properties(i).uuid`` ->
``nvmlDeviceGetHandleByUUID``), so the mapping survives ``CUDA_VISIBLE_DEVICES`` reordering.
Recorded: power, energy (delta of the total-energy counter), GPU and memory utilisation, memory
used, SM and memory clocks, temperature, throttle reasons, and NVLink / PCIe throughput where the
GPU reports them. Without a GPU, without ``pynvml`` or without a driver, the summary's status
is ``"n/a: <reason>"`` and the run goes on.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

INTERVAL_S = 0.05
ALL_LINKS = 0xFFFFFFFF  # an NVLink field's scope: UINT_MAX sums every link (nvml.h), a link index reads one
_THROTTLE_REASONS = {  # NVML "clocks event reasons" bits (nvml.h)
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


def _nvml_handle(device: torch.device):
    """(pynvml module, handle, uuid), or raises RuntimeError with the reason telemetry is unavailable."""
    if device.type != "cuda":
        raise RuntimeError(f"no GPU (device {device.type})")
    try:
        import pynvml
    except ImportError:
        raise RuntimeError("pynvml is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise RuntimeError(f"NVML unavailable ({exc})") from None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    try:
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid), uuid
    except pynvml.NVMLError as exc:
        raise RuntimeError(f"NVML does not know GPU {uuid} ({exc})") from None


def _optional(fn, *args):
    """An NVML query that some GPUs do not support: None there."""
    try:
        return fn(*args)
    except Exception:
        return None


class Sampler:
    """``with Sampler(device) as s: work()``, then ``s.summary()``."""

    def __init__(self, device: torch.device, interval_s: float = INTERVAL_S):
        self.device, self.interval_s = device, interval_s
        self.samples: list[dict] = []
        self.reason: str | None = None
        try:
            self._nvml, self._handle, self.uuid = _nvml_handle(device)
        except RuntimeError as exc:
            self.reason = str(exc)
        self._stop = threading.Event()

    def _energy_mj(self):
        return _optional(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)

    def _sample(self) -> dict:
        nv, h = self._nvml, self._handle
        util = _optional(nv.nvmlDeviceGetUtilizationRates, h)
        mem = _optional(nv.nvmlDeviceGetMemoryInfo, h)
        power = _optional(nv.nvmlDeviceGetPowerUsage, h)
        nvlink = _optional(
            nv.nvmlDeviceGetFieldValues,
            h,
            [
                (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, ALL_LINKS),
                (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, ALL_LINKS),
            ],
        )
        nvlink_kib = [v.value.ullVal if v.nvmlReturn == 0 else None for v in nvlink] if nvlink else [None, None]
        return {
            "t": time.perf_counter() - self._start,
            "power_w": power / 1e3 if power is not None else None,
            "gpu_util_pct": util.gpu if util else None,
            "mem_util_pct": util.memory if util else None,
            "mem_used_mib": mem.used / 2**20 if mem else None,
            "sm_clock_mhz": _optional(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": _optional(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM),
            "temp_c": _optional(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
            "throttle": _optional(
                getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
                or nv.nvmlDeviceGetCurrentClocksThrottleReasons,
                h,
            ),
            "pcie_tx_kib_s": _optional(nv.nvmlDeviceGetPcieThroughput, h, nv.NVML_PCIE_UTIL_TX_BYTES),
            "pcie_rx_kib_s": _optional(nv.nvmlDeviceGetPcieThroughput, h, nv.NVML_PCIE_UTIL_RX_BYTES),
            "nvlink_tx_kib": nvlink_kib[0],
            "nvlink_rx_kib": nvlink_kib[1],
        }

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        if self.reason is None:
            self._start = time.perf_counter()
            self._energy0 = self._energy_mj()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.reason is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._stop.set()
            self._thread.join()
            self.samples.append(self._sample())
            energy1 = self._energy_mj()
            self.energy_j = (energy1 - self._energy0) / 1e3 if None not in (energy1, self._energy0) else None

    def summary(self) -> dict:
        """This GPU's figures over the sampled interval (``status`` says "ok" or "n/a: <reason>")."""
        if self.reason is not None:
            return {"status": f"n/a: {self.reason}"}

        def series(key):
            return [s[key] for s in self.samples if s[key] is not None]

        def mean(key):
            values = series(key)
            return statistics.fmean(values) if values else None

        def peak(key):
            values = series(key)
            return max(values) if values else None

        nvlink = {
            k: (v[-1] - v[0]) / (self.samples[-1]["t"] or 1) if len(v := series(k)) > 1 else None
            for k in ("nvlink_tx_kib", "nvlink_rx_kib")
        }
        reasons = 0
        for r in series("throttle"):
            reasons |= r
        name = _optional(self._nvml.nvmlDeviceGetName, self._handle)
        return {
            "status": "ok",
            "uuid": self.uuid,
            "name": name.decode() if isinstance(name, bytes) else name,
            "seconds": self.samples[-1]["t"],
            "energy_j": self.energy_j,
            "power_w_mean": mean("power_w"),
            "power_w_max": peak("power_w"),
            "gpu_util_pct_mean": mean("gpu_util_pct"),
            "mem_util_pct_mean": mean("mem_util_pct"),
            "mem_used_mib_max": peak("mem_used_mib"),
            "sm_clock_mhz_mean": mean("sm_clock_mhz"),
            "mem_clock_mhz_mean": mean("mem_clock_mhz"),
            "temp_c_max": peak("temp_c"),
            "throttle_reasons": sorted(n for bit, n in _THROTTLE_REASONS.items() if reasons & bit & ~0x1),
            "pcie_tx_kib_s_mean": mean("pcie_tx_kib_s"),
            "pcie_rx_kib_s_mean": mean("pcie_rx_kib_s"),
            "nvlink_tx_kib_s": nvlink["nvlink_tx_kib"],
            "nvlink_rx_kib_s": nvlink["nvlink_rx_kib"],
            "timeline": [[round(s["t"], 4), s["power_w"]] for s in self.samples],
        }


def combine(summaries: list[dict], tokens: int) -> dict:
    """Row fields from the per-rank summaries (GPUs shared by several ranks counted once)."""
    gpus = list({s["uuid"]: s for s in summaries if s["status"] == "ok"}.values())
    if not gpus:
        reason = summaries[0]["status"] if summaries else "n/a: no telemetry"
        return {
            "telemetry_status": reason,
            "energy_j": None,
            "j_per_token": None,
            "power_w_mean": None,
            "telemetry": {},
        }
    energies = [g["energy_j"] for g in gpus]
    energy = sum(energies) if None not in energies else None
    powers = [g["power_w_mean"] for g in gpus if g["power_w_mean"] is not None]
    # Total power over time: the GPUs' samples side by side (same interval, started together).
    steps = min(len(g["timeline"]) for g in gpus)
    timeline = [[gpus[0]["timeline"][i][0], sum(g["timeline"][i][1] or 0.0 for g in gpus)] for i in range(steps)]
    return {
        "telemetry_status": "ok",
        "energy_j": energy,
        "j_per_token": energy / tokens if energy is not None and tokens else None,
        "power_w_mean": sum(powers) if powers else None,
        "telemetry": {"gpus": gpus, "timeline": timeline},
    }
