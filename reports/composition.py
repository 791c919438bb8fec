"""Composites against their parts at the same plan, from latency rows (docs/composition.md).

A composite runs SPD's plan (its options ``plan`` or ``blocks``) on an overlap schedule (the other
options): its parts are ``spd`` with the composite's SPD options and the schedule's strategy with the
rest, in the same scenario (model, profiles, N, batch, prompt, kernels, ...). A comparison is one step
(prefill, decode step, end to end) of one composite against one part; it is listed when the composite's
median is the larger. Measured rows whose p10-p90 spreads overlap say so: that difference is noise.
"""

from __future__ import annotations

import pandas as pd

from reports.cells import SCENARIO, SCENARIO_LABELS, SETTINGS, missing

COMPOSITES = {"spd+ladder": "ladder", "spd+tokenweave": "tokenweave"}
SPD_OPTIONS = ("plan", "blocks")
STEPS = {"prefill": "prefill_ms", "decode step": "decode_ms_per_token", "end to end": "e2e_ms"}
SYSTEM = ["setting", "model", "device_profile", "interconnect"]


def parts(strategy: str, options: dict | None) -> list[tuple[str, dict]]:
    """A composite's parts at its plan: (``spd``, the SPD options), (the schedule, the other options)."""
    options = options or {}
    return [
        ("spd", {k: v for k, v in options.items() if k in SPD_OPTIONS}),
        (COMPOSITES[strategy], {k: v for k, v in options.items() if k not in SPD_OPTIONS}),
    ]


def comparisons(lat: pd.DataFrame) -> pd.DataFrame:
    """One row per (composite row, part, step) whose part row exists: both medians and, where the rows
    have them, whether their p10-p90 spreads overlap. ``lat``: ``analysis.latency_table``'s frame."""
    out = []
    for _, g in lat.groupby("scenario", sort=False):
        for r in g[g.strategy.isin(list(COMPOSITES))].itertuples():
            for name, options in parts(r.strategy, r.strategy_options):
                same = g[(g.strategy == name) & g.strategy_options.map(lambda o: (o or {}) == options)]
                if same.empty:
                    continue
                part = same.iloc[0]
                for step, stat in STEPS.items():
                    ours, theirs = getattr(r, f"{stat}_median"), part[f"{stat}_median"]
                    if missing(ours) or missing(theirs):
                        continue
                    out.append(
                        {
                            **{c: getattr(r, c) for c in [*SYSTEM, "tp", *SCENARIO]},
                            "composite": r.strategy,
                            "options": r.options,
                            "step": step,
                            "composite_ms": ours,
                            "part": name,
                            "part_options": part["options"],
                            "part_ms": theirs,
                            "within_spread": _overlap(r._asdict(), part, stat),
                        }
                    )
    return pd.DataFrame(out)


def _overlap(ours: dict, theirs, stat: str) -> bool:
    """Whether the two rows' p10-p90 spreads of ``stat`` overlap (False where a row has no spread)."""
    low, high = f"{stat}_p10", f"{stat}_p90"
    values = [ours.get(low), ours.get(high), theirs.get(low), theirs.get(high)]
    if any(missing(v) for v in values):
        return False
    return values[0] <= values[3] and values[2] <= values[1]


def slower(lat: pd.DataFrame) -> list[dict]:
    """Per system (how the rows were obtained, model, device and interconnect profiles): the comparisons
    where a composite is slower than a part, as a table, with how many comparisons there were."""
    found = comparisons(lat[lat.setting != "cpu"]) if not lat.empty else pd.DataFrame()
    if found.empty:
        return []
    out = []
    for key, g in found.groupby(SYSTEM, sort=True, dropna=False):
        varying = [c for c in SCENARIO if g[c].map(str).nunique() > 1]
        fixed = [
            f"{SCENARIO_LABELS[c]} {g[c].iloc[0]}" for c in SCENARIO if c not in varying and not missing(g[c].iloc[0])
        ]
        setting, model, device_profile, link = key
        system = " + ".join(str(p) for p in (device_profile, link) if not missing(p))
        worse = g[g.composite_ms > g.part_ms]
        rows = []
        for r in worse.itertuples():
            cell = ", ".join([f"N={r.tp}", *(f"{SCENARIO_LABELS[c]} {getattr(r, c)}" for c in varying)])
            by = f"+{100 * (r.composite_ms / r.part_ms - 1):.2f}%" + (
                " (within the p10-p90 spread)" if r.within_spread else ""
            )
            rows.append(
                [
                    cell,
                    r.composite,
                    r.options,
                    r.step,
                    f"{r.composite_ms:.2f}",
                    r.part + (f" ({r.part_options})" if r.part_options else ""),
                    f"{r.part_ms:.2f}",
                    by,
                ]
            )
        out.append(
            {
                "title": f"{model}, {SETTINGS[setting]}"
                + (f" on {system}" if system else "")
                + (": " + ", ".join(fixed) if fixed else ""),
                "slower": len(worse),
                "compared": len(g),
                "header": [
                    "cell",
                    "composite",
                    "options",
                    "step",
                    "composite (ms)",
                    "part",
                    "part (ms)",
                    "composite slower by",
                ],
                "rows": rows,
            }
        )
    return out
