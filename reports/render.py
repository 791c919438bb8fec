"""Result files -> one self-contained HTML page (tables, figures, environment, raw rows).

Reads JSONL result stores (one row per line, see ``suite/results.py``) and pytest-benchmark JSON
files; never imports torch or model code. Every number links to the command that produced it.

Derived columns, per scenario (model, provenance, interconnect, N, batch, prompt, dtype, ...):

    speedup     = t_baseline / t_strategy
    bound share = (t_baseline - t_strategy) / (t_baseline - t_nocomm)   # 100%: the no-comm bound
    d accuracy  = mean over tasks of (acc_strategy - acc_baseline), in percentage points
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from reports import figures, spd
from suite.errors import SpdbenchError
from suite.results import SCENARIOS, ResultStore, Row

SCENARIO = ["batch", "prompt_len", "new_tokens", "dtype", "device", "decode_mode"]
SCENARIO_LABELS = {"batch": "batch", "prompt_len": "prompt", "new_tokens": "new tokens", "dtype": "dtype",
                   "device": "device", "decode_mode": "decode"}
GROUP = ["model", "provenance", "interconnect", "tp", *SCENARIO]
ACCURACY_CONFIG = ["strategy", "options", "tp", "spd_variant", "spd_blocks_pct"]  # one row of the accuracy table
REFERENCE = "baseline"
BOUND = "nocomm"


class ReportError(SpdbenchError):
    """A result file that cannot be read."""


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)  # as ``Row.to_json`` writes them: every field of the kind
    benchmarks: list[dict] = field(default_factory=list)  # pytest-benchmark files, as read
    sources: list[str] = field(default_factory=list)


def _files(paths) -> list[Path]:
    """Result files; a folder stands for the result files in it (as ``spdbench run`` and ``bench`` write them)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise ReportError(f"results {path}: a folder without .jsonl result files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ReportError(f"results {path}: no such file or folder")
    return files


def load(paths) -> Results:
    """Read JSONL result stores (files, or folders of them) and pytest-benchmark JSON files."""
    results = Results()
    for path in _files(paths):
        text = path.read_text()
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and "benchmarks" in whole:
            results.benchmarks.append({"file": str(path), **whole})
        else:
            try:
                rows = ResultStore(path).rows()
            except SpdbenchError as exc:
                raise ReportError(str(exc)) from None
            for n, row in enumerate(rows, 1):
                try:
                    results.rows.append(Row.from_json(row).to_json() | {"cell_id": row.get("cell_id")})
                except (SpdbenchError, TypeError, AttributeError, KeyError) as exc:
                    raise ReportError(f"{path}: row {n} is not a result row ({exc})") from None
        results.sources.append(str(path))
    return results


# ---------------------------------------------------------------- cells


@dataclass
class Cell:
    text: str
    css: str = ""  # "na" for n/a cells, "ref" for links to commands and environments
    links: tuple = ()  # (text, href) pairs shown instead of text


def na(reason: str) -> Cell:
    return Cell(f"n/a: {reason}", "na")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value, fmt: str, reason: str) -> Cell | str:
    return na(reason) if _missing(value) else format(value, fmt)


def _plain(value) -> str:
    """A scenario value as text: '' when missing, integral floats without '.0'."""
    if _missing(value):
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def options_label(options) -> str:
    if not isinstance(options, dict) or not options:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if v not in ("", None))


# ---------------------------------------------------------------- frames


def frame(rows: list[dict], kind: str) -> pd.DataFrame:
    """Successful rows of one kind (every field of the kind is in every row: ``suite.results``)."""
    fields = [f.name for f in dataclasses.fields(SCENARIOS[kind])] + list(SCENARIOS[kind].values)
    df = pd.DataFrame([r for r in rows if r["kind"] == kind and r["status"] == "ok"],
                      columns=["cell_id", "kind", *fields, "status", "provenance", "usable_model", "env", "command"])
    df["options"] = df["strategy_options"].map(options_label)
    return df


def _key(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    return pd.Series(["|".join(map(str, t)) for t in df[cols].itertuples(index=False)], index=df.index, dtype=object)


def latency_table(lat: pd.DataFrame, acc_delta: dict) -> pd.DataFrame:
    """Latency rows with speedup, share of the no-communication bound and accuracy change."""
    lat = lat.copy()
    lat["scenario"] = _key(lat, GROUP)
    for phase, stat in [("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")]:
        for col in (f"{stat}_median", f"{stat}_p10", f"{stat}_p90"):
            lat[col] = pd.to_numeric(lat[col], errors="coerce") if col in lat else float("nan")
        t, is_base = lat[f"{stat}_median"], lat.strategy == REFERENCE
        base = lat.scenario.map(t[is_base].groupby(lat.scenario).median())
        low = lat.scenario.map(t[lat.strategy == BOUND].groupby(lat.scenario).median())
        noise = lat.scenario.map((lat[f"{stat}_p90"] - lat[f"{stat}_p10"])[is_base].groupby(lat.scenario).median())
        lat[f"{phase}_speedup"] = base / t
        lat[f"{phase}_bound_share"] = (base - t) / (base - low)
        lat[f"{phase}_bound_in_noise"] = (base - low) <= noise.fillna(0)  # the bound is not resolved
        lat[f"{phase}_has_base"], lat[f"{phase}_has_bound"] = base.notna(), low.notna()
    lat["acc_delta"] = [acc_delta.get((r.model, r.strategy, r.options, r.tp)) for r in lat.itertuples()]
    order = {REFERENCE: 0, BOUND: 2}
    lat["order"] = lat.strategy.map(lambda s: order.get(s, 1))
    return lat.sort_values(["order", "strategy", "options", "tp", *SCENARIO],
                           key=lambda c: c if pd.api.types.is_numeric_dtype(c) else c.map(str))


def headline_accuracy(acc: pd.DataFrame) -> pd.DataFrame:
    """One accuracy number per task: acc_norm where the task has it, else acc."""
    acc = acc[acc["metric"].astype(str).str.startswith("acc")].copy()
    acc["norm"] = acc["metric"] == "acc_norm"
    acc["variant_key"] = _key(acc, ["model", *ACCURACY_CONFIG])
    has_norm = acc.groupby(["variant_key", "task"])["norm"].transform("any")
    return acc[acc.norm == has_norm]


def accuracy_deltas(acc: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per accuracy configuration: mean accuracy and change vs baseline (pp); lookup by latency identity.

    The baseline is exact, so its accuracy does not depend on N: the baseline at the same N is
    the reference, else the baseline at any N."""
    if acc.empty:
        return acc, {}
    acc = headline_accuracy(acc).assign(limit_key=lambda d: d["limit"].map(_plain))  # None/NaN: all documents
    base = acc[acc.strategy == REFERENCE]
    same_n = base.groupby(["model", "tp", "task", "limit_key"])["value"].mean()
    any_n = base.groupby(["model", "task", "limit_key"])["value"].mean()

    def reference(r):
        return same_n.get((r.model, r.tp, r.task, r.limit_key), any_n.get((r.model, r.task, r.limit_key)))

    acc["reference"] = [reference(r) for r in acc.itertuples()]
    acc["delta_pp"] = 100 * (acc["value"] - acc["reference"])
    summary = acc.groupby(["model", *ACCURACY_CONFIG], dropna=False).agg(
        mean=("value", "mean"), delta_pp=("delta_pp", "mean"), tasks=("task", "nunique"),
        compared=("delta_pp", "count")).reset_index()
    lookup = {}
    for r in summary.itertuples():
        if r.compared:
            lookup.setdefault((r.model, r.strategy, r.options, r.tp), (r.delta_pp, r.compared))
    return summary, lookup


# ---------------------------------------------------------------- page sections


def _env_value(env: dict, key: str):
    if key not in env:
        return na("not recorded")
    value = env[key]
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


class Refs:
    """Numbered commands and environments, so every number can be traced to its origin."""

    def __init__(self, rows: list[dict]):
        self.commands: dict[str, dict] = {}
        self.envs: dict[str, dict] = {}
        for r in rows:
            cmd = self.commands.setdefault(str(r.get("command") or "n/a: no command recorded"),
                                           {"n": len(self.commands) + 1, "kinds": set(), "rows": 0})
            cmd["kinds"].add(str(r.get("kind")))
            cmd["rows"] += 1
            env = r.get("env") if isinstance(r.get("env"), dict) else {}
            self.envs.setdefault(self._env_key(env), {"n": len(self.envs) + 1, "env": env, "rows": 0})["rows"] += 1

    @staticmethod
    def _env_key(env) -> str:
        """Environments that differ only in their timestamp are one environment."""
        env = env if isinstance(env, dict) else {}
        return json.dumps({k: v for k, v in env.items() if k != "time"}, sort_keys=True, default=str)

    def env_table(self) -> dict:
        """One column per environment, one row per field."""
        envs = list(self.envs.values())
        fields = sorted({k for e in envs for k in e["env"]})
        return {"header": ["field", *[f"env {e['n']} ({e['rows']} rows)" for e in envs]],
                "rows": [[k, *[_env_value(e["env"], k) for e in envs]] for k in fields]}

    def cell(self, command, env) -> Cell:
        c = self.commands[str(command or "n/a: no command recorded")]["n"]
        e = self.envs[self._env_key(env)]["n"]
        return Cell(f"cmd {c} / env {e}", "ref", ((f"cmd {c}", f"#cmd-{c}"), (f"env {e}", f"#env-{e}")))


def _strategy_cell(r) -> Cell:
    return Cell(r.strategy, "") if r.usable_model else Cell(f"{r.strategy} (not a usable model)", "bound")


def _accuracy_cell(r) -> Cell | str:
    if not r.usable_model:
        return na("not a usable model")
    if r.strategy == REFERENCE:
        return "0 (reference)"
    if r.acc_delta is None:
        return na(f"no accuracy rows for this strategy{' with these options' if r.options else ''} at N={r.tp}")
    delta, tasks = r.acc_delta
    return f"{delta:+.2f} pp ({tasks} task{'s' if tasks != 1 else ''})"


def _relative_cells(r, phase: str) -> list:
    if r.strategy == REFERENCE:
        return ["1.00x", "0%"]
    if not getattr(r, f"{phase}_has_base"):
        return [na("no baseline row for this scenario")] * 2
    speedup = number(getattr(r, f"{phase}_speedup"), ".2f", "no timing")
    speedup = speedup + "x" if isinstance(speedup, str) else speedup
    if r.tp == 1:
        share = na("N=1 has no communication")
    elif not getattr(r, f"{phase}_has_bound"):
        share = na("no nocomm row for this scenario")
    else:
        value = getattr(r, f"{phase}_bound_share")
        if _missing(value) or math.isinf(value) or getattr(r, f"{phase}_bound_in_noise"):
            share = na("baseline-nocomm gap within the p10-p90 noise")
        else:
            share = f"{100 * value:.0f}%"
    return [speedup, share]


def _spread(r, prefix: str):
    med, lo, hi = (getattr(r, f"{prefix}_{s}", None) for s in ("median", "p10", "p90"))
    if _missing(med):
        return na("not measured")
    return f"{med:.2f}" + ("" if _missing(lo) or _missing(hi) else f" ({lo:.2f}-{hi:.2f})")


def _energy_cell(r):
    if not _missing(getattr(r, "j_per_token", None)):
        return f"{r.j_per_token:.3f}"
    status = getattr(r, "telemetry_status", None)
    return Cell(str(status), "na") if isinstance(status, str) and status.startswith("n/a") else na("no telemetry")


def latency_sections(lat: pd.DataFrame, refs: Refs) -> list[dict]:
    """One table per (provenance, interconnect, model); scenario fields constant in a table go to its caption."""
    sections = []
    for (prov, link, model), df in lat.groupby(["provenance", lat.interconnect.fillna("-"), "model"], sort=True):
        varying = [c for c in SCENARIO if df[c].map(str).nunique() > 1]
        fixed = [f"{SCENARIO_LABELS[c]} {df[c].iloc[0]}" for c in SCENARIO if c not in varying
                 and not _missing(df[c].iloc[0])]
        header = ["strategy", "options", "N", *[SCENARIO_LABELS[c] for c in varying],
                  "prefill ms (p10-p90)", "decode ms/token (p10-p90)", "tokens/s",
                  "prefill speedup", "prefill: share of no-comm bound", "decode speedup",
                  "decode: share of no-comm bound", "accuracy change vs baseline", "J/token", "source"]
        body = []
        for r in df.itertuples():
            body.append([_strategy_cell(r), r.options, r.tp, *[getattr(r, c) for c in varying],
                         _spread(r, "prefill_ms"), _spread(r, "decode_ms_per_token"),
                         number(getattr(r, "tokens_per_s", None), ".1f", "not measured"),
                         *_relative_cells(r, "prefill"), *_relative_cells(r, "decode"),
                         _accuracy_cell(r), _energy_cell(r), refs.cell(r.command, r.env)])
        title = model if prov == "measured" else f"{model} - projected, interconnect {link}"
        sections.append({"provenance": prov, "interconnect": None if link == "-" else link, "title": title,
                         "caption": "; ".join([", ".join(fixed), *_shared_reasons(header, body)]),
                         "header": header, "rows": body})
    return sections


def _shared_reasons(header: list[str], body: list[list]) -> list[str]:
    """A column whose cells are all n/a for one reason says it once, in the caption (cells keep 'n/a')."""
    notes = []
    for i, name in enumerate(header):
        cells = [row[i] for row in body]
        if len(cells) > 1 and all(isinstance(c, Cell) and c.css == "na" and c.text == cells[0].text for c in cells):
            notes.append(f"{name} {cells[0].text}")
            for row in body:
                row[i] = Cell("n/a", "na")
    return notes


def accuracy_section(acc: pd.DataFrame, refs: Refs) -> list[dict]:
    """Per model: one row per configuration, one column per task (value +- stderr), mean and change."""
    if acc.empty:
        return []
    acc = acc[acc["metric"] != "sample_len"]  # lm-eval's document count, not a score
    summary, _ = accuracy_deltas(acc)
    tables = []
    order = {REFERENCE: 0, BOUND: 2}
    acc = acc.assign(order=acc.strategy.map(lambda s: order.get(s, 1)),
                     variant_order=acc.spd_variant.map(lambda v: ["zs", "zs+b2b", "zs+b2b+hg"].index(v)
                                                       if v in ("zs", "zs+b2b", "zs+b2b+hg") else -1))
    acc = acc.sort_values(["order", "strategy", "tp", "variant_order", "spd_blocks_pct", "options"],
                          na_position="first")
    for model, df in acc.groupby("model"):
        tasks = sorted({f"{t} ({m})" for t, m in zip(df.task, df.metric)})
        keys = ACCURACY_CONFIG
        header = ["strategy", "options", "N", "SPD variant", "SPD blocks %", *tasks, "mean accuracy",
                  "change vs baseline", "source"]
        body = []
        for key, g in df.groupby(keys, dropna=False, sort=False):
            cells = dict.fromkeys(tasks, na("not evaluated"))
            for r in g.itertuples():
                err = "" if _missing(r.stderr) else f" ± {r.stderr:.4f}"
                limit = "all documents" if _missing(r.limit) else f"limit {_plain(r.limit)}"
                cells[f"{r.task} ({r.metric})"] = f"{r.value:.4f}{err} ({limit})"
            s = summary[(summary.model == model) & (_key(summary, keys) == "|".join(map(str, key)))]
            usable = bool(g.usable_model.iloc[0])
            mean = number(s["mean"].iloc[0] if len(s) else None, ".4f", "no acc/acc_norm metric")
            if not usable:
                change = na("not a usable model")
            elif key[0] == REFERENCE:
                change = "0 (reference)"
            else:
                change = number(s["delta_pp"].iloc[0] if len(s) else None, "+.2f", "no baseline for these tasks")
                change = change + " pp" if isinstance(change, str) else change
            first = g.iloc[0]
            strategy = first.strategy if usable else f"{first.strategy} (not a usable model)"
            body.append([strategy, first.options, first.tp, *[_plain(k) for k in key[3:]],
                         *cells.values(), mean, change, refs.cell(first.command, first.env)])
        tables.append({"title": model, "caption": "", "header": header, "rows": body})
    return tables


def simple_table(df: pd.DataFrame, cols: list[str], refs: Refs | None = None) -> dict:
    body = [[Cell("n/a", "na") if _missing(v) else f"{v:.6g}" if isinstance(v, float) else v for v in r]
            for r in df[cols].itertuples(index=False)]
    if refs is not None:
        body = [b + [refs.cell(c, e)] for b, c, e in zip(body, df.command, df.env)]
    return {"header": cols + (["source"] if refs is not None else []), "rows": body}


def benchmark_tables(benchmarks: list[dict]) -> list[dict]:
    tables = []
    for f in benchmarks:
        body = []
        for b in f.get("benchmarks", []):
            s = b.get("stats", {})
            body.append([b.get("fullname", b.get("name")), b.get("group") or "",
                         json.dumps(b.get("params") or {}, default=str)] +
                        [number(s.get(k), ".4f", "missing") if k != "rounds" else s.get("rounds", "")
                         for k in ("median", "mean", "stddev", "rounds")] +
                        [json.dumps({k: v for k, v in (b.get("extra_info") or {}).items()
                                     if not isinstance(v, (list, dict))}, default=str)])  # per-round samples left out
        env = {**f.get("machine_info", {}), "commit": f.get("commit_info", {}).get("id"), "date": f.get("datetime")}
        tables.append({"title": f["file"], "caption": "times in seconds",
                       "header": ["benchmark", "group", "params", "median s", "mean s", "stddev s", "rounds",
                                  "extra info"],
                       "rows": body, "env": json.dumps(env, indent=1, default=str)})
    return tables


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
    refs = Refs(rows)
    lat, acc = frame(rows, "latency"), frame(rows, "accuracy")
    sens, ppl, stab = frame(rows, "spd_sensitivity"), frame(rows, "spd_ppl"), frame(rows, "spd_stability")
    summary, deltas = accuracy_deltas(acc) if not acc.empty else (acc, {})
    lat = latency_table(lat, deltas) if not lat.empty else lat
    latency = latency_sections(lat, refs) if not lat.empty else []
    failed = [r for r in rows if r.get("status") == "failed"]
    kinds = pd.Series([r.get("kind") for r in rows], dtype=object).value_counts().to_dict()
    env = jinja2.Environment(loader=jinja2.PackageLoader("reports", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(
        title=title, checks=checks, sources=results.sources, kinds=kinds, n_rows=len(rows),
        measured=[s for s in latency if s["provenance"] == "measured"],
        projected=[s for s in latency if s["provenance"] != "measured"],
        accuracy=accuracy_section(acc, refs),
        sensitivity=simple_table(sens, [c for c in ["model", "tp", "block", "sensitivity", "ppl", "calib", "samples",
                                                    "seq_len"] if c in sens], refs) if not sens.empty else None,
        spd_ppl=simple_table(ppl, [c for c in ["model", "tp", "spd_variant", "budget_pct", "ppl", "dataset", "tokens"]
                                   if c in ppl], refs) if not ppl.empty else None,
        stability=simple_table(spd.stability_table(stab), list(spd.STABILITY_COLUMNS.values()), refs)
        if not stab.empty else None,
        figures=figures.all_figures(lat) + spd.figures(headline_accuracy(acc) if not acc.empty else acc, sens, ppl),
        benchmarks=benchmark_tables(results.benchmarks),
        failed=[{"kind": r.get("kind"), "model": r.get("model"), "strategy": r.get("strategy"), "tp": r.get("tp"),
                 "error": r.get("error"), "ref": refs.cell(r.get("command"), r.get("env"))} for r in failed],
        commands=refs.commands, envs=refs.envs, env_table=refs.env_table(), raw_json=Markup(embedded_json(rows)))


def write(results: Results, out, title: str = "spdbench report", checks=None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, title, checks))
    return out
