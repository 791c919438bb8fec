"""The page's tables: latency per setting, profiles and model; accuracy per model; the SPD tables and
pytest-benchmark files. Every n/a says why, and links to what fills it."""

from __future__ import annotations

import json

import pandas as pd

from reports.analysis import ACCURACY_CONFIG, NOISE_SE, Change, accuracy_deltas
from reports.cells import BOUND, REFERENCE, SCENARIO, SCENARIO_LABELS, Cell, change_cell, na, plain
from reports.cells import missing as _missing
from reports.fills import Fills
from reports.frames import row_keys
from reports.provenance import Refs
from suite.vocabulary import SPD_VARIANTS, is_random


def number(value, fmt: str, reason: str) -> Cell | str:
    return na(reason) if _missing(value) else format(value, fmt)


def percent(value, se=None) -> str:
    """A fraction as % with one decimal, and its standard error."""
    return f"{100 * value:.1f}" + ("" if _missing(se) else f" ± {100 * se:.1f}")


def _strategy_cell(r) -> Cell:
    return Cell(r.strategy, "") if r.usable_model else Cell(f"{r.strategy} (not a usable model)", "bound")


def _relative_cells(r, phase: str, fills: Fills) -> list:
    if r.strategy == REFERENCE:
        return ["1.00x", "0%"]
    if not getattr(r, f"{phase}_has_base"):
        return [
            fills.matrix(
                "no baseline row for this scenario", "add the strategy baseline to the matrix and re-run", r.command
            )
        ] * 2
    speedup = number(getattr(r, f"{phase}_speedup"), ".2f", "no timing")
    speedup = speedup + "x" if isinstance(speedup, str) else speedup
    if r.tp == 1:
        share = na("N=1 has no communication")
    elif not getattr(r, f"{phase}_has_bound"):
        share = fills.matrix(
            "no nocomm row for this scenario", "add the strategy nocomm to the matrix and re-run", r.command
        )
    else:
        value, unresolved = getattr(r, f"{phase}_bound_share"), getattr(r, f"{phase}_bound_unresolved")
        unresolved = unresolved if isinstance(unresolved, str) else None  # a table cell: None or NaN when resolved
        if unresolved == "noise":
            share = fills.matrix(
                "baseline-nocomm gap within the p10-p90 noise", "raise repetitions in the matrix and re-run", r.command
            )
        elif unresolved or _missing(value):
            share = na(unresolved or "no timing")
        else:
            share = f"{100 * value:.0f}%"
    return [speedup, share]


def _spread(r, prefix: str):
    med, lo, hi = (getattr(r, f"{prefix}_{s}", None) for s in ("median", "p10", "p90"))
    if _missing(med):
        return na("not measured")
    return f"{med:.2f}" + ("" if _missing(lo) or _missing(hi) or lo == hi else f" ({lo:.2f}-{hi:.2f})")


def _energy_cell(r):
    if not _missing(getattr(r, "j_per_token", None)):
        return f"{r.j_per_token:.3f}"
    status = getattr(r, "telemetry_status", None)
    return Cell(str(status), "na") if isinstance(status, str) and status.startswith("n/a") else na("no telemetry")


def _title(setting: str, model: str, device_profile: str, link: str) -> str:
    if setting == "simulated":
        return f"{model} - simulated, device {device_profile}, interconnect {link}"
    if setting == "projected":
        return f"{model} - projected, interconnect {link}"
    return model


def latency_sections(lat: pd.DataFrame, refs: Refs, fills: Fills) -> list[dict]:
    """One table per (setting, profiles, model); scenario fields constant in a table go to its caption.
    CPU tables have no speedups, bound shares or accuracy changes: they do not rank strategies."""
    sections = []
    keys = ["setting", lat.device_profile.fillna("-"), lat.interconnect.fillna("-"), "model"]
    for (setting, device_profile, link, model), df in lat.groupby(keys, sort=True):
        ranks = setting != "cpu"
        varying = [c for c in SCENARIO if df[c].map(str).nunique() > 1]
        fixed = [
            f"{SCENARIO_LABELS[c]} {df[c].iloc[0]}"
            for c in SCENARIO
            if c not in varying and not _missing(df[c].iloc[0])
        ]
        header = [
            "strategy",
            "options",
            "N",
            *[SCENARIO_LABELS[c] for c in varying],
            "prefill ms (p10-p90)",
            "decode ms/token (p10-p90)",
            "tokens/s",
        ]
        if ranks:
            header += [
                "prefill speedup",
                "prefill: share of no-comm bound",
                "decode speedup",
                "decode: share of no-comm bound",
                "accuracy change vs baseline (± s.e.)",
            ]
        header += ["J/token", "source"]
        body = []
        for r in df.itertuples():
            row = [
                _strategy_cell(r),
                r.options,
                r.tp,
                *[getattr(r, c) for c in varying],
                _spread(r, "prefill_ms"),
                _spread(r, "decode_ms_per_token"),
                number(getattr(r, "tokens_per_s", None), ".1f", "not measured"),
            ]
            if ranks:
                row += [
                    *_relative_cells(r, "prefill", fills),
                    *_relative_cells(r, "decode", fills),
                    change_cell(r, r.acc_delta, is_random(r.model), lambda: fills.accuracy(r)),
                ]
            body.append(row + [_energy_cell(r), refs.cell(r.command, r.env)])
        sections.append(
            {
                "id": f"latency-{len(sections) + 1}",
                "setting": setting,
                "device_profile": None if device_profile == "-" else device_profile,
                "interconnect": None if link == "-" else link,
                "model": model,
                "title": _title(setting, model, device_profile, link),
                "caption": [", ".join(fixed), *_shared_reasons(header, body)],
                "header": header,
                "rows": body,
            }
        )
    return sections


def _shared_reasons(header: list[str], body: list[list]) -> list[Cell]:
    """A column whose cells are all n/a for one reason says it once, in the caption (cells keep 'n/a')."""
    notes = []
    for i, name in enumerate(header):
        cells = [row[i] for row in body]
        if len(cells) > 1 and all(
            isinstance(c, Cell) and c.css == "na" and c.text == cells[0].text and c.links == cells[0].links
            for c in cells
        ):
            notes.append(Cell(f"{name} {cells[0].text}", "", cells[0].links))
            for row in body:
                row[i] = Cell("n/a", "na")
    return notes


def accuracy_section(acc: pd.DataFrame, refs: Refs, fills: Fills) -> list[dict]:
    """Per model: one row per configuration, one column per task (% ± s.e.), mean and change (pp ± s.e.)."""
    if acc.empty:
        return []
    acc = acc[acc["metric"] != "sample_len"]  # lm-eval's document count, not a score
    summary, _ = accuracy_deltas(acc)
    tables = []
    order = {REFERENCE: 0, BOUND: 2}
    acc = acc.assign(
        order=acc.strategy.map(lambda s: order.get(s, 1)),
        variant_order=acc.spd_variant.map(lambda v: SPD_VARIANTS.index(v) if v in SPD_VARIANTS else -1),
    )
    acc = acc.sort_values(
        ["order", "strategy", "tp", "variant_order", "spd_blocks_pct", "options"], na_position="first"
    )
    for model, df in acc.groupby("model"):
        tasks = sorted({(t, m) for t, m in zip(df.task, df.metric)})
        limits = {plain(v) for v in df["limit"]}
        one_limit = len(limits) == 1
        keys = ACCURACY_CONFIG
        header = [
            "strategy",
            "options",
            "N",
            "SPD variant",
            "SPD blocks %",
            *[f"{t} {m} %" for t, m in tasks],
            "mean accuracy %",
            "change vs baseline (± s.e.)",
            "source",
        ]
        body = []
        for key, g in df.groupby(keys, dropna=False, sort=False):
            first = g.iloc[0]
            cells = {
                (t, m): fills.na(
                    "not evaluated",
                    f"{t} for {model} {first.strategy} at N={first.tp}",
                    fills.eval_command(model, first.strategy, first.strategy_options, first.tp, t),
                )
                for t, m in tasks
            }
            for r in g.itertuples():
                limit = "" if one_limit else " (all documents)" if _missing(r.limit) else f" (limit {plain(r.limit)})"
                cells[(r.task, r.metric)] = percent(r.value, r.stderr) + limit
            s = summary[(summary.model == model) & (row_keys(summary, keys) == "|".join(map(str, key)))]
            usable = bool(g.usable_model.iloc[0])
            mean = (
                percent(s["mean"].iloc[0], s["mean_se"].iloc[0])
                if len(s) and not _missing(s["mean"].iloc[0])
                else na("no acc/acc_norm metric")
            )
            if not usable:
                change = na("not a usable model")
            elif key[0] == REFERENCE:
                change = "0 (reference)"
            elif len(s) and s["compared"].iloc[0]:
                r = s.iloc[0]
                change = Change(r.delta_pp, int(r.compared), r.delta_se_pp).text()
            else:
                change = fills.na(
                    "no baseline for these tasks",
                    f"the baseline of {model} at N={first.tp}",
                    fills.eval_command(model, REFERENCE, {}, first.tp),
                )
            strategy = first.strategy if usable else f"{first.strategy} (not a usable model)"
            body.append(
                [
                    strategy,
                    first.options,
                    first.tp,
                    *[plain(k) for k in key[3:]],
                    *cells.values(),
                    mean,
                    change,
                    refs.cell(first.command, first.env),
                ]
            )
        documents = limits.pop() if one_limit else ""
        caption = (
            f"{'all' if documents == '' else f'the first {documents}'} documents per task; " if one_limit else ""
        ) + (f"± one standard error (lm-eval's); a change under {NOISE_SE} standard errors is within noise")
        tables.append({"title": model, "caption": [caption], "header": header, "rows": body})
    return tables


def simple_table(df: pd.DataFrame, cols: list[str], refs: Refs | None = None) -> dict:
    body = [
        [Cell("n/a", "na") if _missing(v) else f"{v:.6g}" if isinstance(v, float) else v for v in r]
        for r in df[cols].itertuples(index=False)
    ]
    if refs is not None:
        body = [b + [refs.cell(c, e)] for b, c, e in zip(body, df.command, df.env)]
    return {"header": cols + (["source"] if refs is not None else []), "rows": body}


def benchmark_tables(benchmarks: list[dict]) -> list[dict]:
    tables = []
    for f in benchmarks:
        body = []
        for b in f.get("benchmarks", []):
            s = b.get("stats", {})
            body.append(
                [b.get("fullname", b.get("name")), b.get("group") or "", json.dumps(b.get("params") or {}, default=str)]
                + [
                    number(s.get(k), ".4f", "missing") if k != "rounds" else s.get("rounds", "")
                    for k in ("median", "mean", "stddev", "rounds")
                ]
                + [
                    json.dumps(
                        {k: v for k, v in (b.get("extra_info") or {}).items() if not isinstance(v, (list, dict))},
                        default=str,
                    )
                ]
            )  # per-round samples left out
        env = {**f.get("machine_info", {}), "commit": f.get("commit_info", {}).get("id"), "date": f.get("datetime")}
        tables.append(
            {
                "title": f["file"],
                "caption": "times in seconds",
                "header": ["benchmark", "group", "params", "median s", "mean s", "stddev s", "rounds", "extra info"],
                "rows": body,
                "env": json.dumps(env, indent=1, default=str),
            }
        )
    return tables
