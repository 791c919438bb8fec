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
profile, or a strategy the simulation cannot express, stops the run before it starts.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from suite.defaults import BACKENDS, DEVICES, DTYPE_NAMES, KERNELS, default_kernels
from suite.defaults import BENCH_STORE as STORE_NAME
from suite.environment import environment
from suite.errors import SpdbenchError
from suite.latency.stats import Timings, summarise
from suite.results import BenchmarkScenario, LatencyScenario, ResultStore, Row
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


# ---------------------------------------------------------------- rows


def latency_row(
    cell: LatencyScenario,
    values: dict | None = None,
    error: str | None = None,
    *,
    env: dict | None = None,
    command: str = "",
) -> Row:
    """One result row: the scenario, then the figures (or null figures and the error)."""
    return Row(
        scenario=cell,
        provenance=cell.provenance,
        usable_model=_usable(cell.strategy),
        status="failed" if error else "ok",
        error=error,
        values=values or {},
        env=env if env is not None else environment(),
        command=command,
    )


def _usable(name: str) -> bool:
    """Whether a strategy is a usable model (an unknown one is not known to be a bound)."""
    from suite.parallel.strategy import StrategyError, strategy_class

    try:
        return strategy_class(name).usable
    except StrategyError:
        return True


# ---------------------------------------------------------------- running cells

AGREE_S = 30.0  # how long ranks that finished a cell wait for the others before a lone failure ends the launch


def _unit_job(comm, device, cells, store_path, command, done, total):
    """On every rank: run the cells (same tp and device) in order; rank 0 stores each row.

    After each cell the ranks agree on its outcome: a cell that failed on every rank is recorded and
    the next one runs; a rank that failed alone records its cell and ends the launch (its peers'
    collectives break at once instead of waiting for their timeout).
    """
    from suite.latency.measure import measure_cell
    from suite.parallel import launch as launching
    from suite.parallel.runner import ModelCache
    from suite.parallel.strategy import bound_strategy

    main = comm.rank == 0
    store, env, models = ResultStore(store_path), environment(), ModelCache(device)
    control = launching.control_group(min(AGREE_S, cells[0].timeout))
    with tqdm(total=total, initial=done, disable=not main, desc="bench", unit="cell", file=sys.stderr) as bar:
        for cell in cells:
            bar.set_postfix_str(cell.label())
            values, error = None, None
            try:
                strategy = bound_strategy(cell.strategy, cell.strategy_options, models.source(cell.model), comm.world)
                values = measure_cell(
                    cell, models.runner(cell.model, cell.dtype, strategy, comm, cell.kernels), comm, device
                )
            except Exception as exc:
                error = f"{exc.__class__.__name__}: {exc}"
            try:
                error = launching.agree(control, error)
            except Exception as exc:  # it or a peer failed alone: record it here (rank 0 may end with the launch)
                store.append(latency_row(cell, error=f"rank {comm.rank}: {error or exc}", env=env, command=command))
                raise
            if main:
                store.append(latency_row(cell, values, error, env=env, command=command))
            bar.update()


def _units(cells: list[LatencyScenario]) -> list[list[LatencyScenario]]:
    """Launch units: cells sharing (tp, device, backend, timeout, mode, profiles), each ordered so that
    one loaded model serves consecutive cells (model, dtype, then strategies that run their own)."""

    def unit_key(c):
        return c.tp, c.device, c.backend, c.timeout, c.mode, c.interconnect, c.device_profile

    from suite.parallel.strategy import make_strategy

    def model_order(c):
        return c.model, c.dtype, c.kernels, make_strategy(c.strategy, c.strategy_options).model_key() or ""

    units: dict = {}
    for c in cells:
        units.setdefault(unit_key(c), []).append(c)
    return [sorted(u, key=model_order) for u in units.values()]


def _modelled_cells(mode: str):
    """The generator that runs a unit of projected or simulated cells in this process."""
    if mode == "projected":
        from suite.latency.projection import project_cells

        return project_cells
    if mode == "simulated":
        from suite.latency.simulation import simulate_cells

        return simulate_cells
    raise ConfigError(f"mode={mode}: not a modelled mode")


def run(cells: list[LatencyScenario], out: str | os.PathLike, command: str = "") -> ResultStore:
    """Run every cell not yet finished in ``OUT/bench.jsonl``."""
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
    env = environment() if main else {}

    def report(cell, error):
        if main:
            tqdm.write(f"bench: cell {cell.label()} failed: {error}", file=sys.stderr)
            store.append(latency_row(cell, error=error, env=env, command=command))

    simulated = [c for c in pending if c.mode == "simulated" and check_settings(c) is None]
    if simulated:  # unknown profiles and strategies the simulation cannot express: usage errors
        from suite.latency.simulation import check_cells

        check_cells(simulated)
    runnable = []
    for c in pending:
        reason = check(c)
        if reason:
            report(c, reason)
        else:
            runnable.append(c)
    done = len(cells) - len(runnable)
    if launching.under_torchrun():  # one process group: the cells of its size and device, in one launch
        world = int(os.environ["WORLD_SIZE"])
        mine = [c for c in runnable if c.mode == "measured" and c.tp == world]

        def place(c):
            return c.device, c.backend, c.timeout

        here = [c for c in mine if place(c) == place(mine[0])]
        if main and len(here) < len(runnable):
            tqdm.write(
                f"bench: under torchrun with {world} ranks, {len(runnable) - len(here)} cells of other "
                f"tp, device or mode are left for another launch",
                file=sys.stderr,
            )
        if here:
            device, backend, timeout = place(here[0])
            launching.launch(
                _unit_job,
                world,
                [c for u in _units(here) for c in u],
                store.path,
                command,
                done,
                len(cells),
                device=device,
                backend=backend,
                timeout_s=timeout,
            )
        return store
    for unit in _units(runnable):
        first = unit[0]
        if first.mode != "measured":
            with tqdm(
                total=len(cells),
                initial=done,
                disable=not main,
                desc=f"bench ({first.mode})",
                unit="cell",
                file=sys.stderr,
            ) as bar:
                for cell, values, error in _modelled_cells(first.mode)(unit):
                    if error:
                        report(cell, error)
                    else:
                        store.append(latency_row(cell, values, env=env, command=command))
                    bar.update()
            done += len(unit)
            continue
        todo = unit
        while todo:
            written = len(store.all_rows())
            try:
                launching.launch(
                    _unit_job,
                    first.tp,
                    todo,
                    store.path,
                    command,
                    done,
                    len(cells),
                    device=first.device,
                    backend=first.backend,
                    timeout_s=first.timeout,
                )
                done, todo = done + len(todo), []
            except Exception as exc:  # the cell in progress failed: record it, go on with the rest
                finished = store.finished()
                failed = next((c for c in todo if c.cell_id not in finished), None)
                if failed is None:
                    raise
                if any(r["cell_id"] == failed.cell_id for r in store.all_rows()[written:]):  # rank 0 recorded it
                    tqdm.write(f"bench: cell {failed.label()} failed: {exc}", file=sys.stderr)
                else:
                    report(failed, f"{exc.__class__.__name__}: {exc}")
                rest = [c for c in todo if c is not failed and c.cell_id not in finished]
                done, todo = done + len(todo) - len(rest), rest
    return store


# ---------------------------------------------------------------- pytest-benchmark files


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
