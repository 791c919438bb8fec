"""``spdbench bench``: a latency matrix declared in YAML, measured cell by cell into a results store.

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
    interconnect: null               # projection profile (mode: projected)
    repetitions: 5                   # scalars
    warmup: 1
    mode: measured                   # measured | projected
    backend: auto                    # auto | gloo | nccl
    timeout: 300                     # seconds a collective may wait
    seed: 0                          # prompt token ids

Cells that share (model, tp, dtype, device) run in one launch of N ranks on one loaded model
(rebuilt only for strategies that load their own, e.g. SPD). Rank 0 appends each cell's row to
``OUT/bench.jsonl`` as soon as it finishes, so an interrupted run loses no finished cell; the
same command resumes it (finished cells are skipped, failed ones retried). Impossible cells get
a failed row naming the reason, and the other cells still run. Read the rows with
``pandas.read_json("OUT/bench.jsonl", lines=True)`` (fields: see ``latency_row``).
"""

from __future__ import annotations

import datetime
import functools
import gc
import itertools
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from suite import launch as launching
from suite.results import ResultStore, cell_id, environment, import_benchmark

STORE_NAME = "bench.jsonl"
AXES = ("model", "strategies", "tp", "batch", "prompt_len", "new_tokens", "dtype", "device", "decode_mode",
        "interconnect")
SCALARS = {"repetitions": 5, "warmup": 1, "mode": "measured", "backend": "auto",
           "timeout": launching.DEFAULT_TIMEOUT_S, "seed": 0}
DEFAULTS = {"strategies": ["baseline"], "tp": 1, "batch": 1, "prompt_len": 128, "new_tokens": 32,
            "dtype": "float32", "device": "cpu", "decode_mode": "eager", "interconnect": None}
RESULT_FIELDS = ("prefill_ms_median", "prefill_ms_p10", "prefill_ms_p90", "decode_ms_per_token_median",
                 "decode_ms_per_token_p10", "decode_ms_per_token_p90", "e2e_ms_median", "tokens_per_s",
                 "comm_fraction", "samples", "telemetry_status", "energy_j", "j_per_token", "power_w_mean",
                 "telemetry")


class ConfigError(ValueError):
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


def expand(config: dict, where: str = "config") -> list[dict]:
    """The cells (scenario dicts) of a parsed YAML matrix."""
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
    merged = DEFAULTS | SCALARS | config
    axes = {k: merged[k] if isinstance(merged[k], list) else [merged[k]] for k in AXES}
    axes["strategies"] = [_strategy_entry(s, where) for s in axes["strategies"]]
    cells = []
    for values in itertools.product(*axes.values()):
        cell = dict(zip(AXES, values))
        name, options = cell.pop("strategies")
        cells.append({"kind": "latency", "model": cell.pop("model"), "strategy": name, "strategy_options": options,
                      **cell, **{k: merged[k] for k in SCALARS}})
    return cells


def load_config(path: str | os.PathLike) -> list[dict]:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    return expand(config, str(path))


def label(cell: dict) -> str:
    """A short human name of a cell."""
    opts = ",".join(f"{k}={v}" for k, v in cell["strategy_options"].items())
    mode = f" {cell['mode']}:{cell['interconnect']}" if cell["mode"] != "measured" else ""
    return (f"{cell['model']} {cell['strategy']}{'(' + opts + ')' if opts else ''} tp={cell['tp']} "
            f"batch={cell['batch']} prompt={cell['prompt_len']} new={cell['new_tokens']} {cell['dtype']} "
            f"{cell['device']} {cell['decode_mode']}{mode}")


@functools.lru_cache(maxsize=None)
def _model_config(model: str):
    from suite.sources import resolve

    return resolve(model).config


def check(cell: dict) -> str | None:
    """Why a cell cannot run (None if it can). Cheap: no weights are read."""
    from suite.generate import DTYPES
    from suite.sharding import check_tp
    from suite.strategy import make_strategy

    for key in ("tp", "batch", "prompt_len", "new_tokens", "repetitions", "warmup"):
        if not isinstance(cell[key], int) or cell[key] < (0 if key == "warmup" else 1):
            return f"{key}={cell[key]!r} must be a{' non-negative' if key == 'warmup' else ' positive'} integer"
    if cell["dtype"] not in DTYPES:
        return f"dtype={cell['dtype']!r}: choose one of {', '.join(DTYPES)}"
    if cell["decode_mode"] not in ("eager", "cuda_graph"):
        return f"decode_mode={cell['decode_mode']!r}: choose eager or cuda_graph"
    if cell["decode_mode"] == "cuda_graph" and cell["device"] != "cuda":
        return "decode_mode=cuda_graph needs device=cuda"
    if cell["mode"] not in ("measured", "projected"):
        return f"mode={cell['mode']!r}: choose measured or projected"
    if cell["mode"] == "projected" and not cell["interconnect"]:
        return "mode=projected needs an interconnect profile"
    if cell["mode"] == "measured" and cell["interconnect"]:
        return f"interconnect={cell['interconnect']!r} is only meaningful with mode=projected"
    try:
        make_strategy(cell["strategy"], cell["strategy_options"])
        if cell["device"] not in ("cpu", "cuda"):
            return f"device={cell['device']!r}: choose cpu or cuda"
        if cell["mode"] == "measured":
            backend = launching.placement(cell["tp"], cell["device"], cell["backend"])
            if cell["decode_mode"] == "cuda_graph" and cell["tp"] > 1 and backend != "nccl":
                return (f"decode_mode=cuda_graph with tp={cell['tp']} needs NCCL (one GPU per rank): "
                        f"{backend} collectives cannot be captured in a CUDA graph")
        config = _model_config(cell["model"])
        check_tp(config, cell["tp"])
    except ValueError as exc:  # StrategyError, LaunchError, ModelSourceError, ShardingError
        return str(exc).replace("--tp", "tp").replace("--device", "device").replace("--backend", "backend")
    context = cell["prompt_len"] + cell["new_tokens"]
    if context > config.max_position_embeddings:
        return (f"prompt_len + new_tokens = {context} exceeds the model's context of "
                f"{config.max_position_embeddings} tokens")
    return None


# ---------------------------------------------------------------- rows

def latency_row(cell: dict, fields: dict | None = None, error: str | None = None, *, strategy=None,
                env: dict | None = None, command: str = "") -> dict:
    """One result row: the scenario, then the measured fields (or null fields and the error)."""
    row = {"cell_id": cell_id(cell), **cell, "status": "failed" if error else "ok", "error": error,
           "provenance": "projected" if cell["mode"] == "projected" else "measured",
           "usable_model": strategy.usable if strategy is not None else None}
    if strategy is not None:
        row["strategy_options"] = strategy.options()
    row |= {k: None for k in RESULT_FIELDS} | (fields or {})
    return row | {"env": env if env is not None else environment(), "command": command,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _model_key(strategy) -> str | None:
    """None for strategies that build the plain shard (they share it), else their own key."""
    from suite.strategy import Strategy

    if type(strategy).load_model is Strategy.load_model:
        return None
    return f"{strategy.name}:{json.dumps(strategy.options(), sort_keys=True, default=str)}"


def _unit_job(comm, device, cells, store_path, command, done, total):
    """On every rank: run the cells (same model, tp, dtype, device) in order; rank 0 stores each row."""
    from suite.generate import DTYPES, Runner
    from suite.measure import measure_cell
    from suite.sources import resolve
    from suite.strategy import make_strategy

    main = comm.rank == 0
    store, env = ResultStore(store_path), environment() if main else None
    sources, model, runner, loaded, owner = {}, None, None, object(), None
    with tqdm(total=total, initial=done, disable=not main, desc="bench", unit="cell", file=sys.stderr) as bar:
        for cell in cells:
            bar.set_postfix_str(label(cell))
            strategy = make_strategy(cell["strategy"], cell["strategy_options"])
            try:
                key = (cell["model"], cell["dtype"], _model_key(strategy))
                if key != loaded:
                    model = runner = None  # free the previous model before building the next
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if cell["model"] not in sources:
                        sources[cell["model"]] = resolve(cell["model"], device)
                    model = strategy.load_model(sources[cell["model"]], comm.world, comm.rank,
                                                DTYPES[cell["dtype"]], device)
                    loaded, owner = key, strategy
                elif key[2]:  # a strategy that built its own model (SPD) also runs it
                    strategy = owner
                runner = Runner(model, strategy, comm)
                fields = measure_cell(cell, runner, comm, device)
            except Exception as exc:  # recorded here too, for runs under torchrun (no parent to do it)
                if main:
                    store.append(latency_row(cell, error=f"{exc.__class__.__name__}: {exc}", strategy=strategy,
                                             env=env, command=command))
                raise
            if main:
                store.append(latency_row(cell, fields, strategy=strategy, env=env, command=command))
            bar.update()


def _units(cells: list[dict]) -> list[list[dict]]:
    """Launch units: cells sharing (tp, device, backend, timeout, mode), each ordered so that one
    loaded model serves consecutive cells (model, dtype, then strategies that build their own)."""
    from suite.strategy import make_strategy

    def unit_key(c):
        return c["tp"], c["device"], c["backend"], c["timeout"], c["mode"], c["interconnect"]

    def model_order(c):
        return c["model"], c["dtype"], _model_key(make_strategy(c["strategy"], c["strategy_options"])) or ""

    units: dict = {}
    for c in cells:
        units.setdefault(unit_key(c), []).append(c)
    return [sorted(u, key=model_order) for u in units.values()]


def _run_projected(cells, store, command, report):
    try:
        from suite.projection import run_projected_group
    except ModuleNotFoundError as exc:
        if exc.name != "suite.projection":
            raise
        for c in cells:
            report(c, "mode=projected needs suite.projection, which is not installed")
        return
    try:
        run_projected_group(cells, store, command=command)
    except Exception as exc:  # the cells it did not finish fail with its error
        finished = store.finished()
        for c in cells:
            if cell_id(c) not in finished:
                report(c, f"{exc.__class__.__name__}: {exc}")


def run(cells: list[dict], out: str | os.PathLike, command: str = "") -> ResultStore:
    """Measure every cell not yet finished in ``OUT/bench.jsonl``."""
    store = ResultStore(Path(out) / STORE_NAME)
    main = int(os.environ.get("RANK", 0)) == 0  # under torchrun every rank runs this; one writes
    finished = store.finished()
    pending = [c for c in cells if cell_id(c) not in finished]
    if main and len(pending) < len(cells):
        tqdm.write(f"bench: {len(cells) - len(pending)} of {len(cells)} cells already finished in {store.path}",
                   file=sys.stderr)

    def report(cell, error):
        if main:
            tqdm.write(f"bench: cell {label(cell)} failed: {error}", file=sys.stderr)
            store.append(latency_row(cell, error=error, env=env, command=command))

    env = environment() if main else {}
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
        mine = [c for c in runnable if c["mode"] == "measured" and c["tp"] == world]

        def place(c):
            return c["device"], c["backend"], c["timeout"]

        here = [c for c in mine if place(c) == place(mine[0])]
        if main and len(here) < len(runnable):
            tqdm.write(f"bench: under torchrun with {world} ranks, {len(runnable) - len(here)} cells of other "
                       f"tp, device or mode are left for another launch", file=sys.stderr)
        if here:
            device, backend, timeout = place(here[0])
            launching.launch(_unit_job, world, [c for u in _units(here) for c in u], store.path, command, done,
                             len(cells), device=device, backend=backend, timeout_s=timeout)
        return store
    for unit in _units(runnable):
        first = unit[0]
        if first["mode"] == "projected":
            _run_projected(unit, store, command, report)
            done += len(unit)
            continue
        todo = unit
        while todo:
            try:
                launching.launch(_unit_job, first["tp"], todo, store.path, command, done, len(cells),
                                 device=first["device"], backend=first["backend"], timeout_s=first["timeout"])
                done, todo = done + len(todo), []
            except Exception as exc:  # the cell in progress failed: record it, go on with the rest
                finished = store.finished()
                failed = next((c for c in todo if cell_id(c) not in finished), None)
                if failed is None:
                    raise
                report(failed, f"{exc.__class__.__name__}: {exc}")
                rest = [c for c in todo if c is not failed and cell_id(c) not in finished]
                done, todo = done + len(todo) - len(rest), rest
    return store


# ---------------------------------------------------------------- CLI

def cmd_bench(args, parser) -> int:
    if not args.config and not args.import_benchmark:
        parser.error("give --config FILE (a YAML matrix) or --import-benchmark JSON")
    command = shlex.join(["spdbench", *sys.argv[1:]])
    store = ResultStore(Path(args.out) / STORE_NAME)
    if args.import_benchmark:
        try:
            rows = import_benchmark(args.import_benchmark, command=command)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"--import-benchmark {args.import_benchmark}: not a pytest-benchmark JSON file ({exc})")
        known = {r["cell_id"] for r in store.rows()}
        new = [r for r in rows if r["cell_id"] not in known]
        store.append(*new)
        print(f"imported {len(new)} benchmark rows into {store.path} ({len(rows) - len(new)} were there already)")
    if args.config:
        try:
            cells = load_config(args.config)
        except ConfigError as exc:
            parser.error(str(exc))
        run(cells, args.out, command)
        status = {r["cell_id"]: r["status"] for r in store.rows()}
        states = [status.get(cell_id(c), "not run") for c in cells]
        ok, failed = states.count("ok"), states.count("failed")
        if int(os.environ.get("RANK", 0)) == 0:
            skipped = len(cells) - ok - failed
            waiting = f", {skipped} not run (other tp under torchrun)" if skipped else ""
            print(f"{ok} of {len(cells)} cells ok, {failed} failed{waiting}; rows in {store.path}")
        return 1 if failed else 0
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency matrix from a YAML config into a results store")
    p.add_argument("--config", help="YAML scenario matrix (see configs/)")
    p.add_argument("--out", required=True, help=f"output folder; rows go to OUT/{STORE_NAME}")
    p.add_argument("--import-benchmark", metavar="JSON",
                   help="add the rows of a pytest-benchmark JSON file (pytest tests/bench --benchmark-json=...)")
    p.set_defaults(handler=cmd_bench)
