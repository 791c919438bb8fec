"""The answer first: per latency scenario, the methods ranked by speedup with their accuracy cost,
and the best usable method at each accuracy budget.

Latency and accuracy are never combined across models: a scenario's accuracy columns come from
rows of the scenario's own model (and N), and say so; a model without accuracy rows (random
weights) leaves them n/a. Budgets are read on the point estimates (their standard errors are
shown beside them):

    exact        the strategy computes the unmodified model (EXACT)
    <= X% ppl    exact, or WikiText-2 perplexity change <= X% at the same N
    <= Y pp      exact, or mean task-accuracy loss <= Y percentage points at the same N

Perplexity changes are paired per window: with d_i the per-token NLL difference of window i
(strategy - baseline), change = exp(mean d) - 1 and its s.e. = exp(mean d) * sd(d) / sqrt(n).
"""

from __future__ import annotations

import math
import shlex
from typing import NamedTuple

import pandas as pd

from reports.cells import BOUND, REFERENCE, SCENARIO, SCENARIO_LABELS, SETTINGS, Cell, change_cell, na
from reports.cells import missing as _missing
from suite.vocabulary import is_random

# Strategies that compute the unmodified model (their class attribute ``exact``; tests/test_report.py checks
# this against the installed strategies). Any other name, a composite with SPD included, is not exact.
EXACT = ("baseline", "tokenweave", "seqpar")
PPL_BUDGETS = (1.0, 5.0)  # % perplexity increase
ACCURACY_BUDGETS = (0.5, 1.0, 2.0)  # percentage points of mean task accuracy lost
TOLERANCE = 1e-9  # budgets are inclusive: a change of exactly 1.0 pp meets "<= 1 pp" despite rounding


class PplChange(NamedTuple):
    """A perplexity change vs the baseline, in %, and its paired standard error."""

    pct: float
    se_pct: float
    windows: int

    def text(self) -> str:
        noise = "; within noise" if abs(self.pct) < 2 * self.se_pct else ""
        return f"{self.pct:+.2f} ± {self.se_pct:.2f}% ({self.windows} windows{noise})"


def ppl_changes(ppl: pd.DataFrame) -> dict:
    """(model, strategy, options, N) -> ``PplChange`` vs the baseline of the same model and text (same N,
    else any N: the baseline is exact)."""
    out = {}
    if ppl.empty:
        return out
    text = ["model", "dataset", "tokens", "seq_len", "dtype"]
    for _, g in ppl.groupby(text, dropna=False):
        base = g[g.strategy == REFERENCE]
        for r in g.itertuples():
            ref = base[base.tp == r.tp] if (base.tp == r.tp).any() else base
            if ref.empty or not isinstance(r.window_nll, list) or r.strategy == REFERENCE:
                continue
            ref_nll = ref.window_nll.iloc[0]
            if not isinstance(ref_nll, list) or len(ref_nll) != len(r.window_nll) or len(ref_nll) < 2:
                continue
            d = pd.Series([(a - b) / (r.seq_len - 1) for a, b in zip(r.window_nll, ref_nll)])
            scale = math.exp(d.mean())
            out[(r.model, r.strategy, r.options, r.tp)] = PplChange(
                100 * (scale - 1), 100 * scale * d.std() / math.sqrt(len(d)), len(d)
            )
    return out


def ppl_table(ppl: pd.DataFrame, changes: dict, refs) -> dict | None:
    """Perplexity per strategy x N, with the change vs the baseline."""
    if ppl.empty:
        return None
    header = ["model", "strategy", "options", "N", "tokens", "perplexity", "change vs baseline (± s.e.)", "source"]
    body = []
    order = {REFERENCE: 0, BOUND: 2}
    ppl = ppl.assign(order=ppl.strategy.map(lambda s: order.get(s, 1))).sort_values(
        ["model", "tp", "order", "strategy"]
    )
    for r in ppl.itertuples():
        if not r.usable_model:
            change = na("not a usable model")
        elif r.strategy == REFERENCE:
            change = "0 (reference)"
        else:
            c = changes.get((r.model, r.strategy, r.options, r.tp))
            change = c.text() if c else na("no baseline perplexity on the same text")
        body.append(
            [r.model, r.strategy, r.options, r.tp, r.tokens, f"{r.ppl:.3f}", change, refs.cell(r.command, r.env)]
        )
    return {"header": header, "rows": body}


def _speedup(value) -> str | Cell:
    return na("no timing") if _missing(value) else f"{value:.2f}x"


def _allowed(r, ppl: PplChange | None, acc) -> dict[str, bool]:
    """Which accuracy budgets the row meets (exact strategies meet all)."""
    exact = r.strategy in EXACT
    out = {"exact": exact}
    for x in PPL_BUDGETS:
        out[f"ppl{x}"] = exact or (ppl is not None and ppl.pct <= x + TOLERANCE)
    for y in ACCURACY_BUDGETS:
        out[f"acc{y}"] = exact or (acc is not None and -acc.delta_pp <= y + TOLERANCE)
    return out


def budget_labels() -> dict[str, str]:
    return {
        "exact": "exact",
        **{f"ppl{x}": f"<= {x:g}% perplexity" for x in PPL_BUDGETS},
        **{f"acc{y}": f"<= {y:g} pp task accuracy" for y in ACCURACY_BUDGETS},
    }


def _scenario_title(g: pd.DataFrame) -> str:
    r = g.iloc[0].to_dict()  # a dict: a Series' attributes (dtype) would shadow the fields
    how = SETTINGS[r["setting"]]
    if r["setting"] == "simulated":
        how += f" on {r['device_profile']} + {r['interconnect']}"
    elif r["setting"] == "projected":
        how += f" on {r['interconnect']}"
    scenario = ", ".join(f"{SCENARIO_LABELS[c]} {r[c]}" for c in SCENARIO if not _missing(r[c]))
    return f"{r['model']}, N={r['tp']}, {how}: {scenario}"


def ppl_command(r, fills) -> str:
    """The command that fills a latency row's missing perplexity."""
    spec = r.strategy + "".join(
        f":{k}={v}" if i == 0 else f",{k}={v}" for i, (k, v) in enumerate(sorted((r.strategy_options or {}).items()))
    )
    return shlex.join(
        [
            "spdbench",
            "spd",
            "ppl",
            "--model",
            str(r.model),
            "--tp",
            str(r.tp),
            "--strategy",
            "baseline",
            "--strategy",
            spec,
            "--out",
            fills.store("perplexity", "perplexity.jsonl"),
        ]
    )


def scenarios(lat: pd.DataFrame, acc_changes: dict, ppl: dict, fills, anchors: dict) -> list[dict]:
    """One summary per latency scenario (CPU rows excluded: they do not rank strategies).

    ``fills``: the page's ``Fills`` (an n/a that a command fills links to it); ``anchors``: (setting,
    device profile, interconnect, model) -> the id of its detail table."""
    out = []
    lat = lat[lat.setting != "cpu"]
    if lat.empty:
        return out
    base_e2e = lat.scenario.map(lat[lat.strategy == REFERENCE].groupby("scenario")["e2e_ms_median"].median())
    lat = lat.assign(e2e_speedup=base_e2e / pd.to_numeric(lat.e2e_ms_median, errors="coerce"))
    order = {setting: i for i, setting in enumerate(SETTINGS)}
    lat = lat.assign(setting_order=lat.setting.map(order)).sort_values(
        ["setting_order", "model", "device_profile", "interconnect", "tp", *SCENARIO],
        key=lambda c: c if pd.api.types.is_numeric_dtype(c) else c.map(str),
    )  # model, then N, then batch
    for key, g in lat.groupby("scenario", sort=False):
        g = g.sort_values("e2e_speedup", ascending=False, na_position="last")
        model, tp = g.model.iloc[0], g.tp.iloc[0]
        random = is_random(model)
        header = [
            "strategy",
            "options",
            "exact",
            "end-to-end speedup",
            "prefill speedup",
            "decode speedup",
            f"perplexity change on {model}, N={tp} (± s.e.)",
            f"task accuracy change on {model}, N={tp} (± s.e.)",
        ]
        body, best = [], {k: None for k in budget_labels()}
        for r in g.itertuples():
            ident = (r.model, r.strategy, r.options, r.tp)
            p, a = ppl.get(ident), acc_changes.get(ident)
            usable = bool(r.usable_model)
            body.append(
                [
                    r.strategy if usable else Cell(f"{r.strategy} (not a usable model)", "bound"),
                    r.options,
                    "yes" if r.strategy in EXACT else "no",
                    _speedup(r.e2e_speedup),
                    _speedup(r.prefill_speedup),
                    _speedup(r.decode_speedup),
                    change_cell(
                        r,
                        p,
                        random,
                        lambda: fills.na(
                            "no perplexity rows",
                            f"perplexity of {model} {r.strategy} at N={r.tp}",
                            ppl_command(r, fills),
                        ),
                    ),
                    change_cell(r, a, random, lambda: fills.accuracy(r)),
                ]
            )
            if usable and not _missing(r.e2e_speedup):
                for k, ok in _allowed(r, p, a).items():
                    if ok and best[k] is None:
                        best[k] = r
        anchor = anchors.get((g.setting.iloc[0], g.device_profile.iloc[0], g.interconnect.iloc[0], model))
        out.append(
            {
                "title": _scenario_title(g),
                "header": header,
                "rows": body,
                "anchor": anchor,
                "best": [[label, _best(best[k], k, random)] for k, label in budget_labels().items()],
                "figure_data": [
                    (r.strategy, r.e2e_speedup, r.strategy in EXACT)
                    for r in g.itertuples()
                    if bool(r.usable_model) and not _missing(r.e2e_speedup)
                ],
            }
        )
    return out


def _best(r, budget: str, random: bool) -> str | Cell:
    if random and budget != "exact":
        return na("random weights: no accuracy, so only the exact choice is known")
    if r is None:
        return na("no strategy with a measured accuracy of this model meets it (the table below says what to run)")
    options = f" ({r.options})" if r.options else ""
    return f"{r.strategy}{options}: {r.e2e_speedup:.2f}x end to end"
