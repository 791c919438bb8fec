"""The ``spdbench`` command line.

Commands register through the ``spdbench.commands`` entry-point group (the built-ins too): each
names a function ``add_command(subparsers)`` that adds a parser whose ``handler(args, parser)``
returns the exit code. Command modules import nothing heavy at import time, so bad arguments
are answered before torch loads. Every ``SpdbenchError`` is a one-line usage error (exit 2).
Third-party warnings, log messages and progress bars are hidden unless ``-v`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from importlib.metadata import entry_points

from suite.cli.common import invoked
from suite.errors import RankError, SpdbenchError

EXIT_USAGE = 2
ENTRY_POINTS = "spdbench.commands"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help as a user reads it: an option's default where it has one (lists as typed), quotes
    instead of the backticks of docstrings."""

    def _get_help_string(self, action):
        text = (action.help or "").replace("`", "'")
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _format_text(self, text):
        return super()._format_text(text.replace("`", "'"))


class Parser(argparse.ArgumentParser):
    """Bad input: one line naming the problem, exit code 2; defaults shown in --help; -v on every command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show third-party warnings, log messages and progress bars (hidden by default)",
        )

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    parser = Parser(
        prog="spdbench",
        description="Benchmark and validation suite for tensor-parallel "
        "communication methods (SPD, ladder residual, token splitting) on LLaMA models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda ep: ep.name):
        ep.load()(sub)
    return parser


def _quiet_third_parties(verbose: bool) -> None:
    """Warnings, info logs and progress bars of the libraries underneath are noise for a user of the
    command line. The project's own warnings stay visible (a deprecated call of ours must show)."""
    if verbose:
        return
    warnings.filterwarnings("ignore", module=r"(?!(suite|spd|baselines|reports)\b)")
    for name in ("transformers", "lm_eval", "datasets", "accelerate", "torch", "matplotlib", "fsspec", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' too; inherited by the ranks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    _quiet_third_parties(getattr(args, "verbose", False))
    try:
        with invoked(argv):  # rows record this command (a step of ``spdbench run`` records its own)
            return args.handler(args, sub)
    except SpdbenchError as exc:
        sub.error(str(exc))
    except KeyboardInterrupt:
        print("spdbench: interrupted", file=sys.stderr)
        return 130
    except RankError as exc:  # a rank that failed while running
        print(f"spdbench: {exc}", file=sys.stderr)
        return 1
