"""Arguments shared by several commands, and their checks (no torch here)."""

from __future__ import annotations

import argparse
import shlex
import sys

from suite.defaults import BACKENDS, DEFAULT_TIMEOUT_S, DEVICES, DTYPE_NAMES, EMBEDDED_MODEL
from suite.errors import SpdbenchError


def add_model_args(p: argparse.ArgumentParser, tp_default: int | None = 1) -> None:
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help="smollm2-135m (embedded), random:<preset>, a .gguf path, an HF folder or hub id")
    p.add_argument("--tp", type=int, default=tp_default, required=tp_default is None,
                   help="tensor-parallel degree N")
    p.add_argument("--strategy", default="baseline", help="baseline, spd, ladder, tokenweave, seqpar, nocomm, ...")
    p.add_argument("--strategy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. layers=last:16, split_min_tokens=0)")
    p.add_argument("--spd-plan", metavar="PLAN.json",
                   help="SPD plan file (implies --strategy spd; same as --strategy-opt plan=PLAN.json)")
    add_placement_args(p)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")


def add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="process-group backend (auto: NCCL when every rank has its own GPU, else gloo)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait before the run fails")


def strategy_options(args) -> tuple[str, dict[str, str]]:
    """The strategy and its options from --strategy, --strategy-opt and --spd-plan."""
    options = parse_options(args.strategy_opt)
    if args.spd_plan:  # implies --strategy spd
        if args.strategy not in ("baseline", "spd"):
            raise SpdbenchError(f"spd_plan needs strategy spd, not {args.strategy}")
        return "spd", options | {"plan": args.spd_plan}
    return args.strategy, options


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpdbenchError(f"strategy option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def at_least(minimum: float, **values) -> None:
    """Raise for the first value below ``minimum``, naming it."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise SpdbenchError(f"{name} {value} is invalid: it must be at least {minimum}")


def command_line() -> str:
    """The command being run, as a user would type it."""
    return shlex.join(["spdbench", *sys.argv[1:]])
