"""The environment of a measurement: versions, hardware and commit behind a row (torch imported when probed)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path


def now() -> str:
    """The UTC time to the second (a row's ``time`` and its environment's)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def environment() -> dict:
    """Versions and hardware behind a measurement (the process's own: a rank records its torch threads)."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval"),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "host": socket.gethostname(),
        "commit": _git_commit(),
        "nccl": None,
        "gpus": [],
        "driver": None,
        "time": now(),
    }
    if torch.cuda.is_available():
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # NVML absent or unusable: say so
            env["driver"] = f"n/a: {exc.__class__.__name__}"
    return env
