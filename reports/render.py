"""Result files -> one self-contained HTML page (tables, figures, environment, raw rows).

Reads JSONL result stores (one row per line, see ``suite/results.py``) and pytest-benchmark JSON
files; never imports torch or model code. Every row links to the command that produced it, and
every n/a says why, and what to run to fill it.

Latency rows are shown by how they were obtained: simulated, measured on GPUs, projected, and
measured on the CPU. CPU rows are a pipeline check (the N ranks share the CPU's cores, so they do
not rank strategies): they get no speedups and stay out of the comparing figures.

Derived columns, per scenario (model, provenance, profiles, N, batch, prompt, dtype, kernel mode, ...):

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

import dataclasses
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import jinja2
import pandas as pd
from markupsafe import Markup

from reports import composition, figures, spd
from reports import summary as answers
from reports.cells import BOUND, GROUP, REFERENCE, SCENARIO, SCENARIO_LABELS, SETTINGS, Cell, na
from reports.cells import missing as _missing
from suite.errors import SpdbenchError
from suite.results import SCENARIOS, ResultStore, Row
from suite.vocabulary import SPD_VARIANTS, is_random

ACCURACY_CONFIG = ["strategy", "options", "tp", "spd_variant", "spd_blocks_pct"]  # one row of the accuracy table
NOISE_SE = 2  # a change under this many standard errors is within noise
# A share of the no-communication bound needs a bound: a baseline-nocomm gap under this fraction of the
# baseline's time (or within the baseline's p10-p90 spread) resolves no share. Under 10%, the share multiplies
# any error of either time (a simulation's model error, a measurement's spread) more than tenfold.
BOUND_MIN_GAP = 0.10
CPU_CAVEAT = "ranks share the CPU's cores; this does not rank strategies"


class ReportError(SpdbenchError):
    """A result file that cannot be read."""


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)  # as ``Row.to_json`` writes them: every field of the kind
    benchmarks: list[dict] = field(default_factory=list)  # pytest-benchmark files, as read
    sources: list[str] = field(default_factory=list)
    stores: dict[str, list[str]] = field(default_factory=dict)  # row kind -> the files that hold such rows


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
                files = results.stores.setdefault(str(row.get("kind")), [])
                if str(path) not in files:
                    files.append(str(path))
        results.sources.append(str(path))
    return results


# ---------------------------------------------------------------- cells


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


def percent(value, se=None) -> str:
    """A fraction as % with one decimal, and its standard error."""
    return f"{100 * value:.1f}" + ("" if _missing(se) else f" ± {100 * se:.1f}")


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


# ---------------------------------------------------------------- frames


def frame(rows: list[dict], kind: str) -> pd.DataFrame:
    """Successful rows of one kind (every field of the kind is in every row: ``suite.results``)."""
    fields = [f.name for f in dataclasses.fields(SCENARIOS[kind])] + list(SCENARIOS[kind].values)
    df = pd.DataFrame(
        [r for r in rows if r["kind"] == kind and r["status"] == "ok"],
        columns=["cell_id", "kind", *fields, "status", "provenance", "usable_model", "env", "command"],
    )
    df["options"] = df["strategy_options"].map(options_label)
    return df


def _key(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    return pd.Series(["|".join(map(str, t)) for t in df[cols].itertuples(index=False)], index=df.index, dtype=object)


def latency_setting(lat: pd.DataFrame) -> pd.Series:
    """simulated | gpu | projected | cpu: how each latency row was obtained."""
    measured = lat.provenance == "measured"
    return lat.provenance.where(~measured, lat.device.map(lambda d: "cpu" if d == "cpu" else "gpu"))


def latency_table(lat: pd.DataFrame, acc_delta: dict) -> pd.DataFrame:
    """Latency rows with speedup, share of the no-communication bound and accuracy change."""
    lat = lat.copy()
    lat["setting"] = latency_setting(lat)
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
    acc["variant_key"] = _key(acc, ["model", *ACCURACY_CONFIG])
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
        limit_key=lambda d: d["limit"].map(_plain),  # None/NaN: all documents
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


# ---------------------------------------------------------------- what to run to fill a gap


class Fills:
    """Numbered commands that fill the page's gaps: an n/a cell links to the command that fills it."""

    def __init__(self, results: Results):
        self.items: dict[str, dict] = {}
        self.stores = results.stores
        acc = frame(results.rows, "accuracy")
        acc = acc[acc.strategy == REFERENCE] if not acc.empty else acc
        self.tasks = {m: ",".join(sorted(set(g.task))) for m, g in acc.groupby("model")}
        self.limits = {m: _plain(g["limit"].iloc[0]) for m, g in acc.groupby("model")}

    def store(self, kind: str, default: str) -> str:
        return (self.stores.get(kind) or [default])[0]

    def add(self, what: str, command: str) -> tuple:
        item = self.items.setdefault(command, {"n": len(self.items) + 1, "what": what})
        return ((f"fill {item['n']}", f"#fill-{item['n']}"),)

    def na(self, reason: str, what: str, command: str) -> Cell:
        return Cell(f"n/a: {reason}", "na", self.add(what, command))

    def eval_command(self, model: str, strategy: str, options: dict, tp, task: str | None = None) -> str:
        words = ["spdbench", "eval", "--model", model, "--tp", str(tp), "--strategy", strategy]
        for key, value in sorted((options or {}).items()):
            words += ["--strategy-opt", f"{key}={value}"]
        limit = self.limits.get(model)
        words += ["--tasks", task or self.tasks.get(model, "piqa,arc_easy"), *(["--limit", limit] if limit else [])]
        return shlex.join(words + ["--out", self.store("accuracy", "accuracy.jsonl")])

    def accuracy(self, r) -> Cell:
        where = f"{r.strategy}{f' ({r.options})' if r.options else ''} at N={r.tp}"
        return self.na(
            f"no accuracy rows for this strategy{' with these options' if r.options else ''} at N={r.tp}",
            f"accuracy of {r.model} {where}",
            self.eval_command(r.model, r.strategy, r.strategy_options, r.tp),
        )

    def matrix(self, reason: str, what: str, command) -> Cell:
        """A gap in a latency matrix: the row's own command, after the matrix is changed."""
        return self.na(reason, what, str(command or "spdbench bench --config MATRIX.yaml --out OUT"))


# ---------------------------------------------------------------- page sections


def _env_value(env: dict, key: str):
    if key not in env:
        return na("not recorded by the rows' spdbench version (re-run the command to record it)")
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
            cmd = self.commands.setdefault(
                str(r.get("command") or "n/a: no command recorded"),
                {"n": len(self.commands) + 1, "kinds": set(), "rows": 0},
            )
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
        return {
            "header": ["field", *[f"env {e['n']} ({e['rows']} rows)" for e in envs]],
            "rows": [[k, *[_env_value(e["env"], k) for e in envs]] for k in fields],
        }

    def cell(self, command, env) -> Cell:
        c = self.commands[str(command or "n/a: no command recorded")]["n"]
        e = self.envs[self._env_key(env)]["n"]
        return Cell("", "ref", ((f"cmd {c}", f"#cmd-{c}"), (f"env {e}", f"#env-{e}")))


def identity_text(identity) -> str:
    """'SmolLM2-135M-Instruct (instruction-tuned): Q4_1 GGUF ..., dequantised to float32'."""
    if not isinstance(identity, dict) or not identity.get("name"):
        return "not recorded"
    variant = f" ({identity['variant']})" if identity.get("variant") else ""
    return f"{identity['name']}{variant}: {identity.get('weights') or 'weights not recorded'}"


def models_table(rows: list[dict]) -> dict:
    """One line per model argument: what the model is, and the dtypes it ran in."""
    models: dict[str, dict] = {}
    for r in rows:
        entry = models.setdefault(
            str(r.get("model")), {"identity": r.get("model_identity"), "dtypes": set(), "kinds": set()}
        )
        dtype = (r.get("model_identity") or {}).get("dtype") or r.get("dtype")
        if dtype:
            entry["dtypes"].add(str(dtype))
        entry["kinds"].add(str(r.get("kind")))
    body = [
        [
            model,
            identity_text(e["identity"]),
            ", ".join(sorted(e["dtypes"])) or na("not recorded"),
            ", ".join(sorted(e["kinds"])),
        ]
        for model, e in models.items()
    ]
    return {"header": ["model argument", "model and weights", "ran in", "rows"], "rows": body}


def _strategy_cell(r) -> Cell:
    return Cell(r.strategy, "") if r.usable_model else Cell(f"{r.strategy} (not a usable model)", "bound")


def _accuracy_cell(r, fills: Fills) -> Cell | str:
    if not r.usable_model:
        return na("not a usable model")
    if r.strategy == REFERENCE:
        return "0 (reference)"
    if r.acc_delta is not None:
        return r.acc_delta.text()
    if is_random(r.model):
        return na("random weights: accuracy says nothing")
    return fills.accuracy(r)


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
                    _accuracy_cell(r, fills),
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
        limits = {_plain(v) for v in df["limit"]}
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
                limit = "" if one_limit else " (all documents)" if _missing(r.limit) else f" (limit {_plain(r.limit)})"
                cells[(r.task, r.metric)] = percent(r.value, r.stderr) + limit
            s = summary[(summary.model == model) & (_key(summary, keys) == "|".join(map(str, key)))]
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
                    *[_plain(k) for k in key[3:]],
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
