"""``spdbench spd ppl``: WikiText-2 perplexity per strategy through the TP model, against the
single-process Hugging Face model, resumable."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from spd.data import wikitext2_windows
from suite import cli
from tests.helpers import hf_model, require_data, source

MODEL = "random:tiny"


def approx(value):
    return pytest.approx(value, rel=1e-4)


def test_perplexity_rows_match_the_hf_model_and_resume(tmp_path, capsys):
    require_data()
    out = tmp_path / "perplexity.jsonl"
    args = [
        "spd",
        "ppl",
        "--model",
        MODEL,
        "--tp",
        "2",
        "--strategy",
        "baseline",
        "--strategy",
        "tokenweave",
        "--strategy",
        "ladder",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    rows = {r["strategy"]: r for r in map(json.loads, out.read_text().splitlines())}
    windows = wikitext2_windows(source(MODEL), 4, 32)
    with torch.no_grad():
        logits = hf_model(MODEL)(windows).logits
    nll = [F.cross_entropy(logits[i, :-1], windows[i, 1:], reduction="sum").item() for i in range(4)]
    assert rows["baseline"]["window_nll"] == [approx(v) for v in nll]
    assert rows["baseline"]["ppl"] == approx(math.exp(sum(nll) / (4 * 31)))
    assert rows["tokenweave"]["ppl"] == approx(rows["baseline"]["ppl"])  # exact: the same model
    assert abs(rows["ladder"]["ppl"] / rows["baseline"]["ppl"] - 1) > 1e-3  # ladder changes the model
    assert rows["baseline"]["tokens"] == 128 and rows["baseline"]["dataset"] == "wikitext2-test"
    capsys.readouterr()
    assert cli.main(args) == 0  # resumed: nothing runs, no row is added
    assert len(out.read_text().splitlines()) == 3


def test_bad_strategy_is_one_line_and_exit_2(tmp_path, capsys):
    try:
        code = cli.main(["spd", "ppl", "--tp", "2", "--strategy", "nosuch", "--out", str(tmp_path / "p.jsonl")])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "unknown strategy 'nosuch'" in capsys.readouterr().err
