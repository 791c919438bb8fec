"""``spdbench bench``, ``commbench``, ``profile`` and ``validate-projection``: the latency commands."""

from __future__ import annotations

import os
from pathlib import Path

from suite.cli.common import (
    add_model_args,
    add_placement_args,
    at_least,
    check_model,
    command_line,
    kernels_of,
    strategy_options,
)
from suite.defaults import BENCH_STORE as STORE_NAME
from suite.errors import SpdbenchError


def cmd_bench(args, parser) -> int:
    if not args.config and not args.import_benchmark:
        parser.error("give --config FILE (a YAML matrix) or --import-benchmark JSON")
    for option, path in (("config", args.config), ("import_benchmark", args.import_benchmark)):
        if path and not Path(path).is_file():
            raise SpdbenchError(f"{option} {path}: no such file")
    from suite.latency.bench import load_config, run
    from suite.latency.benchmark_import import import_benchmark
    from suite.results import ResultStore

    command, store = command_line(), ResultStore(Path(args.out) / STORE_NAME)
    cells = load_config(args.config) if args.config else []
    if args.import_benchmark:
        try:
            rows = import_benchmark(args.import_benchmark, command=command)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpdbenchError(
                f"import_benchmark {args.import_benchmark}: not a pytest-benchmark JSON file "
                f"({exc.__class__.__name__}: {exc})"
            ) from None
        new = store.append(*rows)
        print(f"imported {len(new)} benchmark rows into {store.path} ({len(rows) - len(new)} were there already)")
    if not cells:
        return 0
    run(cells, args.out, command)
    status = {r["cell_id"]: r["status"] for r in store.rows()}
    states = [status.get(c.cell_id, "not run") for c in cells]
    ok, failed = states.count("ok"), states.count("failed")
    if int(os.environ.get("RANK", 0)) == 0:
        skipped = len(cells) - ok - failed
        waiting = f", {skipped} not run (other tp under torchrun)" if skipped else ""
        print(f"{ok} of {len(cells)} cells ok, {failed} failed{waiting}; rows in {store.path}")
    return 1 if failed else 0


def cmd_commbench(args, parser) -> int:
    from suite.latency.interconnect import parse_bytes

    sizes = [parse_bytes(s) for s in args.sizes] if args.sizes else None
    for tp in args.tp:
        if tp < 2:
            raise SpdbenchError(f"tp {tp}: a collective needs at least 2 ranks")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda (NCCL collectives captured in a CUDA graph)")
    at_least(1, iters=args.iters, repeats=args.repeats, sms=args.sms)
    at_least(0, warmup=args.warmup)
    from suite.latency.commbench import bandwidth_table, commbench, write_profile
    from suite.parallel import launch as launching

    backend = launching.placement(args.tp[0], args.device, args.backend)
    for tp in args.tp:
        launching.placement(tp, args.device, args.backend)
    launches = ("eager", "cuda_graph") if args.cuda_graph else ("eager",)
    measured = commbench(
        args.tp,
        args.device,
        args.backend,
        sizes,
        launches=launches,
        iters=args.iters,
        warmup=args.warmup,
        repeats=args.repeats,
        timeout_s=args.timeout,
    )
    print(bandwidth_table(measured))
    out = write_profile(measured, args.out, args.name, args.device, backend, args.iters, args.repeats, args.sms)
    print(f"profile written to {out}; use it with --interconnect {out}")
    return 0


def cmd_profile(args, parser) -> int:
    import json
    import textwrap

    from suite.latency.interconnect import load_profile, modelled_times, parse_bytes

    profile = load_profile(args.name)
    points = modelled_times(profile, [parse_bytes(s) for s in args.sizes] if args.sizes else None)
    if args.json:
        print(json.dumps(points))
        return 0
    import pandas as pd

    print(f"{profile.name}: {profile.description}")
    print(
        textwrap.fill(
            f"SMs a collective holds: {profile.sms} ({' '.join(profile.sms_source.split())})",
            100,
            subsequent_indent="  ",
        )
    )
    for launch, text in profile.method.items():
        print(textwrap.fill(f"{launch}: {' '.join(text.split())}", 100, subsequent_indent="  "))
    print(
        "sources:\n"
        + "\n".join(textwrap.fill(s, 100, initial_indent="  - ", subsequent_indent="    ") for s in profile.sources)
    )
    table = pd.DataFrame(points).pivot_table(
        index=["collective", "launch", "n"], columns="bytes", values="us", sort=False
    )
    table.columns = [_size(b) for b in table.columns]
    print("modelled time of one collective (us)")
    print(table.to_string(float_format=lambda v: f"{v:.1f}"))
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def cmd_validate(args, parser) -> int:
    import json

    if args.tp < 2:
        raise SpdbenchError(f"tp {args.tp}: validation compares N >= 2 real ranks with their projection")
    at_least(
        1,
        new_tokens=args.new_tokens,
        repetitions=args.repetitions,
        batch=min(args.batch),
        prompt_len=min(args.prompt_len),
    )
    at_least(0, warmup=args.warmup)
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    check_model(args.model)
    name, options = strategy_options(args)
    from suite.latency.interconnect import load_profile  # light: the profile is checked before torch loads

    profile = load_profile(args.interconnect)
    import pandas as pd

    from suite.latency import validate
    from suite.model.sharding import check_tp
    from suite.model.sources import resolve
    from suite.parallel import launch as launching
    from suite.parallel.strategy import bound_strategy

    strategies = name.split(",")
    source = resolve(args.model)
    check_tp(source.config, args.tp)
    for strategy in strategies:
        bound_strategy(strategy, options, source, args.tp)
    launching.placement(args.tp, args.device, args.backend)
    profile.seconds("all_reduce", args.tp, 1, "cuda_graph" if args.cuda_graph else "eager")  # covers N
    cells = validate.cells(
        args.model,
        strategies,
        options,
        args.tp,
        args.batch,
        args.prompt_len,
        args.new_tokens,
        args.repetitions,
        args.warmup,
        args.cuda_graph,
        args.dtype,
        args.device,
        args.backend,
        args.timeout,
        kernels_of(args),
    )
    results = validate.validate(cells, profile, args.sms)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"projection on {profile.name!r} vs measured ({args.device}, tp={args.tp}); error = projected/measured - 1")
    print(pd.DataFrame(results).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency matrix from a YAML config into a results store")
    p.add_argument("--config", help="YAML scenario matrix (see configs/)")
    p.add_argument("--out", required=True, help=f"output folder; rows go to OUT/{STORE_NAME}")
    p.add_argument(
        "--import-benchmark",
        metavar="JSON",
        help="add the rows of a pytest-benchmark JSON file (pytest tests/bench --benchmark-json=...)",
    )
    p.set_defaults(handler=cmd_bench)


def add_commbench(sub) -> None:
    p = sub.add_parser("commbench", help="measure an interconnect profile (nccl-tests style sweep)")
    p.add_argument("--tp", type=int, nargs="+", default=[2], help="rank counts N to measure (e.g. 2 4 8)")
    add_placement_args(p)
    p.add_argument("--sizes", nargs="+", metavar="SIZE", help="buffer sizes (e.g. 1K 64K 1M 16M) (default: 1K..16M x4)")
    p.add_argument("--iters", type=int, default=20, help="collectives per timed loop")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed loops per size (the median is kept)")
    p.add_argument("--cuda-graph", action="store_true", help="also measure collectives replayed from a CUDA graph")
    p.add_argument(
        "--sms",
        type=int,
        default=16,
        help="SMs a collective holds, written into the profile (not measured; NCCL uses one per channel)",
    )
    p.add_argument("--name", help="profile name (default: measured-HOST-BACKEND)")
    p.add_argument("--out", help="profile file to write (default: NAME.yaml)")
    p.set_defaults(handler=cmd_commbench)


def add_profile(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="what an interconnect profile models: the time of every collective, "
        "launch mode, N and size, with its method and sources",
    )
    p.add_argument("name", help="a shipped profile (h100-nvswitch, ...) or a profile file")
    p.add_argument("--sizes", nargs="+", metavar="SIZE", help="message sizes (e.g. 16K 1M); default 1K..1G x4")
    p.add_argument("--json", action="store_true", help="print a list of {collective, launch, n, bytes, us}")
    p.set_defaults(handler=cmd_profile)


def add_validate_projection(sub) -> None:
    v = sub.add_parser(
        "validate-projection",
        help="run the same cells measured on N ranks and projected; report the error",
        description="Runs each cell (strategy x batch x prompt length) measured on --tp real "
        "ranks and projected on the heaviest rank with --interconnect, and reports the "
        "relative error of prefill and decode time. --strategy takes a comma-separated list.",
    )
    add_model_args(v)
    v.add_argument(
        "--interconnect",
        required=True,
        help="a shipped link profile (h100-nvswitch, a100-nvlink, "
        "pcie-nop2p, ib-2node) or a file from 'spdbench commbench'",
    )
    v.add_argument("--batch", type=int, nargs="+", default=[1])
    v.add_argument("--prompt-len", type=int, nargs="+", default=[32])
    v.add_argument("--new-tokens", type=int, default=8)
    v.add_argument("--repetitions", type=int, default=3)
    v.add_argument("--warmup", type=int, default=1)
    v.add_argument("--cuda-graph", action="store_true", help="decode in a CUDA graph (--device cuda)")
    v.add_argument("--sms", type=int, help="SMs the modelled collective holds on a GPU (default: the profile's)")
    v.add_argument("--json", action="store_true", help="print the per-cell results as JSON")
    v.set_defaults(handler=cmd_validate)
