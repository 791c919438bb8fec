"""The command line as a newcomer meets it: bad input answered in one line before torch loads, --help with
its defaults and without docstring markup, a note for every strategy that is not the pretrained model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from suite.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
BAD_INPUT = [
    (["generate", "--tp", "0", "--prompt", "hi"], "tp 0 is invalid"),
    (["generate", "--model", "nosuch", "--prompt", "hi"], "unknown model 'nosuch'"),
    (["generate", "--model", "missing.gguf", "--prompt", "hi"], "model missing.gguf: no such GGUF file"),
    (["generate", "--strategy", "nosuch", "--prompt", "hi"], "unknown strategy 'nosuch'; choose one of: baseline"),
    (["generate", "--tp", "2", "--spd-plan", "missing.json", "--prompt", "hi"], "spd_plan missing.json: no such file"),
    (
        ["eval", "--tasks", "piqa", "--data-dir", "/no/such/folder", "--out", "x.jsonl"],
        "data_dir /no/such/folder: no such data folder",
    ),
    (["bench", "--config", "missing.yaml", "--out", "out"], "config missing.yaml: no such file"),
    (["report", "missing.jsonl"], "results missing.jsonl: no such file or folder"),
    (["validate-projection", "--tp", "2", "--interconnect", "nosuch"], "interconnect 'nosuch': no such file or name"),
    (["run", "--simulate", "h100-sxm"], "simulate 'h100-sxm': expected DEVICE_PROFILE:INTERCONNECT"),
    (["run", "--simulate", "h100-sxm:nosuch"], "interconnect 'nosuch': no such file or name"),
    (["run", "--config", "missing.yaml"], "config missing.yaml: no such file"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a[:2]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_before_torch_loads(argv, message, tmp_path):
    code = (
        "import sys\nfrom suite.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
        "    print(exc.code, 'torch' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr  # exit 2, torch never imported
    assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr


def commands(parser, prefix=()):
    """Every (sub)command's parser, with its words."""
    yield prefix, parser
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            yield from commands(sub, (*prefix, name))


def test_help_shows_defaults_once_and_no_backticks():
    parsers = list(commands(build_parser()))
    assert len(parsers) > 12
    for words, parser in parsers:
        text = parser.format_help()
        assert "`" not in text and "(default: None)" not in text and "(default: False)" not in text, words
        formatter = parser._get_formatter()
        for action in parser._actions:
            shown = formatter._get_help_string(action) or ""
            assert shown.count("(default") == shown.count("(default:") <= 1, (words, shown)  # one, in one form
    run = " ".join(dict(parsers)[("run",)].format_help().split())
    assert "(default: 1 2 4)" in run and "(default: h100-sxm:h100-nvswitch)" in run
    assert "-v, --verbose" in run  # -v after the command works too


@pytest.mark.parametrize("strategy", [["ladder"], ["spd", "--strategy-opt", "blocks=all"]])
def test_generate_notes_strategies_that_change_the_model(strategy, capsys):  # as nocomm's (test_baselines.py)
    assert (
        main(["generate", "--model", "random:tiny", "--strategy", *strategy, "--prompt", "Hi", "--max-new-tokens", "2"])
        == 0
    )
    note = (
        f"note: {strategy[0]} changes the model (no retraining here): its text may differ from the pretrained model's"
    )
    assert note in capsys.readouterr().out
