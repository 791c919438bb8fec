"""The GPU check script, as far as a machine without a GPU can test it: its arguments, its refusal
without a GPU, the matrices its latency steps run, and the figures it derives from result rows."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_steps_fit_in_ten_minutes():
    listed = run("--list")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()[:-1]] == [s.name for s in gpu_check.STEPS]
    assert sum(s.seconds for s in gpu_check.STEPS) <= gpu_check.BUDGET_S <= 600 - 120  # 2 minutes to spare


def _sleeper(seconds: dict):
    """Steps that sleep: ``seconds[name]`` (a negative time: exit 3 at once)."""

    def command_of(name, out, gpu_name):
        if seconds[name] < 0:
            return [sys.executable, "-c", "raise SystemExit(3)"]
        return [sys.executable, "-c", f"import time; time.sleep({seconds[name]})"]

    return command_of


def test_a_step_that_runs_long_is_cut_at_its_box_and_the_next_runs(tmp_path):
    steps = [
        gpu_check.Step("a", 5, "sleeps past its box"),
        gpu_check.Step("b", 30, "fails"),
        gpu_check.Step("c", 30, "passes"),
    ]
    start = time.monotonic()
    outcomes = gpu_check.run_steps(
        steps, tmp_path, "cpu", budget_s=60, command_of=_sleeper({"a": 100, "b": -1, "c": 0})
    )
    assert time.monotonic() - start < 20
    assert [o["outcome"] for o in outcomes] == ["timed out after 5 s", "failed (exit 3)", "ok"]
    assert gpu_check.failed_steps(outcomes) == ["a", "b"]


def test_the_budget_shrinks_the_last_boxes_and_skips_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 2)
    steps = [
        gpu_check.Step("a", 30, "runs long"),
        gpu_check.Step("b", 30, "gets the rest"),
        gpu_check.Step("c", 30, "no time left"),
    ]
    start = time.monotonic()
    outcomes = gpu_check.run_steps(steps, tmp_path, "cpu", budget_s=12, command_of=_sleeper({"a": 7, "b": 100, "c": 0}))
    assert time.monotonic() - start < 14  # never past the budget (and the step's teardown)
    assert outcomes[0]["outcome"] == "ok" and outcomes[1]["outcome"].startswith("timed out")
    assert 3 < outcomes[1]["box"] < 6 and outcomes[2]["outcome"].startswith("skipped:")
    assert gpu_check.failed_steps(outcomes) == ["b"]


def test_the_summary_names_the_failed_steps(tmp_path):
    outcomes = [
        {"step": "gpu-tests", "outcome": "ok", "seconds": 50, "box": 120, "what": "tests"},
        {"step": "ladder-8b", "outcome": "timed out after 150 s", "seconds": 150, "box": 150, "what": "cells"},
    ]
    text = gpu_check.summary(tmp_path, outcomes, {"gpu": "NVIDIA H100"}, "python scripts/gpu_check.py", {})
    assert "Failed steps: ladder-8b." in text and "| ladder-8b | timed out after 150 s | 150 | 150 |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu_in_one_line(tmp_path):
    result = run("--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "x", "--only", "decode-7b,warp-drive"], "unknown step 'warp-drive'"),
        ([], "--out is required"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize("step", ["decode-7b", "ladder-8b", "projection-1", "simulated-1"])
def test_latency_steps_run_well_formed_cells(tmp_path, step):
    from suite.latency.bench import check_settings, load_config

    cmd = gpu_check.command(step, tmp_path, "NVIDIA H200")
    if isinstance(cmd, str):
        pytest.skip(cmd)
    cells = load_config(cmd[cmd.index("--config") + 1])
    assert cells and all(check_settings(c) is None for c in cells), [check_settings(c) for c in cells]
    assert {c.device for c in cells} == {"cuda"} and {c.tp for c in cells} == {1}
    if step == "ladder-8b":  # every strategy and batch of the published scenario, at N = 1
        assert {c.batch for c in cells} == {1, 4, 16, 64} and len({c.strategy for c in cells}) == 5


def _row(mode, batch, prefill, decode, strategy="baseline"):
    return {
        "model": "random:llama3-8b",
        "strategy": strategy,
        "strategy_options": {},
        "tp": 1,
        "batch": batch,
        "prompt_len": 1024,
        "new_tokens": 512,
        "dtype": "bfloat16",
        "decode_mode": "cuda_graph",
        "mode": mode,
        "status": "ok",
        "prefill_ms_median": prefill,
        "decode_ms_per_token_median": decode,
    }


def test_modelled_cells_are_compared_with_their_measurement():
    rows = [
        _row("measured", 1, 100.0, 4.0),
        _row("projected", 1, 103.0, 3.8),
        _row("measured", 16, 50.0, 5.0),
        _row("projected", 16, 60.0, 5.0),
        _row("projected", 64, 1.0, 1.0),
    ]  # no measurement: not compared
    assert gpu_check.compare(rows, "projected") == [
        {
            "strategy": "baseline",
            "batch": 1,
            "prefill_error_pct": pytest.approx(3.0),
            "decode_error_pct": pytest.approx(-5.0),
        },
        {"strategy": "baseline", "batch": 16, "prefill_error_pct": pytest.approx(20.0), "decode_error_pct": 0.0},
    ]
    assert gpu_check.compare(rows, "simulated") == []


def test_decode_bandwidth_is_weights_per_step_time():
    row = {"decode_ms_per_token_median": 5.0}  # 200 steps/s reading 13.5 GB each: 2700 GB/s
    figures = gpu_check.decode_bandwidth(row, 13_500_000_000, peak_gbps=4800.0)
    assert figures == {
        "tokens_per_s": pytest.approx(200.0),
        "bandwidth_gbps": pytest.approx(2700.0),
        "fraction_of_peak": pytest.approx(2700 / 4800),
    }
    assert gpu_check.decode_bandwidth(row, 13_500_000_000, None)["fraction_of_peak"] is None


def test_llama2_7b_weights_are_its_parameter_count():
    # 32 layers x (4 x 4096^2 attention + 3 x 4096 x 11008 MLP + 2 x 4096 norms) + 2 x 32000 x 4096 + 4096
    params = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    assert gpu_check.weight_bytes("random:llama2-7b") == 2 * params
