"""``spdbench atlas``: a simulated decision map - which method wins where, and by how much.

Every strategy x model x system (device profile + interconnect) x N x batch is one simulated bench
cell (``suite/latency/bench.py``; rows resume like ``bench``). The page draws, per model and batch,
a heatmap of systems x N whose cells name the best usable method and its speedup over the baseline
(end to end, prefill, decode), with the table of every such cell beneath. Everything on it is
simulated (a virtual clock with the named device and interconnect profiles), not measured.

    best(cell, phase) = argmax over usable strategies s of t_baseline(phase) / t_s(phase)

A cell whose baseline row failed (e.g. the model does not fit on N devices) has no best method and
says why. The no-communication bound (not a usable model) never wins. Latency alone cannot say what
a method costs in accuracy, so a fourth panel keeps to the exact methods (``reports.summary.EXACT``).
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pandas as pd

from reports.cells import REFERENCE, missing
from reports.summary import EXACT
from suite.defaults import DEPLOYMENT

# name -> (device profile, interconnect, N): the shipped systems. H200 SXM uses the same NVLink 4 /
# NVSwitch fabric as H100 SXM, hence the same interconnect profile.
SYSTEMS = {
    "a100-nvlink": ("a100-sxm-80gb", "a100-nvlink", [2, 4, 8]),
    "a100-pcie-nop2p": ("a100-sxm-80gb", "pcie-nop2p", [2, 4, 8]),
    "h100-nvswitch": ("h100-sxm", "h100-nvswitch", [2, 4, 8]),
    "h100-multimem": ("h100-sxm", "h100-nvswitch-multimem", [2, 4, 8]),
    "h200-nvswitch": ("h200", "h100-nvswitch", [2, 4, 8]),
    "h100-ib-2node": ("h100-sxm", "ib-2node", [16]),
}
MODELS = ["random:llama3-8b", "random:llama3-70b", "random:llama3.1-405b"]
BATCHES = [1, 16, 64]
SPD_SHARE = 0.5  # SPD (and its composites) drop the attention sync in the last half of the blocks
SCENARIO = {**DEPLOYMENT, "mode": "simulated", "repetitions": 1, "warmup": 0}
PHASES = {
    "e2e": ("e2e_ms_median", "end to end"),
    "prefill": ("prefill_ms_median", "prefill"),
    "decode": ("decode_ms_per_token_median", "decode"),
    "e2e_exact": ("e2e_ms_median", "end to end, exact methods only"),
}


def strategy_entry(name: str, layers: int) -> dict | str:
    """SPD and its composites (``spd+...``) on the last half of the blocks; the others with their defaults."""
    if name == "spd" or name.startswith("spd+"):
        return {"name": name, "options": {"blocks": f"last:{round(SPD_SHARE * layers)}"}}
    return name


def matrix(
    models: dict[str, int],
    systems: list[str],
    tps: list[int] | None,
    batches: list[int],
    strategies: list[str],
    extra: dict,
) -> dict:
    """The bench matrix: ``models`` maps each model to its block count; ``tps`` (None: each system's
    own N) are kept where the system has them; ``extra``: further bench keys, passed through."""
    matrices = []
    for model, layers in models.items():
        for name in systems:
            device_profile, interconnect, system_tps = SYSTEMS[name]
            tp = [n for n in system_tps if tps is None or n in tps]
            if tp:
                matrices.append(
                    {
                        "model": model,
                        "device_profile": device_profile,
                        "interconnect": interconnect,
                        "tp": tp,
                        "strategies": [strategy_entry(s, layers) for s in strategies],
                    }
                )
    return {**SCENARIO, "batch": batches, **extra, "matrices": matrices}


def system_label(device_profile, interconnect) -> str:
    return f"{device_profile} + {interconnect}"


def best_cells(rows: list[dict]) -> pd.DataFrame:
    """One row per (model, batch, system, N, phase, other bench keys): the best usable strategy and its
    speedup over the baseline, or why there is none."""
    lat = pd.DataFrame([r for r in rows if r.get("kind") == "latency" and r.get("mode") == "simulated"])
    if lat.empty:
        return pd.DataFrame(columns=["model", "batch", "system", "tp", "phase", "best", "speedup", "why"])
    lat["system"] = [system_label(d, i) for d, i in zip(lat.device_profile, lat.interconnect)]
    lat["options"] = lat.strategy_options.map(lambda o: ",".join(f"{k}={v}" for k, v in sorted((o or {}).items())))
    varying = [
        k
        for k in ("prompt_len", "new_tokens", "dtype", "decode_mode", "kernels")
        if k in lat and lat[k].map(str).nunique() > 1
    ]
    out = []
    for key, g in lat.groupby(["model", "batch", "system", "tp", *varying], sort=True):
        base = g[(g.strategy == REFERENCE) & (g.status == "ok")]
        usable = g[(g.status == "ok") & g.usable_model.astype(bool) & (g.strategy != REFERENCE)]
        for phase, (column, _) in PHASES.items():
            cell = dict(
                zip(["model", "batch", "system", "tp", *varying], key),
                phase=phase,
                best=None,
                speedup=float("nan"),
                why=None,
            )
            if base.empty:
                failed = g[(g.strategy == REFERENCE) & (g.status == "failed")]
                cell["why"] = str(failed.error.iloc[0]).splitlines()[0][:120] if len(failed) else "no baseline row"
            else:
                speedups = {
                    (r.strategy, r.options): base[column].iloc[0] / r[column]
                    for _, r in usable.iterrows()
                    if not missing(r[column])
                    and r[column] > 0
                    and (not phase.endswith("_exact") or r.strategy in EXACT)
                }
                winner = max(speedups, key=speedups.get, default=None)
                if winner is None or speedups[winner] <= 1:
                    cell |= {"best": REFERENCE, "speedup": 1.0}
                else:
                    cell |= {"best": winner[0], "speedup": speedups[winner]}
            out.append(cell)
    return pd.DataFrame(out)


def heatmaps(best: pd.DataFrame) -> list[dict]:
    """Per model and batch (and any other key that varies): systems x N, one panel per phase, the best
    method and its speedup in each cell."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from reports.figures import png  # with matplotlib's Agg backend; not at module level: the CLI imports this module

    figures = []
    keys = [c for c in best.columns if c not in ("system", "tp", "phase", "best", "speedup", "why")]
    for key, g in best.groupby(keys, sort=True):
        title = ", ".join([str(key[0])] + [f"{k.replace('_', ' ')} {v}" for k, v in zip(keys[1:], key[1:])])
        fig, axes = plt.subplots(
            1, len(PHASES), figsize=(5.2 * len(PHASES), 0.5 * g.system.nunique() + 1.4), squeeze=False
        )
        top = g.speedup.max()  # one colour scale for the panels
        for ax, (phase, (_, label)) in zip(axes[0], PHASES.items()):
            d = g[g.phase == phase]
            values = d.pivot(index="system", columns="tp", values="speedup").astype(float)
            text = d.assign(text=[f"{b}\n{s:.2f}x" if b else "n/a" for b, s in zip(d.best, d.speedup)]).pivot(
                index="system", columns="tp", values="text"
            )
            sns.heatmap(
                values,
                annot=text.fillna("n/a"),
                fmt="",
                cmap="viridis",
                vmin=1.0,
                vmax=top if top > 1 else 1.01,
                cbar=ax is axes[0][-1],
                ax=ax,
                annot_kws={"fontsize": 7},
                linewidths=0.5,
                yticklabels=ax is axes[0][0],
            )
            ax.set(title=f"{label}: best, speedup over baseline", xlabel="N", ylabel="")
            ax.title.set_size(9)
        fig.suptitle(f"{title} (simulated)", fontsize=10, y=1.04)
        figures.append({"title": title, "png": png(fig, dpi=80)})
    return figures


PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>spdbench atlas (simulated)</title>
<style>body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:1600px;padding:0 1rem;color:#222}
table{border-collapse:collapse;font-size:.8rem}th,td{border:1px solid #ccc;padding:.2rem .4rem;text-align:left}
th{background:#f2f4f7}.caption{color:#555;font-size:.88rem}img{max-width:100%}td.na{color:#888;font-style:italic}
</style></head><body>
<h1>Which method wins where (simulated, not measured)</h1>
<p class="caption">{{ n_rows }} simulated latency rows from <code>{{ source }}</code>. Every cell runs each
  strategy's own schedule on weightless tensors on a virtual clock, with the named device and interconnect
  profiles; SPD and its composites drop the attention sync on the last half of the blocks (which blocks does
  not change the simulated cost: every block has the same shape). Speedup = t_baseline / t_best in the same
  cell; the no-communication bound never wins; "baseline" means no method beats it. Only the last panel is
  free of accuracy cost: ladder and SPD change the
  model (see a report's perplexity table for what that costs without retraining). {{ scenario }}</p>
{% for f in figures %}<h2>{{ f.title }}</h2><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.png }}">
{% else %}<p>No simulated rows.</p>{% endfor %}
<h2>Every cell</h2>
<table><thead><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in table %}<tr>{% for c in row %}<td{% if c is none %} class="na"{% endif %}>{{ c if c is not none
  else "" }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
</body></html>
""")


def page(rows: list[dict], source: str) -> str:
    best = best_cells(rows)
    keys = [c for c in best.columns if c not in ("phase", "best", "speedup", "why")]
    table = []
    for key, g in best.groupby(keys, sort=True):
        by_phase = g.set_index("phase")
        cells = []
        for phase in PHASES:
            r = by_phase.loc[phase]
            cells += [r.best or f"n/a: {r.why}", None if missing(r.speedup) else f"{r.speedup:.2f}x"]
        table.append([*key, *cells])
    header = [*keys, *[f"{label} {what}" for _, label in PHASES.values() for what in ("best", "speedup")]]
    lat = [r for r in rows if r.get("kind") == "latency"]
    scenario = "; ".join(
        f"{k} {v}"
        for k, v in SCENARIO.items()
        if k not in ("mode", "repetitions", "warmup") and len({str(r.get(k)) for r in lat}) == 1
    )
    return PAGE.render(
        n_rows=len(lat),
        source=source,
        figures=heatmaps(best) if not best.empty else [],
        header=header,
        table=table,
        scenario=scenario,
    )


def write(results: Path, out: Path) -> Path:
    from suite.results import ResultStore

    out.write_text(page(ResultStore(results).rows(), str(results)))
    return out
