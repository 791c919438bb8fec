#!/usr/bin/env python3
"""Every GPU check of the suite in one run on one H100 or H200, in under 10 minutes.

    python scripts/gpu_check.py --out out/gpu-check          # all steps, in order
    python scripts/gpu_check.py --list                        # the steps and their time boxes
    python scripts/gpu_check.py --out DIR --only decode-7b    # some of them

Each step runs as its own process (group) with its own time box; a step that fails or runs out of
time is recorded and the next one runs. The boxes draw on one budget (``BUDGET_S``, 8 minutes,
leaving 2 of the 10 for the start, the figures and the summary): a step gets its box or what is
left of the budget, whichever is less, and is skipped when less than ``MIN_STEP_S`` is left, so a
step that runs long cuts the steps after it, never the total. The latency steps write one results
store, ``OUT/bench.jsonl``, cell by cell (a timed-out step keeps its finished cells); every step
leaves its log (``OUT/<step>.log``); ``OUT/summary.md`` names the device, driver, torch, CUDA and
NCCL versions, the command, each step's outcome and figures, and the failed steps. The script
exits 0 once the summary is written, whatever the steps did (2 on bad arguments or without a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_USAGE = 2
BUDGET_S = 480  # every step together
MIN_STEP_S = 20  # a step given less than this is skipped
DEVICE_PROFILES = {"H100": "h100-sxm", "H200": "h200"}  # GPU name fragment -> shipped device profile
# The ladder scenario's shapes at N = 1, shortened to fit the budget (prompt 512, 128 new tokens).
LLAMA3_8B = {
    "model": "random:llama3-8b",
    "prompt_len": 512,
    "new_tokens": 128,
    "dtype": "bfloat16",
    "device": "cuda",
    "decode_mode": "cuda_graph",
    "tp": 1,
    "repetitions": 2,
    "warmup": 1,
}
COMPARED_BATCHES = [1, 16]  # the cells projected and simulated against their measurement


@dataclasses.dataclass
class Step:
    name: str
    seconds: int  # time box
    what: str


STEPS = [
    Step("install", 30, "install the package without dependencies when its commands are not registered"),
    Step(
        "gpu-tests",
        120,
        "pytest -m gpu (CUDA decode against Hugging Face, CUDA graphs, NVML, the SM-holding "
        "link, tokenweave's two streams), 60 s per test",
    ),
    Step("decode-7b", 60, "random:llama2-7b, bfloat16, batch 1, CUDA-graph decode: tokens/s and memory bandwidth"),
    Step(
        "ladder-8b",
        150,
        "configs/gpu-ladder.yaml strategies and batches of random:llama3-8b at N = 1 (prompt "
        "512, 128 new tokens), with NVML power and energy",
    ),
    Step("projection-1", 45, "projected N = 1 against the measured cells (no link involved: within 5%)"),
    Step("devbench", 30, "spdbench devbench: a device profile measured on this GPU"),
    Step("simulated-1", 30, "simulated N = 1 against the measured cells on the same device"),
]


class UsageError(Exception):
    """Bad arguments or no GPU: one line, exit 2."""


# ---------------------------------------------------------------- what each step runs


def _bench(out: Path, name: str, config: dict) -> list[str]:
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return [sys.executable, "-m", "suite.cli", "bench", "--config", str(path), "--out", str(out)]


def _device_profile(gpu_name: str) -> str | None:
    return next((profile for key, profile in DEVICE_PROFILES.items() if key in gpu_name), None)


def command(step: str, out: Path, gpu_name: str) -> list[str] | str:
    """The command line of a step, or the reason it is skipped."""
    commands = {ep.name for ep in entry_points(group="spdbench.commands")}
    if step == "install":
        if "bench" in commands:
            return "the package is installed"
        return [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)]
    if step == "gpu-tests":
        return [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            "--timeout=60",
            f"--junitxml={out / 'gpu-tests.xml'}",
            str(REPO / "tests"),
        ]
    if step == "decode-7b":
        return _bench(
            out,
            step,
            {
                "model": "random:llama2-7b",
                "dtype": "bfloat16",
                "device": "cuda",
                "decode_mode": "cuda_graph",
                "batch": 1,
                "prompt_len": 32,
                "new_tokens": 256,
                "repetitions": 3,
                "warmup": 1,
            },
        )
    if step == "ladder-8b":
        import yaml

        ladder = yaml.safe_load((REPO / "configs" / "gpu-ladder.yaml").read_text())
        # at N = 1 a composite (spd+...) runs what its parts run: the single methods fill the box
        single = [s for s in ladder["strategies"] if "+" not in (s if isinstance(s, str) else s["name"])]
        return _bench(out, step, LLAMA3_8B | {"strategies": single, "batch": ladder["batch"]})
    if step == "projection-1":
        return _bench(
            out, step, LLAMA3_8B | {"batch": COMPARED_BATCHES, "mode": "projected", "interconnect": "h100-nvswitch"}
        )
    if step == "devbench":
        if "devbench" not in commands:
            return "spdbench devbench is not part of this version"
        return [sys.executable, "-m", "suite.cli", "devbench", "--out", str(out / "device-profile.yaml")]
    if step == "simulated-1":
        measured_profile = out / "device-profile.yaml"
        profile = str(measured_profile) if measured_profile.exists() else _device_profile(gpu_name)
        if profile is None:
            return f"no device profile for {gpu_name} (and devbench wrote none)"
        return _bench(
            out,
            step,
            LLAMA3_8B
            | {
                "batch": COMPARED_BATCHES,
                "mode": "simulated",
                "device_profile": profile,
                "interconnect": "h100-nvswitch",
            },
        )
    raise UsageError(f"unknown step {step!r}")


# ---------------------------------------------------------------- figures from the results


def rows(out: Path) -> list[dict]:
    path = out / "bench.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def decode_bandwidth(row: dict, weight_bytes: int, peak_gbps: float | None) -> dict:
    """gpt-fast's figure: the bytes one decode step reads (the weights) times steps per second."""
    per_token_s = row["decode_ms_per_token_median"] / 1e3
    gbps = weight_bytes / per_token_s / 1e9
    return {
        "tokens_per_s": 1 / per_token_s,
        "bandwidth_gbps": gbps,
        "fraction_of_peak": gbps / peak_gbps if peak_gbps else None,
    }


def compare(results: list[dict], mode: str) -> list[dict]:
    """Each ok ``mode`` row against the measured row of the same cell: relative error of prefill and decode."""

    def key(r):
        return (
            r["model"],
            r["strategy"],
            json.dumps(r["strategy_options"], sort_keys=True),
            r["tp"],
            r["batch"],
            r["prompt_len"],
            r["new_tokens"],
            r["dtype"],
            r["decode_mode"],
        )

    measured = {key(r): r for r in results if r["mode"] == "measured" and r["status"] == "ok"}
    out = []
    for r in results:
        if r["mode"] != mode or r["status"] != "ok" or key(r) not in measured:
            continue
        m = measured[key(r)]
        errors = {
            f"{phase}_error_pct": 100 * (r[f] / m[f] - 1)
            for phase, f in (("prefill", "prefill_ms_median"), ("decode", "decode_ms_per_token_median"))
        }
        out.append({"strategy": r["strategy"], "batch": r["batch"], **errors})
    return out


def failed_steps(outcomes: list[dict]) -> list[str]:
    """The steps that neither passed nor were skipped on purpose."""
    return [o["step"] for o in outcomes if o["outcome"] != "ok" and not o["outcome"].startswith("skipped")]


def summary(out: Path, outcomes: list[dict], env: dict, command_line: str, figures: dict) -> str:
    """The markdown summary of a run."""
    lines = ["# GPU check", "", f"Command: `{command_line}`", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "| step | outcome | seconds | box | what |", "|---|---|--:|--:|---|"]
    lines += [f"| {o['step']} | {o['outcome']} | {o['seconds']:.0f} | {o['box']:.0f} | {o['what']} |" for o in outcomes]
    failed = failed_steps(outcomes)
    lines += ["", f"Failed steps: {', '.join(failed)}." if failed else "Failed steps: none."]
    for title, value in figures.items():
        lines += ["", f"## {title}", "", "```", json.dumps(value, indent=1), "```"]
    lines += ["", f"Rows: `{out / 'bench.jsonl'}`; logs: `{out}/<step>.log`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the device and the run


def gpu_environment() -> dict:
    """The environment of a measurement (``suite.environment``) with the GPU this runs on and its peak
    memory bandwidth, or UsageError when there is no GPU."""
    import torch

    from suite.environment import environment

    if not torch.cuda.is_available():
        raise UsageError("no CUDA GPU is visible: run this on a machine with an H100 or H200")
    env = environment() | {"gpu": torch.cuda.get_device_name(0), "peak_memory_gbps": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        # HBM transfers twice per clock: bytes/s = 2 x memory clock x bus width / 8
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        env["peak_memory_gbps"] = 2 * clock_mhz * 1e6 * pynvml.nvmlDeviceGetMemoryBusWidth(handle) / 8 / 1e9
    except Exception:  # NVML missing (environment() says so in its driver field): the peak stays unknown
        pass
    return env


def weight_bytes(model: str, dtype_bytes: int = 2) -> int:
    """Bytes of every weight of a ``random:<preset>`` model at N = 1 (what one decode step reads)."""
    import torch

    from suite.model.presets import preset_config
    from suite.model.sharding import build_weightless_rank_model
    from suite.vocabulary import random_preset

    skeleton = build_weightless_rank_model(preset_config(random_preset(model)), 1, 0, torch.float32)  # shapes only
    return sum(p.numel() for p in skeleton.parameters()) * dtype_bytes


def run_step(step: Step, out: Path, gpu_name: str, box: float, command_of=None) -> dict:
    """Run one step in its own process group for at most ``box`` seconds (the group is killed after)."""
    start = time.monotonic()
    result = {"step": step.name, "seconds": 0.0, "box": box, "what": step.what}
    try:
        cmd = (command_of or command)(step.name, out, gpu_name)
    except Exception as exc:  # a step that cannot even be prepared fails on its own
        return result | {"outcome": f"failed: {exc.__class__.__name__}: {exc}"}
    if isinstance(cmd, str):
        return result | {"outcome": f"skipped: {cmd}"}
    with open(out / f"{step.name}.log", "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=box)
            outcome = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started
            proc.wait()
            outcome = f"timed out after {box:.0f} s"
    print(f"gpu-check: {step.name}: {outcome}", flush=True)
    return result | {"outcome": outcome, "seconds": time.monotonic() - start}


def run_steps(steps: list[Step], out: Path, gpu_name: str, budget_s: float = BUDGET_S, command_of=None) -> list[dict]:
    """Each step in order, its box cut to what is left of ``budget_s``; skipped once too little is left."""
    start, outcomes = time.monotonic(), []
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        if left < MIN_STEP_S:
            outcomes.append(
                {
                    "step": step.name,
                    "outcome": f"skipped: {left:.0f} s of the {budget_s:.0f} s budget left",
                    "seconds": 0.0,
                    "box": 0.0,
                    "what": step.what,
                }
            )
            continue
        outcomes.append(run_step(step, out, gpu_name, min(step.seconds, left), command_of))
    return outcomes


def figures(out: Path, env: dict) -> dict:
    results, found = rows(out), {}
    decode = [r for r in results if r["model"] == "random:llama2-7b" and r["status"] == "ok"]
    if decode:
        found["decode of random:llama2-7b (batch 1, bfloat16, CUDA graph)"] = decode_bandwidth(
            decode[0], weight_bytes("random:llama2-7b"), env["peak_memory_gbps"]
        )
    ladder = [r for r in results if r["model"] == "random:llama3-8b" and r["mode"] == "measured"]
    if ladder:
        found["random:llama3-8b at N = 1 (measured)"] = [
            {
                k: r.get(k)
                for k in (
                    "strategy",
                    "batch",
                    "status",
                    "prefill_ms_median",
                    "decode_ms_per_token_median",
                    "tokens_per_s",
                    "energy_j",
                    "j_per_token",
                    "power_w_mean",
                    "error",
                )
            }
            for r in ladder
        ]
    for mode in ("projected", "simulated"):
        compared = compare(results, mode)
        if compared:
            found[f"{mode} against measured at N = 1"] = compared
    return found


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (results, logs, summary.md)")
    parser.add_argument("--only", help="comma-separated steps to run (default: all, in order)")
    parser.add_argument("--list", action="store_true", help="print the steps and their time boxes")
    args = parser.parse_args(argv)
    names = [s.name for s in STEPS]
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in names]
        if unknown:
            raise UsageError(f"--only {args.only}: unknown step {unknown[0]!r}; steps: {', '.join(names)}")
    if not args.list and not args.out:
        raise UsageError("--out is required: the folder for the results, logs and summary")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        if args.list:
            for s in STEPS:
                print(f"{s.name:14s} {s.seconds:4d} s  {s.what}")
            print(f"{'total':14s} {sum(s.seconds for s in STEPS):4d} s (budget {BUDGET_S} s)")
            return 0
        env = gpu_environment()
    except UsageError as exc:
        print(f"gpu_check.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else [s.name for s in STEPS]
    outcomes = run_steps([s for s in STEPS if s.name in chosen], out, env["gpu"])
    command_line = shlex.join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        found = figures(out, env)
    except Exception as exc:  # the summary is written whatever the rows hold
        found = {"figures": f"n/a: {exc.__class__.__name__}: {exc}"}
    text = summary(out, outcomes, env, command_line, found)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
