"""The SPD parts of the report: the paper's accuracy figure, perplexity and per-block sensitivity
figures, and the stability of the sensitivity analysis. Reads result rows; never imports torch.

Accuracy vs % of SPD blocks is drawn as the SPD paper draws it: the mean zero-shot accuracy over
the evaluated tasks against the share of SPD blocks, one line per variant (ZS, ZS+B2B,
ZS+B2B+HG), with the No-SPD model as a dashed reference. A 0% budget is the same model for every
variant, so its point starts every line. Error bars are the standard error of the mean over
tasks, sqrt(sum_t se_t^2) / T, from lm-eval's per-task standard errors.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib import ticker

from reports.figures import VARIANTS, figure, missing_figure

SWEEP = "spdbench spd sweep --model MODEL --tp N --sensitivity sensitivity.json --out sweep --results spd.jsonl"
FILL_SENSITIVITY = "spdbench spd sensitivity --model MODEL --tp N --out sensitivity.json --results spd.jsonl"
DODGE = 1.2  # % of blocks between the variants' points at one budget
STABILITY_COLUMNS = {
    "model": "model",
    "tp": "N",
    "samples": "windows",
    "seq_len": "tokens per window",
    "resamples": "bootstrap resamples",
    "budget_pct": "budget %",
    "rank_corr_mean": "block-order rank corr. (mean)",
    "rank_corr_p05": "rank corr. (p05)",
    "set_agreement_mean": "chosen-set agreement (mean)",
    "set_agreement_p05": "set agreement (p05)",
    "class_agreement_mean": "class agreement (mean)",
    "class_agreement_p05": "class agreement (p05)",
}


def _variants(present) -> list[str]:
    """The paper's variants in its order, then any others."""
    known = list(VARIANTS)
    return sorted(set(present), key=lambda v: (known.index(v) if v in known else len(known), str(v)))


def _panels(df: pd.DataFrame, extra: str = "") -> pd.Series:
    """Model | N=tp | ``extra``: one panel of a figure."""
    return df.model.map(str) + " | N=" + df.tp.map(str) + (" | " + df[extra].map(str) if extra else "")


def _grid(panels: list[str], models: list[str], width: float = 4.6, height: float = 3.4):
    """One row of panels per model (panels in a row share the y axis: they compare)."""
    rows = [[p for p in panels if p.split(" | ")[0] == m] for m in models]
    cols = max(map(len, rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(width * cols, height * len(rows)), squeeze=False, sharey="row")
    placed = {}
    for r, row in enumerate(rows):
        for c in range(cols):
            if c < len(row):
                placed[row[c]] = axes[r][c]
            else:
                axes[r][c].set_visible(False)
    return fig, placed


def _label(ax, title: str, ylabel: str, xlabel: str = "% of blocks with SPD", legend: bool = False) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, size=9)
    if legend:
        ax.legend(fontsize=7, title="SPD variant", title_fontsize=8)


def _with_zero_for_every_variant(df: pd.DataFrame, budget: str) -> pd.DataFrame:
    """A 0% budget is one model (no SPD block): its point belongs to every variant's line."""
    zero, rest = df[df[budget] == 0], df[df[budget] != 0]
    variants = _variants(df.spd_variant.dropna())
    return pd.concat([rest, *[zero.assign(spd_variant=v) for v in variants]], ignore_index=True)


def _mean_over_tasks(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: mean accuracy over tasks and its standard error sqrt(sum se^2) / T."""
    per_task = df.groupby([*keys, "task"], dropna=False).agg(value=("value", "mean"), stderr=("stderr", "mean"))
    return (
        per_task.groupby(keys, dropna=False)
        .agg(
            accuracy=("value", "mean"),
            tasks=("value", "size"),
            stderr=("stderr", lambda s: math.sqrt((s**2).sum()) / len(s)),
        )
        .reset_index()
    )


def _no_spd(panel: pd.DataFrame, base: pd.DataFrame, tasks: set[str]) -> pd.DataFrame:
    """The model without SPD: the panel's 0% point, else the baseline on the same tasks and limit (any N:
    the baseline is exact)."""
    zero = panel[panel.spd_blocks_pct == 0]
    if not zero.empty:
        return zero.iloc[:1]
    ref = _mean_over_tasks(base[base.task.isin(tasks)], ["model"])
    return ref[ref.tasks == len(tasks)]


def accuracy_vs_spd(acc: pd.DataFrame) -> dict:
    """``acc``: accuracy rows with one metric per task (acc_norm where the task has it)."""
    title = "Accuracy vs % of SPD blocks"
    if acc.empty:
        return missing_figure(title, "no accuracy rows in the results", SWEEP + " --metric accuracy")
    acc = acc.assign(limit_key=acc["limit"].map(lambda v: "all" if v is None or pd.isna(v) else str(int(v))))
    spd = acc[acc.spd_blocks_pct.notna() & acc.spd_variant.notna()]
    if spd.empty:
        return missing_figure(title, "no accuracy rows with spd_blocks_pct", SWEEP + " --metric accuracy")
    spd = _with_zero_for_every_variant(spd, "spd_blocks_pct")
    setting = ["model", "tp", "limit_key"]
    points = _mean_over_tasks(spd, [*setting, "spd_variant", "spd_blocks_pct"])
    tasks = spd.groupby(setting).task.agg(set)
    complete = points.tasks == [len(tasks[k]) for k in zip(*(points[c] for c in setting))]
    left_out, points = int((~complete).sum()), points[complete]
    points = points.assign(limit="limit " + points.limit_key)
    points = points.assign(panel=_panels(points, "limit"))
    base = acc[(acc.strategy == "baseline") & acc.spd_blocks_pct.isna()]
    palette = dict(zip(VARIANTS, sns.color_palette("deep", len(VARIANTS))))
    fig, axes = _grid(sorted(points.panel.unique()), sorted(points.model.unique()))
    for panel, ax in axes.items():
        d = points[points.panel == panel]
        model, tp, limit = d.iloc[0][setting]
        variants = _variants(d.spd_variant)
        for i, variant in enumerate(variants):
            line = d[d.spd_variant == variant].sort_values("spd_blocks_pct")
            dodge = DODGE * (i - (len(variants) - 1) / 2)  # error bars side by side, not on top of each other
            ax.errorbar(
                line.spd_blocks_pct + dodge,
                100 * line.accuracy,
                yerr=100 * line.stderr,
                marker="o",
                capsize=3,
                label=VARIANTS.get(variant, variant),
                color=palette.get(variant),
            )
        ref = _no_spd(d, base[(base.model == model) & (base.limit_key == limit)], tasks[model, tp, limit])
        if not ref.empty:
            y, se = 100 * ref.accuracy.iloc[0], 100 * ref.stderr.iloc[0]
            ax.axhline(y, color="black", linestyle="--", linewidth=1, label="No-SPD")
            ax.axhspan(y - se, y + se, color="grey", alpha=0.15, linewidth=0)
        _label(ax, panel, "mean zero-shot accuracy (%)", legend=True)
    caption = (
        f"mean over {', '.join(sorted(spd.task.unique()))} (acc_norm where a task has it); error bars and "
        "the grey band: standard error of the mean over tasks; dashed: the model without SPD; the variants' "
        f"points at one budget are drawn {DODGE} points apart"
    )
    if left_out:
        caption += f"; {left_out} points left out (not every task of their panel evaluated)"
    return figure(title, caption, fig)


def ppl_vs_spd(ppl: pd.DataFrame) -> dict:
    title = "Perplexity vs % of SPD blocks"
    if ppl.empty:
        return missing_figure(title, "no spd_ppl rows in the results", SWEEP + " --metric ppl")
    df = _with_zero_for_every_variant(ppl, "budget_pct")
    df = df.assign(panel=_panels(df, "dataset"))
    fig, axes = _grid(sorted(df.panel.unique()), sorted(df.model.unique()))
    for panel, ax in axes.items():
        d = df[df.panel == panel]
        sns.lineplot(
            d,
            x="budget_pct",
            y="ppl",
            hue=d.spd_variant.map(lambda v: VARIANTS.get(v, v)),
            hue_order=[VARIANTS.get(v, v) for v in _variants(d.spd_variant)],
            marker="o",
            errorbar=None,
            ax=ax,
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        _label(ax, panel, "perplexity (log scale)", legend=True)
    return figure(title, "lower is better; the 0% budget (no SPD block) starts every line", fig)


def sensitivity(sens: pd.DataFrame) -> dict:
    title = "Per-block SPD sensitivity"
    if sens.empty:
        return missing_figure(title, "no spd_sensitivity rows in the results", FILL_SENSITIVITY)
    df = sens.assign(calibration=sens.samples.map(str) + " x " + sens.seq_len.map(str) + " tokens")
    df = df.assign(panel=_panels(df, "calibration"))
    fig, axes = _grid(sorted(df.panel.unique()), sorted(df.model.unique()), width=7, height=3.2)
    for panel, ax in axes.items():
        d = df[df.panel == panel].sort_values("block")
        low = (d.sensitivity - d.sensitivity_p05).clip(lower=0)
        high = (d.sensitivity_p95 - d.sensitivity).clip(lower=0)
        ax.bar(
            d.block,
            d.sensitivity,
            color="tab:blue",
            yerr=None if d.sensitivity_p05.isna().all() else [low.fillna(0), high.fillna(0)],
            error_kw={"elinewidth": 0.8, "capsize": 1.5},
        )
        ax.set_yscale("symlog", linthresh=max(1e-3, float(d.sensitivity.abs().median())))
        ax.axhline(0, color="grey", linewidth=0.8)
        _label(ax, panel, "PPL(SPD on i..L) - PPL(SPD on i+1..L)", xlabel="block")
    return figure(
        title,
        "blocks with low sensitivity are the first to get SPD; symmetric log scale (linear near "
        "0, so block 0 does not flatten the rest); error bars: 5th-95th percentile over "
        "bootstrap resamples of the calibration windows, where recorded",
        fig,
    )


def figures(acc: pd.DataFrame, sens: pd.DataFrame, ppl: pd.DataFrame) -> list[dict]:
    """``acc``: accuracy rows with one metric per task."""
    return [accuracy_vs_spd(acc), ppl_vs_spd(ppl), sensitivity(sens)]


def stability_table(stab: pd.DataFrame) -> pd.DataFrame:
    """The stability rows with readable column names (and their command and environment)."""
    order = stab.sort_values(["model", "tp", "samples", "seq_len", "budget_pct"])
    return order[[*STABILITY_COLUMNS, "command", "env"]].rename(columns=STABILITY_COLUMNS)
