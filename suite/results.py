"""The results store: one JSON object per line (JSONL), one row per scenario cell.

Every row carries ``cell_id`` (a stable hash of its scenario), ``kind`` (``latency``,
``accuracy``, ...), ``status`` (``ok`` / ``failed`` with ``error``), ``provenance``
(``measured`` / ``projected``), the scenario fields, ``env`` and ``command``. Appends are
atomic (the file is rewritten to a temporary file, fsynced and renamed), so a crash or
Ctrl-C never leaves a torn file and never loses a finished row. Read it with
``pandas.read_json(path, lines=True)``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path


def parse_jsonl(text: str, where, error: type[Exception] = ValueError) -> list[dict]:
    """One JSON object per non-blank line; a bad line raises ``error`` naming ``where`` and the line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise error(f"{where}:{n}: not a JSON line ({exc.msg})") from None
    return rows


def cell_id(scenario: dict) -> str:
    """A stable identifier of a scenario (key order does not matter)."""
    return hashlib.sha256(json.dumps(scenario, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        return parse_jsonl(self.path.read_text(), self.path) if self.path.exists() else []

    def finished(self) -> set[str]:
        """cell_ids that completed successfully (their cells are skipped on a re-run)."""
        return {r["cell_id"] for r in self.rows() if r.get("status") == "ok"}

    def append(self, *new_rows: dict) -> None:
        """Add rows atomically; a failed row of a cell is replaced when that cell is re-run."""
        ids = {r.get("cell_id") for r in new_rows}
        kept = [r for r in self.rows() if not (r.get("status") == "failed" and r.get("cell_id") in ids)]
        text = "".join(json.dumps(r, default=str) + "\n" for r in kept + list(new_rows))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions and hardware behind a measurement."""
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "host": socket.gethostname(), "commit": _git_commit(), "nccl": None, "gpus": [], "driver": None,
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
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


def import_benchmark(path: str | os.PathLike, command: str = "") -> list[dict]:
    """Latency rows from a pytest-benchmark JSON file (``pytest tests/bench --benchmark-json=PATH``).

    Each case's ``extra_info`` holds its scenario and the slowest rank's prefill / decode / end-to-end
    times per round (the same figures ``spdbench bench`` stores); pytest-benchmark's own median of
    a round is kept as ``benchmark_e2e_ms_median``. A row's ``cell_id`` covers the benchmark's
    name and the run's date, so importing a file twice yields the same ids.
    """
    from suite.measure import Timings, summarise

    data = json.loads(Path(path).read_text())
    env = data["machine_info"].get("spdbench_env", data["machine_info"])
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        timings = Timings(*(info.pop(k) for k in ("prefill_ms", "decode_ms_per_token", "e2e_ms", "comm_fraction")))
        usable = info.pop("usable_model")
        scenario = info | {"source": "pytest-benchmark", "benchmark": bench["fullname"], "run": data["datetime"]}
        rows.append({"cell_id": cell_id(scenario), **scenario, "status": "ok", "error": None,
                     "provenance": "measured", "usable_model": usable,
                     **summarise(timings, info["batch"], info["new_tokens"]),
                     "benchmark_e2e_ms_median": 1e3 * bench["stats"]["median"],
                     "telemetry_status": "n/a: not sampled by pytest-benchmark", "energy_j": None,
                     "j_per_token": None, "power_w_mean": None, "telemetry": {}, "env": env,
                     "command": command, "time": data["datetime"]})
    return rows
