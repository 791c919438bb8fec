"""The SPD planning policy: which blocks drop their sync, chosen from a sensitivity analysis (a budget of the
least sensitive blocks, each classified by thresholds t1 <= t2 into zs, b2b or hg+b2b) or named by a block
spec. The plan file and its checks: ``spd.plan_file``."""

from __future__ import annotations

from spd.plan_file import Plan, PlanError
from suite.vocabulary import check_variant, parse_blocks, strongest_mode


def parse_budget(budget: str, n_layers: int) -> int:
    """``50%`` (of the blocks, rounded) or a block count -> number of SPD blocks."""
    try:
        n = round(float(budget[:-1]) / 100 * n_layers) if budget.endswith("%") else int(budget)
    except ValueError:
        n = -1
    if not 0 <= n <= n_layers:
        raise PlanError(f"budget {budget!r}: expected a percentage 0%..100% or a block count 0..{n_layers}")
    return n


def classify(sensitivity: float, t1: float, t2: float) -> str:
    """ISB (s <= t1) -> zs; SB (t1 < s <= t2) -> b2b; ESB (s > t2) -> hg+b2b."""
    return "zs" if sensitivity <= t1 else "b2b" if sensitivity <= t2 else "hg+b2b"


def _threshold(name: str, value: float | str, baseline: float | None) -> tuple[float, str]:
    """A threshold given as a perplexity increase (``0.5``) or a share of the baseline perplexity (``2%``)."""
    text = str(value).strip()
    try:
        number = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        raise PlanError(
            f"{name} {value!r}: expected a perplexity increase (0.5) or a share of the baseline perplexity (2%)"
        ) from None
    if not text.endswith("%"):
        return number, f"{name} = {text} (absolute perplexity increase)"
    if baseline is None:
        raise PlanError(
            f"{name} {text}: a share of the baseline perplexity needs a sensitivity file that records "
            "it; give an absolute perplexity increase"
        )
    return number / 100 * baseline, f"{name} = {text} of the baseline calibration perplexity {baseline:.4g}"


def thresholds(state: dict, t1: float | str | None, t2: float | str | None) -> dict:
    """t1 and t2 with the rule that gave them: a quantile of all blocks' sensitivities (default), an
    absolute perplexity increase (``0.5``) or a share of the baseline calibration perplexity (``2%``)."""
    import statistics

    quantiles = statistics.quantiles([float(s) for s in state["sensitivity"].values()], n=3, method="inclusive")
    baseline = state.get("ppl", {}).get(str(state["n_layers"]))
    out, rules = {}, []
    for name, value, q, share in (("t1", t1, quantiles[0], "1/3"), ("t2", t2, quantiles[1], "2/3")):
        if value is None or str(value).strip() == "":
            out[name] = q
            rules.append(f"{name} = {share} quantile (inclusive) of all blocks' sensitivities")
        else:
            out[name], rule = _threshold(name, value, baseline)
            rules.append(rule)
    if out["t1"] > out["t2"]:
        raise PlanError(f"t1 {out['t1']} is above t2 {out['t2']}: thresholds must satisfy t1 <= t2")
    return out | {"rule": "; ".join(rules)}


def make_plan(
    state: dict, budget: str, t1: float | str | None = None, t2: float | str | None = None, variant: str = "zs+b2b+hg"
) -> Plan:
    """SPD on the least sensitive blocks up to ``budget``, classified by the thresholds."""
    check_variant(variant, PlanError)
    sens = {int(b): s for b, s in state["sensitivity"].items()}
    n_layers = state["n_layers"]
    if sorted(sens) != list(range(n_layers)):
        raise PlanError("the sensitivity analysis is unfinished: re-run `spdbench spd sensitivity` to complete it")
    limits = thresholds(state, t1, t2)
    n = parse_budget(budget, n_layers)
    chosen = sorted(sens, key=lambda b: (sens[b], b))[:n]
    blocks = {}
    for b in sorted(sens):
        mode = classify(sens[b], limits["t1"], limits["t2"]) if b in chosen else "tp"
        mode = {"zs": {"b2b": "zs", "hg+b2b": "zs"}, "zs+b2b": {"hg+b2b": "b2b"}}.get(variant, {}).get(mode, mode)
        blocks[b] = {"mode": mode, "sensitivity": sens[b]}
    return Plan(
        state["model"],
        state["tp"],
        blocks,
        thresholds=limits,
        budget={"requested": budget, "blocks": n, "of": n_layers, "variant": variant},
    )


def plan_for_blocks(model: str, tp: int, n_layers: int, blocks: str, variant: str) -> Plan:
    """SPD on the given blocks (``all``, ``last:K`` or ``i,j,...``), without a sensitivity analysis:
    every block gets the variant's mode (zs, b2b, or hg+b2b)."""
    check_variant(variant, PlanError)
    chosen = parse_blocks(blocks, n_layers, error=PlanError)
    return Plan(
        model,
        tp,
        {b: {"mode": strongest_mode(variant)} for b in sorted(chosen)},
        budget={"requested": f"blocks {blocks}", "blocks": len(chosen), "of": n_layers, "variant": variant},
    )


def restrict(plan: Plan, budget: str) -> Plan:
    """The same plan (modes, layouts, weights) with SPD only on its ``budget`` least sensitive blocks."""
    n = parse_budget(budget, len(plan.blocks))
    chosen = sorted(
        (b for b in plan.blocks if plan.mode(b) != "tp"), key=lambda b: (plan.blocks[b].get("sensitivity", 0.0), b)
    )[:n]
    if len(chosen) < n:
        raise PlanError(f"budget {budget}: the plan has only {len(chosen)} SPD blocks")
    blocks = {b: e if b in chosen else {**e, "mode": "tp"} for b, e in plan.blocks.items()}
    return Plan(
        plan.model,
        plan.tp,
        blocks,
        plan.thresholds,
        {**(plan.budget or {}), "requested": budget, "blocks": n},
        plan.weights,
        plan.distill,
        plan.path,
    )
