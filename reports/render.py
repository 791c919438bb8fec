"""Result rows -> one self-contained HTML page (summary, tables, figures, environment, raw rows).

Every row links to the command that produced it, and every n/a says why, and what to run to fill it.
The statistics come from ``reports.analysis``, the tables from ``reports.tables``, the figures
from ``reports.figures`` and ``reports.spd``.

Latency rows are shown by how they were obtained: simulated, measured on GPUs, projected, and
measured on the CPU. CPU rows are a pipeline check (the N ranks share the CPU's cores, so they do
not rank strategies): they get no speedups and stay out of the comparing figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from reports import composition, figures, spd
from reports import summary as answers
from reports.analysis import NOISE_SE, accuracy_deltas, headline_accuracy, latency_table
from reports.cells import SETTINGS
from reports.fills import Fills
from reports.frames import Results, frame
from reports.provenance import Refs, models_table
from reports.tables import accuracy_section, benchmark_tables, latency_sections, simple_table

CPU_CAVEAT = "ranks share the CPU's cores; this does not rank strategies"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def embedded_json(rows: list[dict]) -> str:
    """Rows as JSON that is safe inside <script>: '<', '>' and '&' become \\u escapes (so '</' cannot occur)."""
    text = json.dumps(_json_safe(rows), default=str, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(results: Results, title: str = "spdbench report", checks: list[tuple[str, bool]] | None = None) -> str:
    rows = results.rows
    refs, fills = Refs(rows), Fills(results)
    lat, acc = frame(rows, "latency"), frame(rows, "accuracy")
    sens, ppl, stab = frame(rows, "spd_sensitivity"), frame(rows, "spd_ppl"), frame(rows, "spd_stability")
    summary, deltas = accuracy_deltas(acc) if not acc.empty else (acc, {})
    lat = latency_table(lat, deltas) if not lat.empty else lat.assign(setting=None)
    latency = latency_sections(lat, refs, fills) if not lat.empty else []
    strategy_ppl = frame(rows, "perplexity")
    ppl_changes = answers.ppl_changes(strategy_ppl)
    anchors = {(s["setting"], s["device_profile"], s["interconnect"], s["model"]): s["id"] for s in latency}
    scenarios = answers.scenarios(lat, deltas, ppl_changes, fills, anchors) if not lat.empty else []
    failed = [r for r in rows if r.get("status") == "failed"]
    kinds = pd.Series([r.get("kind") for r in rows], dtype=object).value_counts().to_dict()
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reports", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2").render(
        title=title,
        checks=checks,
        sources=results.sources,
        kinds=kinds,
        n_rows=len(rows),
        models=models_table(rows),
        settings=SETTINGS,
        cpu_caveat=CPU_CAVEAT,
        latency={s: [t for t in latency if t["setting"] == s] for s in SETTINGS},
        accuracy=accuracy_section(acc, refs, fills),
        noise_se=NOISE_SE,
        scenarios=scenarios,
        budgets=answers.budget_labels(),
        composition=composition.slower(lat) if not lat.empty else [],
        perplexity=answers.ppl_table(strategy_ppl, ppl_changes, refs),
        headlines=figures.headlines(scenarios),
        sensitivity=simple_table(
            sens,
            [c for c in ["model", "tp", "block", "sensitivity", "ppl", "calib", "samples", "seq_len"] if c in sens],
            refs,
        )
        if not sens.empty
        else None,
        spd_ppl=simple_table(
            ppl, [c for c in ["model", "tp", "spd_variant", "budget_pct", "ppl", "dataset", "tokens"] if c in ppl], refs
        )
        if not ppl.empty
        else None,
        stability=simple_table(spd.stability_table(stab), list(spd.STABILITY_COLUMNS.values()), refs)
        if not stab.empty
        else None,
        figures=figures.all_figures(lat[lat.setting != "cpu"] if not lat.empty else lat, summary)
        + spd.figures(headline_accuracy(acc) if not acc.empty else acc, sens, ppl),
        benchmarks=benchmark_tables(results.benchmarks),
        failed=[
            {
                "kind": r.get("kind"),
                "model": r.get("model"),
                "strategy": r.get("strategy"),
                "tp": r.get("tp"),
                "error": r.get("error"),
                "ref": refs.cell(r.get("command"), r.get("env")),
            }
            for r in failed
        ],
        fills=fills.items,
        commands=refs.commands,
        envs=refs.envs,
        env_table=refs.env_table(),
        raw_json=Markup(embedded_json(rows)),
    )


def write(results: Results, out, title: str = "spdbench report", checks=None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, title, checks))
    return out
