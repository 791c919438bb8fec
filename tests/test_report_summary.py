"""The report's summary: ranked methods, paired perplexity changes, the best method per accuracy budget.

Every row here is invented test input; every expectation is worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from reports import analysis, frames, render, summary
from suite.results import AccuracyScenario, LatencyScenario, Row, StrategyPerplexityScenario

SEQ = 129  # 128 targets per window
MODEL = "smollm2-135m"


def _latency(strategy: str, e2e: float, usable: bool = True) -> dict:
    cell = LatencyScenario(
        model=MODEL,
        strategy=strategy,
        tp=2,
        batch=1,
        prompt_len=1024,
        new_tokens=512,
        dtype="float16",
        device="cuda",
        decode_mode="cuda_graph",
        mode="simulated",
        interconnect="h100-nvswitch",
        device_profile="h100-sxm",
    )
    values = {
        "prefill_ms_median": e2e / 2,
        "prefill_ms_p10": e2e / 2,
        "prefill_ms_p90": e2e / 2,
        "decode_ms_per_token_median": e2e / 1024,
        "decode_ms_per_token_p10": e2e / 1024,
        "decode_ms_per_token_p90": e2e / 1024,
        "e2e_ms_median": e2e,
    }
    return Row(scenario=cell, provenance="simulated", usable_model=usable, values=values, command="c").to_json()


def _ppl(strategy: str, per_token: list[float]) -> dict:
    cell = StrategyPerplexityScenario(
        model=MODEL, strategy=strategy, tp=2, dataset="wikitext2-test", tokens=3 * SEQ, seq_len=SEQ
    )
    nll = [v * (SEQ - 1) for v in per_token]
    return Row(
        scenario=cell, values={"ppl": math.exp(sum(nll) / (3 * (SEQ - 1))), "window_nll": nll}, command="p"
    ).to_json()


def _accuracy(strategy: str, value: float) -> dict:
    cell = AccuracyScenario(model=MODEL, strategy=strategy, tp=2, task="piqa", metric="acc", limit=100)
    return Row(scenario=cell, values={"value": value, "stderr": 0.01}, command="a").to_json()


def rows() -> list[dict]:
    base = [3.0, 3.5, 4.0]
    return [
        _latency("baseline", 100.0),
        _latency("tokenweave", 95.0),
        _latency("spd", 80.0),
        _latency("ladder", 70.0),
        _latency("nocomm", 50.0, usable=False),
        _ppl("baseline", base),
        _ppl("tokenweave", base),
        _ppl("spd", [b + d for b, d in zip(base, [0.002, 0.006, 0.010])]),  # mean +0.006 per token
        _ppl("ladder", [b + 0.03 for b in base]),  # +0.03: exp(0.03) - 1 = +3.05%
        _accuracy("baseline", 0.700),
        _accuracy("tokenweave", 0.700),
        _accuracy("spd", 0.692),
        _accuracy("ladder", 0.685),
    ]


def test_paired_perplexity_change_and_its_standard_error():
    changes = summary.ppl_changes(frames.frame(rows(), "perplexity"))
    spd = changes[(MODEL, "spd", "", 2)]
    # d = 0.002, 0.006, 0.010: mean 0.006, sample sd 0.004, s.e. 0.004 / sqrt(3)
    assert spd.pct == pytest.approx(100 * (math.exp(0.006) - 1))
    assert spd.se_pct == pytest.approx(100 * math.exp(0.006) * 0.004 / math.sqrt(3))
    assert changes[(MODEL, "ladder", "", 2)].pct == pytest.approx(100 * (math.exp(0.03) - 1))
    assert changes[(MODEL, "tokenweave", "", 2)].pct == pytest.approx(0.0)


def test_best_method_at_each_budget():
    page = render.render(frames.Results(rows=rows()))
    head = page.split('id="summary"')[1].split('id="models"')[0]
    best = head.split('<table class="budgets">')[1].split("</table>")[0]
    # speedups 100/95 = 1.05 (tokenweave, exact), 100/80 = 1.25 (spd: +0.60% ppl, -0.8 pp),
    # 100/70 = 1.43 (ladder: +3.05% ppl, -1.5 pp); nocomm is no model
    expected = [
        "tokenweave: 1.05x",
        "spd: 1.25x",
        "ladder: 1.43x",  # exact, <= 1% ppl, <= 5% ppl
        "tokenweave: 1.05x",
        "spd: 1.25x",
        "ladder: 1.43x",
    ]  # <= 0.5, 1, 2 pp
    cells = [c.split(" end to end")[0] for c in best.split("<td>")[2:]]
    assert cells == expected
    ranked = head.split('<table class="ranked">')[1]
    order = [r.split("<td>")[1].split("<")[0] for r in ranked.split("<tr>")[2:]]
    assert order[1:5] == ["ladder", "spd", "tokenweave", "baseline"]  # by end-to-end speedup, after nocomm (2x)
    assert "+0.60 ± 0.23% (3 windows)" in ranked  # 100 exp(.006) .004 / sqrt(3) = 0.232
    assert "-0.8 ± 1.4 pp (1 task; within noise)" in ranked


def test_exact_strategies_are_the_installed_exact_ones():
    from importlib.metadata import entry_points

    exact = {e.name for e in entry_points(group="spdbench.strategies") if getattr(e.load(), "exact", False)}
    assert exact == set(summary.EXACT)


def test_composites_reach_the_summary_and_the_pareto_as_any_strategy():
    from reports import figures

    composite = [_latency("spd+ladder", 60.0), _accuracy("spd+ladder", 0.68), _ppl("spd+ladder", [3.1, 3.6, 4.1])]
    data = rows() + composite
    lat = analysis.latency_table(
        frames.frame(data, "latency"), analysis.accuracy_deltas(frames.frame(data, "accuracy"))[1]
    )
    assert "spd+ladder" in figures._palette(lat)
    assert "png" in figures.pareto(lat)
    page = render.render(frames.Results(rows=data))
    best = page.split('<table class="budgets">')[1].split("</table>")[0]
    assert "spd+ladder: 1.67x end to end" in best  # 100/60; +10.5% ppl (exp 0.1), -2.0 pp: only the <= 2 pp budget
    assert best.count("spd+ladder") == 1
    assert (
        "smollm2-135m, N=2, simulated on h100-sxm + h100-nvswitch: batch 1, prompt 1024, new tokens 512, "
        "dtype float16, device cuda, decode cuda_graph" in best
    )
