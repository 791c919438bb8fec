"""Seaborn figures of the report, each returned as a base64 PNG (or the reason it is missing and,
where a command fills it, that command).

The latency figures get simulated, GPU-measured and projected rows only (CPU rows do not rank
strategies). Panels that compare share their axes; latency axes are logarithmic (prefill and
decode, a 135M and a 70B model span decades).
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from suite.vocabulary import SPD_VARIANTS  # noqa: E402

VARIANTS = {v: v.upper() for v in SPD_VARIANTS}  # SPD plan variants and their labels
PHASES = {"prefill_ms_median": "prefill (ms)", "decode_ms_per_token_median": "decode (ms/token)"}
SPEEDUPS = {"prefill_speedup": "prefill speedup", "decode_speedup": "decode speedup"}


def png(fig, dpi: int = 90) -> str:
    """A matplotlib figure as a base64 PNG; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figure(title: str, caption: str, fig) -> dict:
    return {"title": title, "caption": caption, "png": png(fig)}


def missing_figure(title: str, reason: str, fill: str | None = None) -> dict:
    return {"title": title, "missing": reason, "fill": fill}


NO_LATENCY = "no simulated, GPU-measured or projected latency rows in the results (CPU rows do not rank strategies)"
FILL_LATENCY = "spdbench run"  # its simulated step; or spdbench bench with mode: simulated
FILL_GPU = "spdbench bench --config configs/gpu-ladder.yaml --out out/gpu-ladder (on a machine with GPUs)"
FILL_ACCURACY = "spdbench eval --model MODEL --tp N --strategy STRATEGY --tasks piqa,arc_easy --out accuracy.jsonl"


def _label(df: pd.DataFrame) -> pd.Series:
    """The strategy, with its options only where it ran with several option sets in one panel at one N
    (an SPD plan per N is one line; the tables name the options)."""
    several = (
        df.assign(setting=_setting(df))
        .groupby(["strategy", "setting", "tp"])["options"]
        .nunique()
        .groupby("strategy")
        .max()
        > 1
    )
    opts = df["options"].fillna("").map(lambda o: f" ({o[:40]}{'...' if len(o) > 40 else ''})" if o else "")
    return df["strategy"].map(str) + opts.where(df["strategy"].map(several).fillna(False).astype(bool), "")


def _palette(lat: pd.DataFrame) -> dict:
    """One colour per strategy label in every figure: baseline first, the no-communication bound last."""
    labels = _label(lat)
    rank = lat.strategy.map({"baseline": 0, "nocomm": 2}).fillna(1)
    ordered = list(dict.fromkeys(labels.iloc[sorted(range(len(lat)), key=lambda i: (rank.iloc[i], labels.iloc[i]))]))
    return dict(zip(ordered, sns.color_palette("deep" if len(ordered) <= 10 else "husl", len(ordered))))  # distinct


def _how(df: pd.DataFrame) -> pd.Series:
    """How each latency row was obtained, profiles named: 'simulated h100-sxm + h100-nvswitch', 'measured (cuda)'."""

    def how(r) -> str:
        if r.provenance == "simulated":
            return f"simulated {r.device_profile} + {r.interconnect}"
        if r.provenance == "projected":
            return f"projected {r.interconnect}"
        return f"{r.provenance} ({r.device})"

    return pd.Series([how(r) for r in df.itertuples()], index=df.index, dtype=object)


def _setting(df: pd.DataFrame) -> pd.Series:
    """Model and how its rows were obtained (profiles named), and the scenario where it varies."""
    setting = df["model"].map(str) + " | " + _how(df)
    scenario = (
        "batch " + df["batch"].map(str) + ", prompt " + df["prompt_len"].map(str) + ", " + df["decode_mode"].map(str)
    )
    varies = scenario.groupby(setting).transform("nunique") > 1
    return setting + ("\n" + scenario).where(varies, "")


def _log_if_decades(ax, values) -> None:
    """A logarithmic y axis where the values span more than a decade."""
    values = [v for v in values if v > 0]
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")


def latency_vs_n(lat: pd.DataFrame) -> dict:
    title = "Latency vs N per strategy"
    if lat.empty:
        return missing_figure(title, NO_LATENCY, FILL_LATENCY)
    df = lat.assign(strategy_label=_label(lat), setting=_setting(lat)).melt(
        id_vars=["strategy_label", "setting", "model", "tp"], value_vars=list(PHASES), var_name="phase", value_name="ms"
    )
    df = df.dropna(subset=["ms"]).assign(phase=lambda d: d.phase.map(PHASES))
    if df.empty:
        return missing_figure(title, "the latency rows have no timings")
    g = sns.relplot(
        df,
        x="tp",
        y="ms",
        hue="strategy_label",
        palette=_palette(lat),
        col="phase",
        row="setting",
        kind="line",
        marker="o",
        errorbar=None,
        height=3,
        aspect=1.9,
        facet_kws={"sharey": False, "sharex": False},
    )
    for (model, phase), d in df.groupby(["model", "phase"]):  # panels that compare: one model, one phase
        axes = [ax for (setting, col), ax in g.axes_dict.items() if col == phase and setting in set(d.setting)]
        low, high = d.ms.min(), d.ms.max()
        for ax in axes:
            ax.set_ylim(low / 1.15, high * 1.15)
            _log_if_decades(ax, d.ms)
    for (setting, _), ax in g.axes_dict.items():
        ax.set_xticks(sorted(df[df.setting == setting].tp.unique()))
    g.set_titles("{row_name}\n{col_name}", size=9).set_axis_labels("N (tensor-parallel ranks)", "median latency")
    g.legend.set_title("strategy")
    return figure(
        title,
        "median prefill latency and decode time per token; panels of one model and phase share "
        "their scale (logarithmic where the values span decades); lower is better",
        g.figure,
    )


def speedup_bars(lat: pd.DataFrame) -> dict:
    title = "Speedup over baseline"
    if lat.empty:
        return missing_figure(title, NO_LATENCY, FILL_LATENCY)
    df = lat[lat.strategy != "baseline"].assign(strategy_label=_label(lat), setting=_setting(lat))
    df = (
        df.melt(
            id_vars=["strategy_label", "setting", "tp"],
            value_vars=list(SPEEDUPS),
            var_name="phase",
            value_name="speedup",
        )
        .dropna(subset=["speedup"])
        .assign(phase=lambda d: d.phase.map(SPEEDUPS))
    )
    if df.empty:
        return missing_figure(
            title,
            "no scenario has both a baseline row and another strategy",
            "add baseline to the strategies of the latency matrix and re-run it",
        )
    palette = _palette(lat)
    g = sns.catplot(
        df,
        x="tp",
        y="speedup",
        hue="strategy_label",
        palette=palette,
        hue_order=[k for k in palette if k in set(df.strategy_label)],
        col="phase",
        row="setting",
        kind="bar",
        errorbar=None,
        height=3,
        aspect=1.9,
        sharey="row",
        sharex=False,
    )
    g.refline(y=1, color="grey", linestyle="--")
    g.set_titles("{row_name}\n{col_name}", size=9).set_axis_labels("N (tensor-parallel ranks)", "t_baseline / t")
    g.legend.set_title("strategy")
    return figure(
        title,
        "prefill and decode of one setting share their scale; above the dashed line is faster than "
        "the baseline; nocomm is the no-communication bound (not a usable model)",
        g.figure,
    )


MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _n_markers(tps) -> dict:
    return {tp: MARKERS[i % len(MARKERS)] for i, tp in enumerate(sorted(set(tps)))}


def _front(x: pd.Series, y: pd.Series) -> list[tuple[float, float]]:
    """The points no other point beats on both x and y (higher is better on both), by falling x."""
    front, best = [], -math.inf
    for xi, yi in sorted(zip(x, y), key=lambda p: (-p[0], -p[1])):
        if yi > best:
            front.append((xi, yi))
            best = yi
    return front


def pareto(lat: pd.DataFrame) -> dict:
    title = "Pareto: decode speedup vs accuracy change"
    if lat.empty or "acc_delta" not in lat:
        return missing_figure(title, NO_LATENCY, FILL_LATENCY)
    usable = lat[lat.usable_model.astype(bool) & (lat.strategy != "baseline")]
    usable = usable[usable.acc_delta.notna() & usable.decode_speedup.notna()]
    if usable.empty:
        return missing_figure(
            title,
            "no usable strategy besides the baseline has both latency rows (simulated, GPU-measured "
            "or projected) and accuracy rows at the same N",
            FILL_ACCURACY,
        )
    df = usable.assign(
        strategy_label=_label(lat),
        setting=_setting(usable),
        N=usable.tp,  # labels as in the palette
        change=[c.delta_pp for c in usable.acc_delta],
        bar=[2 * c.se_pp for c in usable.acc_delta],
    )
    settings = sorted(df.setting.unique())
    palette, markers = _palette(lat), _n_markers(df.N)
    fig, axes = plt.subplots(
        1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False, sharex=True, sharey=True
    )
    for ax, setting in zip(axes[0], settings):
        d = df[df.setting == setting]
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.axhline(1, color="grey", linewidth=0.8)
        for r in d.itertuples():
            ax.errorbar(
                r.change,
                r.decode_speedup,
                xerr=None if math.isnan(r.bar) else r.bar,
                fmt="none",
                ecolor=palette[r.strategy_label],
                elinewidth=1,
                capsize=3,
                alpha=0.7,
            )
        sns.scatterplot(
            d.drop(columns="strategy").rename(columns={"strategy_label": "strategy"}),
            x="change",
            y="decode_speedup",
            hue="strategy",
            style="N",
            palette=palette,
            markers=markers,
            hue_order=[k for k in palette if k in set(d.strategy_label)],
            s=70,
            ax=ax,
            legend=ax is axes[0][-1],
        )
        ax.scatter([0], [1], marker="*", s=160, color="black", zorder=3, label="baseline (reference)")
        front = _front(pd.concat([d.change, pd.Series([0.0])]), pd.concat([d.decode_speedup, pd.Series([1.0])]))
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="grey", linewidth=1, linestyle=":")
        ax.set(
            title=setting, xlabel="accuracy change vs baseline (pp, ± 2 s.e.)", ylabel="decode speedup over baseline"
        )
        ax.title.set_size(9)
    axes[0][-1].legend(fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return figure(
        title,
        "up and to the right is better; the star is the baseline; bars span ± 2 standard errors "
        "of the accuracy change (a bar that crosses 0 is within noise); marker shape: N; dotted: "
        "the Pareto front",
        fig,
    )


def accuracy_change(acc: pd.DataFrame) -> dict:
    """Mean accuracy change vs the baseline per configuration and N, with ± 2 standard errors."""
    title = "Accuracy change vs baseline"
    if acc.empty or "delta_pp" not in acc:
        return missing_figure(title, "no accuracy rows in the results", FILL_ACCURACY)
    df = acc[(acc.strategy != "baseline") & (acc.strategy != "nocomm") & acc.delta_pp.notna()]
    if df.empty:
        return missing_figure(
            title, "no usable strategy besides the baseline has accuracy rows with a baseline to compare", FILL_ACCURACY
        )
    pct = df.spd_blocks_pct.map(lambda v: "" if pd.isna(v) else f" {v:.0f}%")
    variant = df.spd_variant.map(lambda v: "" if pd.isna(v) else f" {VARIANTS.get(v, v)}")
    df = df.assign(config=df.strategy + variant + pct, N=df.tp)
    several = df.groupby(["model", "config", "N"])["options"].transform("nunique") > 1  # e.g. two plans of one budget
    df["config"] = df.config + df.options.map(lambda o: f" ({o})").where(several, "")
    models = sorted(df.model.unique())
    fig, axes = plt.subplots(
        1,
        len(models),
        figsize=(max(5.5, 0.45 * df.config.nunique() + 2.5) * len(models), 4),
        squeeze=False,
        sharey=True,
    )
    markers, ns = _n_markers(df.N), sorted(df.N.unique())
    colours = dict(zip(ns, sns.color_palette("colorblind", len(ns))))
    for ax, model in zip(axes[0], models):
        d = df[df.model == model]
        configs = list(dict.fromkeys(d.sort_values(["strategy", "spd_variant", "spd_blocks_pct"]).config))
        width = 0.6 / max(len(ns), 1)
        for i, n in enumerate(ns):
            dn = d[d.N == n]
            x = [configs.index(c) + (i - (len(ns) - 1) / 2) * width for c in dn.config]
            ax.errorbar(
                x, dn.delta_pp, yerr=2 * dn.delta_se_pp, fmt=markers[n], color=colours[n], capsize=3, label=f"N={n}"
            )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right", fontsize=8)
        ax.set(title=model, ylabel="mean accuracy change (pp, ± 2 s.e.)")
        ax.title.set_size(9)
        ax.legend(fontsize=7)
    return figure(
        title,
        "mean over the evaluated tasks (acc_norm where a task has it); bars span ± 2 standard "
        "errors: a bar that crosses 0 is within noise; nocomm (not a usable model) is left out",
        fig,
    )


def power_timelines(lat: pd.DataFrame) -> dict:
    title = "Power over time"
    if lat.empty or "telemetry" not in lat:
        return missing_figure(title, "no latency rows with telemetry", FILL_GPU)
    samples = [
        {"model": r.model, "run": f"{r.strategy} N={r.tp}", "s": s, "W": w}
        for r in lat.itertuples()
        if isinstance(r.telemetry, dict)
        for s, w in r.telemetry.get("timeline") or []
    ]
    if not samples:
        return missing_figure(
            title,
            "no telemetry timeline was measured (only GPUs have power readings; simulated and "
            "projected rows have none)",
            FILL_GPU,
        )
    g = sns.relplot(
        pd.DataFrame(samples),
        x="s",
        y="W",
        hue="run",
        col="model",
        kind="line",
        errorbar=None,
        height=3,
        aspect=1.6,
        facet_kws={"sharex": False},
    )
    g.set_titles("{col_name}", size=9).set_axis_labels("seconds", "total GPU power (W)")
    return figure(title, "power samples during the measured runs", g.figure)


def all_figures(lat: pd.DataFrame, acc: pd.DataFrame) -> list[dict]:
    """The latency and accuracy-change figures (the SPD figures are in ``reports.spd``); ``lat`` holds the
    latency rows that rank strategies (no CPU rows), ``acc`` the accuracy summary."""
    sns.set_theme(style="whitegrid", context="notebook")
    return [latency_vs_n(lat), speedup_bars(lat), pareto(lat), accuracy_change(acc), power_timelines(lat)]


def headlines(scenarios: list[dict]) -> list[str]:
    """Per summary scenario: its usable strategies' end-to-end speedups as bars (hatched: not exact), as PNG."""
    pngs = []
    for s in scenarios:
        data = s["figure_data"]
        if not data:
            pngs.append("")
            continue
        fig, ax = plt.subplots(figsize=(4.2, 0.28 * len(data) + 0.8))
        names = [name for name, _, _ in data][::-1]
        values = [value for _, value, _ in data][::-1]
        bars = ax.barh(names, values, color=["#4c72b0" if exact else "#dd8452" for *_, exact in data][::-1])
        for bar, (_, _, exact) in zip(bars, data[::-1]):
            bar.set_hatch("" if exact else "//")
        ax.axvline(1, color="grey", linewidth=0.8)
        ax.set_xlabel("end-to-end speedup over baseline (blue: exact; hatched: changes the model)", fontsize=7)
        ax.tick_params(labelsize=7)
        pngs.append(png(fig))
    return pngs
