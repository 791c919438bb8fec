"""The ``spdbench`` command line.

Commands register through the ``spdbench.commands`` entry-point group (the built-ins too): each
names a function ``add_command(subparsers)`` that adds a parser whose ``handler(args, parser)``
returns the exit code. Command modules import nothing heavy at import time, so bad arguments
are answered before torch loads. Every ``SpdbenchError`` is a one-line usage error (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from importlib.metadata import entry_points

from suite.errors import RankError, SpdbenchError

EXIT_USAGE = 2
ENTRY_POINTS = "spdbench.commands"


class Parser(argparse.ArgumentParser):
    """Bad input: one line naming the problem, exit code 2; option defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    parser = Parser(prog="spdbench", description="Benchmark and validation suite for tensor-parallel "
                    "communication methods (SPD, ladder residual, token splitting) on LLaMA models.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party warnings and log messages (quiet by default)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda ep: ep.name):
        ep.load()(sub)
    return parser


def _quiet_third_parties(verbose: bool) -> None:
    """Warnings and info logs of the libraries underneath are noise for a user of the command line."""
    if verbose:
        return
    warnings.filterwarnings("ignore", module=r"(?!(suite|spd|baselines|reports)\b)")
    for name in ("transformers", "lm_eval", "datasets", "accelerate", "torch", "matplotlib", "fsspec", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    _quiet_third_parties(args.verbose)
    try:
        return args.handler(args, sub)
    except SpdbenchError as exc:
        sub.error(str(exc))
    except KeyboardInterrupt:
        print("spdbench: interrupted", file=sys.stderr)
        return 130
    except RankError as exc:  # a rank that failed while running
        print(f"spdbench: {exc}", file=sys.stderr)
        return 1
