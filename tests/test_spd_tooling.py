"""SPD tooling around the sensitivity analysis: its stability report, thresholds, plans without a
sensitivity file, the resumable accuracy sweep and the report's SPD figures and tables."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from spd import stability
from spd.plan import make_plan, plan_for_blocks
from spd.plan_file import PlanError
from suite.cli import main
from suite.parallel.strategy import make_strategy
from tests.helpers import require_data, source

MODEL = "random:tiny-uneven"


# --- stability ------------------------------------------------------------------------------

# Two windows, two blocks, one predicted token per window: perplexities with SPD on k..1 are
# window A: 4, 3, 1 (block 0 less sensitive); window B: 5, 2, 1 (block 1 less sensitive); both:
# sqrt(20), sqrt(6), 1 (block 1 less sensitive). A resample is {A, A} with probability 1/4.
FLIPPING = [[math.log(4), math.log(5)], [math.log(3), math.log(2)], [0.0, 0.0]]


def test_bootstrap_of_a_block_order_that_flips_with_the_windows():
    report = stability.bootstrap(FLIPPING, tokens=1, budgets=(50,), resamples=4000, seed=0)
    assert report["windows"] == 2 and report["resamples"] == 4000
    # {A, A} reverses the order (rho = -1) and chooses the other block: E[rho] = 3/4 - 1/4, E[agreement] = 3/4
    assert report["rank_correlation"]["mean"] == pytest.approx(0.5, abs=0.03)
    assert report["chosen_set_agreement"]["50%"]["mean"] == pytest.approx(0.75, abs=0.03)
    assert report["chosen_set_agreement"]["50%"]["p05"] == 0.0
    assert report["class_agreement"]["mean"] == pytest.approx(0.75, abs=0.03)  # ISB and ESB swap with the order
    low, high = report["sensitivity_interval"]["0"]  # block 0: 1 ({A, A}), 3 ({B, B}) or sqrt(20) - sqrt(6)
    assert (low, high) == pytest.approx((1.0, 3.0))


def test_bootstrap_of_identical_windows_is_perfectly_stable():
    nll = [[2.0] * 5, [1.5] * 5, [1.2] * 5, [1.0] * 5]
    report = stability.bootstrap(nll, tokens=3, resamples=200)
    assert report["rank_correlation"] == {"mean": pytest.approx(1.0), "p05": pytest.approx(1.0)}
    assert all(v == {"mean": 1.0, "p05": 1.0} for v in report["chosen_set_agreement"].values())
    sens = stability.sensitivities(np.array(nll), 3)
    assert sens.tolist() == pytest.approx(
        [math.exp(2 / 3) - math.exp(0.5), math.exp(0.5) - math.exp(0.4), math.exp(0.4) - math.exp(1 / 3)]
    )


# --- thresholds and plans -------------------------------------------------------------------


def _state(values, baseline_ppl=None):
    state = {"model": MODEL, "tp": 4, "n_layers": len(values), "sensitivity": {str(b): s for b, s in enumerate(values)}}
    if baseline_ppl is not None:
        state["ppl"] = {str(len(values)): baseline_ppl}
    return state


def test_absolute_and_relative_thresholds():
    state = _state([0.9, 0.1, 0.5, 0.2, 0.05, 2.0], baseline_ppl=20.0)
    plan = make_plan(state, "100%", t1="1%", t2="0.6")  # t1 = 1% of 20 = 0.2; t2 = 0.6 absolute
    assert plan.thresholds["t1"] == pytest.approx(0.2) and plan.thresholds["t2"] == 0.6
    assert "1% of the baseline calibration perplexity 20" in plan.thresholds["rule"]
    assert "absolute" in plan.thresholds["rule"]
    assert [plan.mode(b) for b in range(6)] == ["hg+b2b", "zs", "b2b", "zs", "zs", "hg+b2b"]
    quantile = make_plan(state, "100%")  # a third of the blocks are ESB whatever their values
    assert [quantile.mode(b) for b in range(6)].count("hg+b2b") == 2
    with pytest.raises(PlanError, match="t1 'fast'"):
        make_plan(state, "50%", t1="fast")
    with pytest.raises(PlanError, match="share of the baseline perplexity needs"):
        make_plan(_state([0.1, 0.2, 0.3]), "50%", t2="5%")


@pytest.mark.parametrize("variant, mode", [("zs", "zs"), ("zs+b2b", "b2b"), ("zs+b2b+hg", "hg+b2b")])
def test_plan_for_given_blocks(variant, mode):
    plan = plan_for_blocks(MODEL, 2, 3, "0,2", variant)
    assert plan.spd_blocks() == {0, 2} and {plan.mode(b) for b in plan.spd_blocks()} == {mode}
    assert plan.budget == {"requested": "blocks 0,2", "blocks": 2, "of": 3, "variant": variant}
    with pytest.raises(PlanError, match="out of range"):
        plan_for_blocks(MODEL, 2, 3, "3", variant)


def test_plan_command_without_sensitivity(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(["spd", "plan", "--model", MODEL, "--tp", "2", "--blocks", "last:2", "--variant", "zs", "--out", str(out)])
        == 0
    )
    assert "2 of 3 blocks SPD: zs 2" in capsys.readouterr().out
    strategy = make_strategy("spd", {"plan": str(out)})
    strategy.bind(source(MODEL), 2)
    assert strategy.describe() == {"spd_variant": "zs", "spd_blocks_pct": pytest.approx(200 / 3)}
    for argv in (
        ["--tp", "2", "--out", str(out)],  # no blocks
        ["--sensitivity", str(out), "--budget", "50%", "--blocks", "0", "--out", str(out)],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["spd", "plan", *argv])
        assert exit_.value.code == 2 and "plan: give" in capsys.readouterr().err


# --- the accuracy sweep and the report ------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Sensitivity (with its stability rows), the accuracy and perplexity sweeps at N = 2 on the tiny model, twice."""
    require_data()
    out = tmp_path_factory.mktemp("sweep")
    results = out / "results.jsonl"
    assert (
        main(
            [
                "spd",
                "sensitivity",
                "--model",
                MODEL,
                "--tp",
                "2",
                "--samples",
                "4",
                "--seq-len",
                "32",
                "--resamples",
                "100",
                "--out",
                str(out / "sens.json"),
                "--results",
                str(results),
            ]
        )
        == 0
    )
    common = [
        "--model",
        MODEL,
        "--tp",
        "2",
        "--sensitivity",
        str(out / "sens.json"),
        "--samples",
        "2",
        "--seq-len",
        "32",
        "--epochs",
        "1",
        "--heldout-samples",
        "1",
        "--budgets",
        "0,100",
        "--out",
        str(out),
    ]
    argv = ["spd", "sweep", "--metric", "accuracy", *common, "--tasks", "piqa,arc_easy", "--limit", "3"]
    ppl = ["spd", "sweep", "--metric", "ppl", *common, "--eval-samples", "2", "--eval-seq-len", "16"]
    assert main(argv) == 0
    assert main(ppl) == 0  # into the same results file
    first = results.read_text()
    assert main(argv) == 0 and main(ppl) == 0  # both resume: every cell is done
    assert results.read_text() == first
    return out, [json.loads(line) for line in first.splitlines()]


def test_sweep_writes_accuracy_rows_per_budget_and_variant(sweep):
    _, rows = sweep
    ppl = {(r["budget_pct"], r["spd_variant"]): r["ppl"] for r in rows if r["kind"] == "spd_ppl"}
    assert set(ppl) == {(0, "zs"), (100, "zs"), (100, "zs+b2b"), (100, "zs+b2b+hg")}
    acc = [r for r in rows if r["kind"] == "accuracy"]
    configs = {(r["spd_variant"], r["spd_blocks_pct"]) for r in acc}
    assert configs == {("zs", 0.0), ("zs", 100.0), ("zs+b2b", 100.0), ("zs+b2b+hg", 100.0)}
    for config in configs:
        mine = {(r["task"], r["metric"]) for r in acc if (r["spd_variant"], r["spd_blocks_pct"]) == config}
        assert {"piqa", "arc_easy"} == {t for t, _ in mine} and ("piqa", "acc") in mine
    assert all(r["limit"] == 3 and r["stderr"] is not None and r["strategy"] == "spd" for r in acc)
    assert len({r["command"] for r in acc}) == 1  # one command made every row


def test_report_draws_the_accuracy_figure_and_the_stability_table(sweep):
    from reports import frames, render

    out, rows = sweep
    html = render.render(frames.load([out / "results.jsonl"]))
    stab = [r for r in rows if r["kind"] == "spd_stability"]
    assert {r["budget_pct"] for r in stab} == {25.0, 50.0, 75.0}
    assert all(-1 <= r["rank_corr_mean"] <= 1 and 0 <= r["set_agreement_mean"] <= 1 for r in stab)
    table = html.split("Stability of the sensitivity analysis")[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 3 and f"{stab[0]['rank_corr_mean']:.6g}" in table
    figures = dict(re.findall(r'<h3>([^<]+)</h3><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html))
    for title in ("Accuracy vs % of SPD blocks", "Per-block SPD sensitivity", "Perplexity vs % of SPD blocks"):
        image = Image.open(io.BytesIO(base64.b64decode(figures[title])))
        lo, hi = image.convert("L").getextrema()
        assert image.width > 200 and hi - lo > 100, title
    assert "Perplexity vs % of SPD blocks" in figures
