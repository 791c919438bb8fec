"""Latency rows from pytest-benchmark's JSON (``pytest tests/bench --benchmark-only --benchmark-json=PATH``):
``spdbench bench --import-benchmark PATH`` stores them beside the matrix's rows (the cases: ``tests/bench``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from suite.latency.stats import Timings, summarise
from suite.results import BenchmarkScenario, Row


def import_benchmark(path: str | os.PathLike, command: str = "") -> list[Row]:
    """Latency rows from a pytest-benchmark JSON file (``pytest tests/bench --benchmark-json=PATH``).

    Each case's ``extra_info`` holds its scenario and the slowest rank's prefill / decode / end-to-end
    times per round (the same figures ``spdbench bench`` stores); pytest-benchmark's own median of
    a round is kept as ``benchmark_e2e_ms_median``. A row's scenario names the benchmark and the
    run's date, so importing a file twice yields the same cell ids.
    """
    data = json.loads(Path(path).read_text())
    env = data["machine_info"].get("spdbench_env", data["machine_info"])
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        info.pop("kind")
        timings = Timings(*(info.pop(k) for k in ("prefill_ms", "decode_ms_per_token", "e2e_ms", "comm_fraction")))
        usable = info.pop("usable_model")
        scenario = BenchmarkScenario(**info, benchmark=bench["fullname"], run=data["datetime"])
        values = summarise(timings, scenario.batch, scenario.new_tokens) | {
            "benchmark_e2e_ms_median": 1e3 * bench["stats"]["median"],
            "telemetry_status": "n/a: not sampled by pytest-benchmark",
            "telemetry": {},
        }
        rows.append(
            Row(scenario=scenario, usable_model=usable, values=values, env=env, command=command, time=data["datetime"])
        )
    return rows
