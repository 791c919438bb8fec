"""The statistics of the report and of the CI gate (``reports/gate.py``), per scenario (model,
provenance, profiles, N, batch, prompt, dtype, kernel mode, ...):

    speedup     = t_baseline / t_strategy
    bound share = (t_baseline - t_strategy) / (t_baseline - t_nocomm)   # 100%: the no-comm bound
                  n/a where the gap t_baseline - t_nocomm is within the baseline's p10-p90 spread or
                  under BOUND_MIN_GAP of t_baseline: a ratio is not computed from noise
    d accuracy  = mean over tasks of (acc_strategy - acc_baseline), in percentage points (pp)
    its s.e.    = sqrt(sum over tasks of (se_strategy^2 + se_baseline^2)) / tasks

The standard errors are lm-eval's per task; treating strategy and baseline as independent samples
is conservative (both score the same documents). A change under two standard errors is "within
noise".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd

from reports.cells import BOUND, GROUP, REFERENCE, SCENARIO, plain
from reports.cells import missing as _missing
from reports.frames import row_keys

ACCURACY_CONFIG = ["strategy", "options", "tp", "spd_variant", "spd_blocks_pct"]  # one row of the accuracy table
NOISE_SE = 2  # a change under this many standard errors is within noise
# A share of the no-communication bound needs a bound: a baseline-nocomm gap under this fraction of the
# baseline's time (or within the baseline's p10-p90 spread) resolves no share. Under 10%, the share multiplies
# any error of either time (a simulation's model error, a measurement's spread) more than tenfold.
BOUND_MIN_GAP = 0.10


class Change(NamedTuple):
    """A mean accuracy change vs the baseline, in percentage points, and its standard error."""

    delta_pp: float
    tasks: int
    se_pp: float

    def text(self) -> str:
        tasks = f"{self.tasks} task{'s' if self.tasks != 1 else ''}"
        if _missing(self.se_pp):
            return f"{self.delta_pp:+.1f} pp ({tasks}; no standard error recorded)"
        noise = "; within noise" if abs(self.delta_pp) < NOISE_SE * self.se_pp else ""
        return f"{self.delta_pp:+.1f} ± {self.se_pp:.1f} pp ({tasks}{noise})"


def latency_setting(lat: pd.DataFrame) -> pd.Series:
    """simulated | gpu | projected | cpu: how each latency row was obtained."""
    measured = lat.provenance == "measured"
    return lat.provenance.where(~measured, lat.device.map(lambda d: "cpu" if d == "cpu" else "gpu"))


def latency_table(lat: pd.DataFrame, acc_delta: dict) -> pd.DataFrame:
    """Latency rows with speedup, share of the no-communication bound and accuracy change."""
    lat = lat.copy()
    lat["setting"] = latency_setting(lat)
    lat["scenario"] = row_keys(lat, GROUP)
    for phase, stat in [("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")]:
        for col in (f"{stat}_median", f"{stat}_p10", f"{stat}_p90"):
            lat[col] = pd.to_numeric(lat[col], errors="coerce") if col in lat else float("nan")
        t, is_base = lat[f"{stat}_median"], lat.strategy == REFERENCE
        base = lat.scenario.map(t[is_base].groupby(lat.scenario).median())
        low = lat.scenario.map(t[lat.strategy == BOUND].groupby(lat.scenario).median())
        noise = lat.scenario.map((lat[f"{stat}_p90"] - lat[f"{stat}_p10"])[is_base].groupby(lat.scenario).median())
        lat[f"{phase}_speedup"] = base / t
        lat[f"{phase}_bound_share"] = (base - t) / (base - low)
        gap = base - low
        lat[f"{phase}_bound_unresolved"] = [bound_unresolved(g, b, n) for g, b, n in zip(gap, base, noise)]
        lat[f"{phase}_has_base"], lat[f"{phase}_has_bound"] = base.notna(), low.notna()
    lat["acc_delta"] = [acc_delta.get((r.model, r.strategy, r.options, r.tp)) for r in lat.itertuples()]
    order = {REFERENCE: 0, BOUND: 2}
    lat["order"] = lat.strategy.map(lambda s: order.get(s, 1))
    return lat.sort_values(
        ["order", "strategy", "options", "tp", *SCENARIO],
        key=lambda c: c if pd.api.types.is_numeric_dtype(c) else c.map(str),
    )


def bound_unresolved(gap: float, base: float, noise: float) -> str | None:
    """Why the baseline-nocomm ``gap`` resolves no share of the bound (None: it does). ``noise``: the
    baseline's p10-p90 spread."""
    if _missing(gap) or _missing(base):
        return None  # a missing row, said elsewhere
    if not _missing(noise) and gap <= noise:
        return "noise"
    if gap < BOUND_MIN_GAP * base:
        return (
            f"nocomm within {100 * BOUND_MIN_GAP:.0f}% of the baseline ({gap:.3g} of {base:.3g} ms): no bound to share"
        )
    return None


def headline_accuracy(acc: pd.DataFrame) -> pd.DataFrame:
    """One accuracy number per task: acc_norm where the task has it, else acc."""
    acc = acc[acc["metric"].astype(str).str.startswith("acc")].copy()
    acc["norm"] = acc["metric"] == "acc_norm"
    acc["variant_key"] = row_keys(acc, ["model", *ACCURACY_CONFIG])
    has_norm = acc.groupby(["variant_key", "task"])["norm"].transform("any")
    return acc[acc.norm == has_norm]


def _root_sum_squares(values: pd.Series) -> float:
    """sqrt(sum of squares); NaN when any term is missing (an unknown error is not zero)."""
    return math.sqrt((values**2).sum()) if values.notna().all() else float("nan")


def _summarise(g: pd.DataFrame) -> pd.Series:
    """One configuration's tasks -> mean accuracy and mean change, each with its standard error."""
    compared = g[g["delta_pp"].notna()]
    n = len(compared)
    return pd.Series(
        {
            "mean": g["value"].mean(),
            "mean_se": _root_sum_squares(g["stderr"]) / len(g),
            "delta_pp": compared["delta_pp"].mean() if n else float("nan"),
            "delta_se_pp": _root_sum_squares(compared["delta_se_pp"]) / n if n else float("nan"),
            "tasks": g["task"].nunique(),
            "compared": n,
        }
    )


def accuracy_deltas(acc: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per accuracy configuration: mean accuracy and change vs baseline (pp), with standard errors;
    a lookup by latency identity -> ``Change``.

    The baseline is exact, so its accuracy does not depend on N: the baseline at the same N is
    the reference, else the baseline at any N."""
    if acc.empty:
        return acc, {}
    acc = headline_accuracy(acc).assign(
        limit_key=lambda d: d["limit"].map(plain),  # None/NaN: all documents
        stderr=lambda d: pd.to_numeric(d["stderr"], errors="coerce"),
    )
    base = acc[acc.strategy == REFERENCE]
    same_n = base.groupby(["model", "tp", "task", "limit_key"])[["value", "stderr"]].mean()
    any_n = base.groupby(["model", "task", "limit_key"])[["value", "stderr"]].mean()

    def reference(r) -> tuple[float, float]:
        for table, key in ((same_n, (r.model, r.tp, r.task, r.limit_key)), (any_n, (r.model, r.task, r.limit_key))):
            if key in table.index:
                return tuple(table.loc[key])
        return float("nan"), float("nan")

    refs = [reference(r) for r in acc.itertuples()]
    acc["delta_pp"] = [100 * (v - ref) for v, (ref, _) in zip(acc["value"], refs)]
    acc["delta_se_pp"] = [100 * math.hypot(se, ref_se) for se, (_, ref_se) in zip(acc["stderr"], refs)]
    summary = (
        acc.groupby(["model", *ACCURACY_CONFIG], dropna=False)[["value", "stderr", "delta_pp", "delta_se_pp", "task"]]
        .apply(_summarise)
        .reset_index()
    )
    lookup = {}
    for r in summary.itertuples():
        if r.compared:
            lookup.setdefault(
                (r.model, r.strategy, r.options, r.tp), Change(r.delta_pp, int(r.compared), r.delta_se_pp)
            )
    return summary, lookup
