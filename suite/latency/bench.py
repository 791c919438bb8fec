"""The latency matrix: cells declared in YAML, run cell by cell into a results store.

A config maps each axis to a value or a list; ``matrices`` (optional) is a list of mappings,
each merged over the top level, whose cells are added together::

    model: random:llama3-8b          # axes: a value or a list
    strategies: [baseline, {name: spd, options: {blocks: all}}]
    tp: [1, 2, 4]
    batch: [1, 16]
    prompt_len: 1024
    new_tokens: 512
    dtype: bfloat16                  # float32 | bfloat16 | float16
    device: cuda                     # cpu | cuda
    decode_mode: cuda_graph          # eager | cuda_graph
    kernels: compiled                # eager | compiled (default by device); simulated: also gpt-fast, vllm
    mode: measured                   # measured | projected | simulated
    interconnect: null               # link profile (mode: projected or simulated)
    device_profile: null             # device profile (mode: simulated)
    repetitions: 5                   # scalars
    warmup: 1
    backend: auto                    # auto | gloo | nccl
    timeout: 300                     # seconds a collective may wait
    seed: 0                          # prompt token ids

Measured cells that share (model, tp, dtype, device) run in one launch of N ranks on one loaded
model (rebuilt only for strategies that run their own, e.g. an SPD plan). Rank 0 appends each
cell's row to ``OUT/bench.jsonl`` as soon as it finishes, so an interrupted run loses no
finished cell; the same command resumes it (finished cells are skipped, failed ones retried).
Impossible cells get a failed row naming the reason, and the other cells still run. Projected cells
run in this process, simulated ones in one worker process per CPU; a simulated cell naming an unknown
profile, or a strategy the simulation cannot express, stops the run before it starts. Each mode's
cells run through its executor (``suite.latency.executors``).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from suite.defaults import BACKENDS, DEVICES, DTYPE_NAMES, KERNELS, default_kernels
from suite.defaults import BENCH_STORE as STORE_NAME
from suite.environment import environment
from suite.errors import SpdbenchError
from suite.latency.executors import EXECUTORS, BenchRun, launch_units
from suite.results import LatencyScenario, ResultStore
from suite.vocabulary import PROVENANCES

DECODE_MODES = ("eager", "cuda_graph")
AXES = (
    "model",
    "strategies",
    "tp",
    "batch",
    "prompt_len",
    "new_tokens",
    "dtype",
    "device",
    "decode_mode",
    "kernels",
    "interconnect",
    "device_profile",
)
SCALARS = ("repetitions", "warmup", "mode", "backend", "timeout", "seed")


class ConfigError(SpdbenchError):
    """The YAML matrix is malformed."""


# ---------------------------------------------------------------- the matrix


def _strategy_entry(entry, where: str) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and set(entry) <= {"name", "options"} and isinstance(entry.get("name"), str):
        options = entry.get("options") or {}
        if isinstance(options, dict):
            return entry["name"], {str(k): str(v) for k, v in options.items()}
    raise ConfigError(f"{where}: strategy entry {entry!r} must be a name or {{name: NAME, options: {{KEY: VALUE}}}}")


def expand(config: dict, where: str = "config") -> list[LatencyScenario]:
    """The cells of a parsed YAML matrix."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping of matrix keys, got {type(config).__name__}")
    known = set(AXES) | set(SCALARS) | {"matrices"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    if "matrices" in config:
        subs = config["matrices"]
        if not isinstance(subs, list) or not subs:
            raise ConfigError(f"{where}: 'matrices' must be a non-empty list of mappings")
        base = {k: v for k, v in config.items() if k != "matrices"}
        for i, sub in enumerate(subs):
            if not isinstance(sub, dict) or "matrices" in sub:
                raise ConfigError(f"{where}: matrices[{i}] must be a mapping of matrix keys (no nesting)")
        return [cell for i, sub in enumerate(subs) for cell in expand(base | sub, f"{where}: matrices[{i}]")]
    if "model" not in config:
        raise ConfigError(f"{where}: 'model' is required")
    merged = {"strategies": ["baseline"]} | config
    axes = {k: merged[k] if isinstance(merged[k], list) else [merged[k]] for k in AXES if k in merged}
    axes["strategies"] = [_strategy_entry(s, where) for s in axes["strategies"]]
    scalars = {k: merged[k] for k in SCALARS if k in merged}
    cells = []
    for values in itertools.product(*axes.values()):
        cell = dict(zip(axes, values))
        name, options = cell.pop("strategies")
        if "kernels" not in cell and merged.get("mode", "measured") != "simulated":
            cell["kernels"] = default_kernels(cell.get("device", LatencyScenario.device))
        cells.append(LatencyScenario(strategy=name, strategy_options=options, **cell, **scalars))
    return cells


def load_config(path: str | os.PathLike) -> list[LatencyScenario]:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    return expand(config, str(path))


def check_settings(cell: LatencyScenario) -> str | None:
    """Why a cell's settings are impossible, without importing torch (None if they look fine)."""
    for key in ("tp", "batch", "prompt_len", "new_tokens", "repetitions", "warmup"):
        value = getattr(cell, key)
        if not isinstance(value, int) or value < (0 if key == "warmup" else 1):
            return f"{key}={value!r} must be a{' non-negative' if key == 'warmup' else ' positive'} integer"
    choices = {
        "dtype": DTYPE_NAMES,
        "decode_mode": DECODE_MODES,
        "mode": PROVENANCES,
        "backend": BACKENDS,
        "device": DEVICES,
    }
    for key, allowed in choices.items():
        if getattr(cell, key) not in allowed:
            return f"{key}={getattr(cell, key)!r}: choose one of {', '.join(allowed)}"
    if cell.mode != "simulated" and cell.kernels not in KERNELS:  # simulated cells: the simulation checks it
        return f"kernels={cell.kernels!r}: choose one of {', '.join(KERNELS)}"
    if cell.mode != "simulated" and cell.decode_mode == "cuda_graph" and cell.device != "cuda":
        return "decode_mode=cuda_graph needs device=cuda"
    if cell.mode in ("projected", "simulated") and not cell.interconnect:
        return f"mode={cell.mode} needs an interconnect profile"
    if cell.mode == "simulated" and not cell.device_profile:
        return "mode=simulated needs a device_profile"
    if cell.mode == "measured" and cell.interconnect:
        return f"interconnect={cell.interconnect!r} is only meaningful with mode=projected or simulated"
    if cell.mode != "simulated" and cell.device_profile:
        return f"device_profile={cell.device_profile!r} is only meaningful with mode=simulated"
    return None


@functools.lru_cache(maxsize=None)
def _model_config(model: str):
    from suite.model.sources import resolve

    return resolve(model).config


@functools.lru_cache(maxsize=None)
def _profile(name: str):
    from suite.latency.interconnect import load_profile

    return load_profile(name)


def _launch(cell: LatencyScenario) -> str:
    """The launch mode of the collectives a modelled decode pays for."""
    return "cuda_graph" if cell.decode_mode == "cuda_graph" else "eager"


def check(cell: LatencyScenario) -> str | None:
    """Why a cell cannot run (None if it can). Cheap: no weights are read."""
    from suite.model.sharding import check_tp
    from suite.parallel import launch as launching
    from suite.parallel.strategy import make_strategy

    reason = check_settings(cell)
    if reason:
        return reason
    try:
        make_strategy(cell.strategy, cell.strategy_options)
        if cell.mode == "measured":
            backend = launching.placement(cell.tp, cell.device, cell.backend)
            if cell.decode_mode == "cuda_graph" and cell.tp > 1 and backend != "nccl":
                return (
                    f"decode_mode=cuda_graph with tp={cell.tp} needs NCCL (one GPU per rank): "
                    f"{backend} collectives cannot be captured in a CUDA graph"
                )
        else:
            _profile(cell.interconnect).seconds("all_reduce", cell.tp, 1, _launch(cell))  # it covers N
        config = _model_config(cell.model)
        check_tp(config, cell.tp)
    except SpdbenchError as exc:
        return str(exc)
    context = cell.prompt_len + cell.new_tokens
    if context > config.max_position_embeddings:
        return (
            f"prompt_len + new_tokens = {context} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens"
        )
    return None


# ---------------------------------------------------------------- running the matrix


def run(cells: list[LatencyScenario], out: str | os.PathLike, command: str = "") -> ResultStore:
    """Run every cell not yet finished in ``OUT/bench.jsonl``, each launch unit by the executor of its mode."""
    from suite.parallel import launch as launching

    store = ResultStore(Path(out) / STORE_NAME)
    main = int(os.environ.get("RANK", 0)) == 0  # under torchrun every rank runs this; one writes
    finished = store.finished()
    pending = [c for c in cells if c.cell_id not in finished]
    if main and len(pending) < len(cells):
        tqdm.write(
            f"bench: {len(cells) - len(pending)} of {len(cells)} cells already finished in {store.path}",
            file=sys.stderr,
        )
    bench = BenchRun(store, command, environment() if main else {}, main, len(cells))
    executors = {mode: executor(bench) for mode, executor in EXECUTORS.items()}
    for mode, executor in executors.items():  # usage errors stop the run before any cell runs
        cells_of_mode = [c for c in pending if c.mode == mode and check_settings(c) is None]
        if cells_of_mode:
            executor.check(cells_of_mode)
    runnable = []
    for c in pending:
        reason = check(c)
        if reason:
            bench.report(c, reason)
        else:
            runnable.append(c)
    bench.done = len(cells) - len(runnable)
    if launching.under_torchrun():
        executors["measured"].run_under_torchrun(runnable, int(os.environ["WORLD_SIZE"]))
        return store
    for unit in launch_units(runnable):
        executors[unit[0].mode].run(unit)
    return store
