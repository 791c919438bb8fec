"""Seaborn figures of the report, each returned as a base64 PNG (or the reason it is missing)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PHASES = {"prefill_ms_median": "prefill (ms)", "decode_ms_per_token_median": "decode (ms/token)"}
SPEEDUPS = {"prefill_speedup": "prefill speedup", "decode_speedup": "decode speedup"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(title: str, caption: str, fig) -> dict:
    return {"title": title, "caption": caption, "png": _png(fig)}


def _missing(title: str, reason: str) -> dict:
    return {"title": title, "missing": reason}


def _label(df: pd.DataFrame) -> pd.Series:
    """The strategy, with its options only where it ran with several option sets at one N."""
    several = df.groupby(["strategy", "tp"])["options"].nunique().groupby("strategy").max() > 1
    opts = df["options"].fillna("").map(lambda o: f" ({o[:40]}{'...' if len(o) > 40 else ''})" if o else "")
    return df["strategy"].map(str) + opts.where(df["strategy"].map(several).fillna(False).astype(bool), "")


def _palette(lat: pd.DataFrame) -> dict:
    """One colour per strategy label in every figure: baseline first, the no-communication bound last."""
    labels = _label(lat)
    rank = lat.strategy.map({"baseline": 0, "nocomm": 2}).fillna(1)
    ordered = list(dict.fromkeys(labels.iloc[sorted(range(len(lat)), key=lambda i: (rank.iloc[i], labels.iloc[i]))]))
    return dict(zip(ordered, sns.color_palette("deep", len(ordered))))


def _setting(df: pd.DataFrame) -> pd.Series:
    """Model, provenance and interconnect (projected rows name theirs), and the scenario where it varies."""
    link = df["interconnect"].fillna("").map(str)
    setting = df["model"].map(str) + " | " + df["provenance"].map(str).where(
        df["provenance"] == "measured", "projected " + link)
    scenario = ("batch " + df["batch"].map(str) + ", prompt " + df["prompt_len"].map(str) + ", "
                + df["decode_mode"].map(str))
    varies = scenario.groupby(setting).transform("nunique") > 1
    return setting + (" | " + scenario).where(varies, "")


def latency_vs_n(lat: pd.DataFrame) -> dict:
    title = "Latency vs N per strategy"
    if lat.empty:
        return _missing(title, "no latency rows in the results")
    df = lat.assign(strategy_label=_label(lat), setting=_setting(lat)).melt(
        id_vars=["strategy_label", "setting", "tp"], value_vars=list(PHASES), var_name="phase", value_name="ms")
    df = df.dropna(subset=["ms"]).assign(phase=lambda d: d.phase.map(PHASES))
    g = sns.relplot(df, x="tp", y="ms", hue="strategy_label", palette=_palette(lat), col="phase", row="setting",
                    kind="line",
                    marker="o", errorbar=None, height=3, aspect=1.9, facet_kws={"sharey": False, "sharex": False})
    for (setting, _), ax in g.axes_dict.items():
        ax.set_xticks(sorted(df[df.setting == setting].tp.unique()))
    g.set_titles("{row_name}\n{col_name}", size=9).set_axis_labels("N (tensor-parallel ranks)", "median latency")
    g.legend.set_title("strategy")
    return _figure(title, "median prefill latency and decode time per token; lower is better", g.figure)


def speedup_bars(lat: pd.DataFrame) -> dict:
    title = "Speedup over baseline"
    if lat.empty:
        return _missing(title, "no latency rows in the results")
    df = lat[lat.strategy != "baseline"].assign(strategy_label=_label(lat), setting=_setting(lat))
    df = df.melt(id_vars=["strategy_label", "setting", "tp"], value_vars=list(SPEEDUPS), var_name="phase",
                 value_name="speedup").dropna(subset=["speedup"]).assign(phase=lambda d: d.phase.map(SPEEDUPS))
    if df.empty:
        return _missing(title, "no scenario has both a baseline row and another strategy")
    palette = _palette(lat)
    g = sns.catplot(df, x="tp", y="speedup", hue="strategy_label", palette=palette,
                    hue_order=[k for k in palette if k in set(df.strategy_label)], col="phase", row="setting",
                    kind="bar", errorbar=None,
                    height=3, aspect=1.9, sharey=False, sharex=False)
    g.refline(y=1, color="grey", linestyle="--")
    g.set_titles("{row_name}\n{col_name}", size=9).set_axis_labels("N (tensor-parallel ranks)", "t_baseline / t")
    g.legend.set_title("strategy")
    return _figure(title, "above the dashed line is faster than the baseline; nocomm is the no-communication "
                          "bound (not a usable model)", g.figure)


def pareto(lat: pd.DataFrame) -> dict:
    title = "Pareto: speedup vs accuracy drop"
    if lat.empty or "acc_delta" not in lat:
        return _missing(title, "needs latency rows and accuracy rows of the same strategies")
    usable = lat[lat.usable_model.astype(bool)]
    df = usable.assign(drop=[0.0 if s == "baseline" else (-d[0] if d else None)
                             for s, d in zip(usable.strategy, usable.acc_delta)],
                       strategy_label=_label(usable), setting=_setting(usable))
    df = df.dropna(subset=["drop", "decode_speedup"])
    if df[df.strategy != "baseline"].empty:
        return _missing(title, "no usable strategy besides the baseline has both latency and accuracy rows")
    settings = sorted(s for s, d in df.groupby("setting") if (d.strategy != "baseline").any())
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        d = df[df.setting == setting]
        sns.scatterplot(d, x="drop", y="decode_speedup", hue="strategy_label", palette=_palette(lat), s=80, ax=ax)
        front = d.sort_values(["drop", "decode_speedup"], ascending=[True, False])
        front = front[front.decode_speedup >= front.decode_speedup.cummax()]
        ax.step(front["drop"], front.decode_speedup, where="post", color="grey", linewidth=1, label="Pareto front")
        for r in d.itertuples():
            ax.annotate(f"{r.strategy} N={r.tp}", (r.drop, r.decode_speedup), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(title=setting, xlabel="accuracy drop vs baseline (pp)", ylabel="decode speedup over baseline")
        ax.title.set_size(9)
        ax.legend(fontsize=7, title="strategy", title_fontsize=8)
    return _figure(title, "up and to the left is better; the grey step line is the Pareto front", fig)


def power_timelines(lat: pd.DataFrame) -> dict:
    title = "Power over time"
    if lat.empty or "telemetry" not in lat:
        return _missing(title, "no latency rows with telemetry")
    samples = [{"model": r.model, "run": f"{r.strategy} N={r.tp}", "s": s, "W": w}
               for r in lat.itertuples() if isinstance(r.telemetry, dict)
               for s, w in r.telemetry.get("timeline") or []]
    if not samples:
        return _missing(title, "no telemetry timeline was measured (CPU runs have no power readings)")
    g = sns.relplot(pd.DataFrame(samples), x="s", y="W", hue="run", col="model", kind="line", errorbar=None, height=3,
                    aspect=1.6, facet_kws={"sharex": False})
    g.set_titles("{col_name}", size=9).set_axis_labels("seconds", "total GPU power (W)")
    return _figure(title, "power samples during the measured runs", g.figure)


def all_figures(lat: pd.DataFrame) -> list[dict]:
    """The latency figures (the SPD figures are in ``reports.spd``)."""
    sns.set_theme(style="whitegrid", context="notebook")
    return [latency_vs_n(lat), speedup_bars(lat), pareto(lat), power_timelines(lat)]
