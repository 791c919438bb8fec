"""Arguments shared by several commands, and their checks (no torch here: they answer before it loads)."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import shlex
import sys
from pathlib import Path

from suite.defaults import BACKENDS, DEFAULT_TIMEOUT_S, DEVICES, DTYPE_NAMES, EMBEDDED_MODEL, KERNELS, default_kernels
from suite.errors import SpdbenchError
from suite.vocabulary import check_strategy, model_form, parse_options

_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("argv", default=None)


def add_model_args(p: argparse.ArgumentParser, tp_default: int | None = 1, several: bool = False) -> None:
    """``several``: --strategy is repeatable, each NAME[:KEY=VALUE,...] (``strategy_specs``)."""
    p.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help="smollm2-135m (embedded), random:<preset>, a .gguf path, an HF folder or hub id",
    )
    p.add_argument("--tp", type=int, default=tp_default, required=tp_default is None, help="tensor-parallel degree N")
    if several:
        p.add_argument(
            "--strategy",
            action="append",
            metavar="NAME[:KEY=VALUE,...]",
            help="a strategy and its options, repeatable: all run on the same N ranks "
            "(e.g. --strategy baseline --strategy spd:plan=plan.json); default baseline",
        )
    else:
        p.add_argument("--strategy", default="baseline", help="baseline, spd, ladder, tokenweave, seqpar, nocomm, ...")
    p.add_argument(
        "--strategy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy option, repeatable (e.g. layers=last:16, split_min_tokens=0)",
    )
    p.add_argument(
        "--spd-plan",
        metavar="PLAN.json",
        help="SPD plan file (implies --strategy spd unless spd+ladder or spd+tokenweave is named; "
        "same as --strategy-opt plan=PLAN.json)",
    )
    add_placement_args(p)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        help="eager (op by op) or compiled (merged GEMMs, torch.compile, attention over the filled cache; "
        "see docs/kernels.md); default: compiled on cuda, eager on cpu",
    )


def kernels_of(args) -> str:
    """The kernel mode asked for, or the device's default."""
    return args.kernels or default_kernels(args.device)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="process-group backend (auto: NCCL when every rank has its own GPU, else gloo)",
    )
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds a collective may wait before the run fails"
    )


def strategy_options(args) -> tuple[str, dict[str, str]]:
    """The strategy and its options from --strategy, --strategy-opt and --spd-plan (names and files checked)."""
    options = parse_options(args.strategy_opt)
    name = args.strategy
    if args.spd_plan:  # implies --strategy spd unless a composite of it (spd+ladder, spd+tokenweave) is named
        if name not in ("baseline", "spd") and not name.startswith("spd+"):
            raise SpdbenchError(f"spd_plan needs strategy spd, spd+ladder or spd+tokenweave, not {name}")
        name, options = "spd" if name == "baseline" else name, options | {"plan": args.spd_plan}
    for strategy in name.split(","):  # validate-projection takes a list
        check_strategy(strategy)
    if options.get("plan") and not Path(options["plan"]).is_file():
        raise SpdbenchError(
            f"spd_plan {options['plan']}: no such file; make one with 'spdbench spd plan' "
            "(or run 'spdbench run', which writes OUT/spd/plan-tpN.json)"
        )
    return name, options


def parse_strategy(text: str) -> tuple[str, dict[str, str]]:
    """``spd:plan=p.json,x=1`` -> ``("spd", {"plan": "p.json", "x": "1"})``, name and plan file checked."""
    name, _, options = text.partition(":")
    check_strategy(name)
    parsed = parse_options([o for o in options.split(",") if o])
    if parsed.get("plan") and not Path(parsed["plan"]).is_file():
        raise SpdbenchError(f"strategy {text}: plan {parsed['plan']} is no file; make one with 'spdbench spd plan'")
    return name, parsed


def strategy_specs(args) -> list[tuple[str, dict[str, str]]]:
    """The strategies of a repeatable --strategy; --strategy-opt and --spd-plan apply to a single one."""
    specs = args.strategy or ["baseline"]
    if len(specs) == 1:
        name, options = parse_strategy(specs[0])
        name, extra = strategy_options(
            argparse.Namespace(strategy=name, strategy_opt=args.strategy_opt, spd_plan=args.spd_plan)
        )
        return [(name, options | extra)]
    if args.strategy_opt or args.spd_plan:
        raise SpdbenchError(
            "strategy_opt and spd_plan apply to a single --strategy; with several, give each its "
            "options: --strategy NAME:KEY=VALUE,..."
        )
    return [parse_strategy(spec) for spec in specs]


def check_model(model: str) -> None:
    """A model argument that cannot name a model, answered before anything loads (the source checks the rest)."""
    model_form(model)


def check_data_dir(folder: str | None) -> None:
    if folder is not None and not Path(folder).expanduser().is_dir():
        raise SpdbenchError(
            f"data_dir {folder}: no such data folder; point it at the offline data or leave it unset "
            "to use the Hugging Face Hub"
        )


def at_least(minimum: float, **values) -> None:
    """Raise for the first value below ``minimum``, naming it."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise SpdbenchError(f"{name} {value} is invalid: it must be at least {minimum}")


@contextlib.contextmanager
def invoked(argv: list[str]):
    """While a command runs: its arguments, for the rows it writes (``command_line``)."""
    token = _ARGV.set(list(argv))
    try:
        yield
    finally:
        _ARGV.reset(token)


def command_line() -> str:
    """The command being run, as a user would type it (a step of ``spdbench run``: the step's own)."""
    argv = _ARGV.get()
    return shlex.join(["spdbench", *(sys.argv[1:] if argv is None else argv)])
