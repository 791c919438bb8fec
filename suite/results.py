"""The row schema and the results store: one JSON object per line (JSONL), one row per scenario cell.

A ``Row`` is a ``Scenario`` (what was run: enough to run it again; its hash is the row's
``cell_id``), what the model is (``suite.vocabulary.model_identity``: name, variant, how its weights are
stored, the dtype it ran in), how the number was obtained (``provenance``: measured, projected or
simulated), whether the strategy is a usable model, the outcome (``status`` ok / failed with ``error``, and
the kind's ``values``), the environment (``suite.environment``) and the exact command. Every writer builds
rows from these dataclasses and the report reads them back with ``Row.from_json``: every field of the kind
is present in every row, so nothing is guessed from names.

The store appends one line per row under an exclusive lock (a second writer waits), so a crash
or Ctrl-C never leaves a torn file and never loses a finished row. A cell is finished when it
has an ``ok`` row: later rows of a finished cell are not written (re-running resumes without
duplicating), a failed cell's newer row replaces it when read. Read the file with
``pandas.read_json(path, lines=True)`` or ``ResultStore(path).rows()``.

This module imports no torch (the report reads it).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from suite.environment import now
from suite.errors import SpdbenchError
from suite.vocabulary import model_identity


class ResultsError(SpdbenchError):
    """A results file that cannot be read."""


def cell_id(scenario: dict) -> str:
    """A stable identifier of a scenario (key order does not matter)."""
    return hashlib.sha256(json.dumps(scenario, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- scenarios, one class per kind of row


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """What a row measured. Subclasses add their kind's settings; all of them enter the ``cell_id``."""

    kind: ClassVar[str]
    values: ClassVar[tuple[str, ...]] = ()  # the kind's outcome fields (null in a failed row)
    model: str
    strategy: str | None = None
    strategy_options: dict = field(default_factory=dict)
    tp: int = 1

    def to_json(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @property
    def cell_id(self) -> str:
        return cell_id(self.to_json())


LATENCY_VALUES = (
    "prefill_ms_median",
    "prefill_ms_p10",
    "prefill_ms_p90",
    "decode_ms_per_token_median",
    "decode_ms_per_token_p10",
    "decode_ms_per_token_p90",
    "e2e_ms_median",
    "tokens_per_s",
    "comm_fraction",
    "comm_fraction_status",
    "samples",
    "telemetry_status",
    "energy_j",
    "j_per_token",
    "power_w_mean",
    "telemetry",
)


@dataclass(frozen=True, kw_only=True)
class LatencyScenario(Scenario):
    """One latency cell: a strategy at N ranks on a batch of random prompts, prefill then greedy decode."""

    kind = "latency"
    values = LATENCY_VALUES
    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    decode_mode: str = "eager"  # eager | cuda_graph
    kernels: str = "eager"
    mode: str = "measured"  # measured | projected | simulated
    interconnect: str | None = None  # link profile (projected, simulated)
    device_profile: str | None = None  # device profile (simulated)
    repetitions: int = 5
    warmup: int = 1
    backend: str = "auto"
    timeout: float = 300
    seed: int = 0

    @property
    def provenance(self) -> str:
        return self.mode

    def label(self) -> str:
        """A short human name of the cell."""
        opts = ",".join(f"{k}={v}" for k, v in self.strategy_options.items())
        link = ":".join(p for p in (self.device_profile, self.interconnect) if p)
        mode = f" {self.mode}:{link}" if self.mode != "measured" else ""
        return (
            f"{self.model} {self.strategy}{'(' + opts + ')' if opts else ''} tp={self.tp} batch={self.batch} "
            f"prompt={self.prompt_len} new={self.new_tokens} {self.dtype} {self.device} {self.decode_mode} "
            f"kernels={self.kernels}{mode}"
        )


@dataclass(frozen=True, kw_only=True)
class BenchmarkScenario(LatencyScenario):
    """A latency case timed by pytest-benchmark (imported from its JSON file)."""

    kind = "latency"
    values = LATENCY_VALUES + ("benchmark_e2e_ms_median",)
    source: str = "pytest-benchmark"
    benchmark: str = ""
    run: str = ""


@dataclass(frozen=True, kw_only=True)
class AccuracyScenario(Scenario):
    """One lm-eval metric of one task through the tensor-parallel model."""

    kind = "accuracy"
    values = ("value", "stderr", "spd_variant", "spd_blocks_pct")
    dtype: str = "float32"
    data: str = "hub"  # local data folder, or the Hugging Face Hub
    task: str = ""
    metric: str = ""
    limit: int | None = None  # documents (None: all)


@dataclass(frozen=True, kw_only=True)
class SensitivityScenario(Scenario):
    """SPD sensitivity of one block: PPL(SPD on block..L-1) - PPL(SPD on block+1..L-1)."""

    kind = "spd_sensitivity"
    values = ("sensitivity", "ppl", "sensitivity_p05", "sensitivity_p95")  # p05/p95: bootstrap over windows
    block: int = 0
    calib: str = ""
    samples: int = 0
    seq_len: int = 0
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class PerplexityScenario(Scenario):
    """Perplexity of an SPD budget and variant on evaluation text."""

    kind = "spd_ppl"
    values = ("ppl",)
    dataset: str = ""
    tokens: int = 0
    seq_len: int = 0
    budget_pct: float = 0
    spd_variant: str = ""


@dataclass(frozen=True, kw_only=True)
class StrategyPerplexityScenario(Scenario):
    """Perplexity of a strategy on evaluation text through the TP model, with each window's summed
    negative log-likelihood (``window_nll``: the report pairs them with the baseline's for a standard error)."""

    kind = "perplexity"
    values = ("ppl", "window_nll")
    dtype: str = "float32"
    dataset: str = ""
    tokens: int = 0
    seq_len: int = 0


@dataclass(frozen=True, kw_only=True)
class StabilityScenario(Scenario):
    """How stable a sensitivity analysis is: a bootstrap over its calibration windows, for one budget.

    Rank correlation (Spearman) of the block order and the share of blocks in the same class do
    not depend on the budget; the agreement of the chosen set is that of the ``budget_pct``
    least sensitive blocks. Means and 5th percentiles over the resamples."""

    kind = "spd_stability"
    values = (
        "rank_corr_mean",
        "rank_corr_p05",
        "set_agreement_mean",
        "set_agreement_p05",
        "class_agreement_mean",
        "class_agreement_p05",
        "baseline_ppl",
    )
    calib: str = ""
    samples: int = 0
    seq_len: int = 0
    seed: int = 0
    resamples: int = 0
    budget_pct: float = 0


SCENARIOS: dict[str, type[Scenario]] = {
    "latency": LatencyScenario,
    "accuracy": AccuracyScenario,
    "spd_sensitivity": SensitivityScenario,
    "spd_ppl": PerplexityScenario,
    "spd_stability": StabilityScenario,
    "perplexity": StrategyPerplexityScenario,
}


def _scenario_class(data: dict) -> type[Scenario]:
    if data.get("kind") == "latency" and data.get("source") == "pytest-benchmark":
        return BenchmarkScenario
    try:
        return SCENARIOS[data["kind"]]
    except KeyError:
        raise ResultsError(f"row kind {data.get('kind')!r} is unknown; kinds: {', '.join(SCENARIOS)}") from None


# ---------------------------------------------------------------- rows

ROW_FIELDS = ("status", "error", "provenance", "usable_model", "model_identity", "env", "command", "time")


@dataclass(kw_only=True)
class Row:
    scenario: Scenario
    provenance: str = "measured"  # measured | projected | simulated
    usable_model: bool = True  # False: a latency bound whose outputs are not a model
    model_identity: dict = field(default_factory=dict)  # ``model_identity(scenario.model)`` when not given
    status: str = "ok"  # ok | failed
    error: str | None = None
    values: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    command: str = ""
    time: str = field(default_factory=now)

    def __post_init__(self):
        if not self.model_identity:
            self.model_identity = model_identity(self.scenario.model, getattr(self.scenario, "dtype", None))

    @property
    def cell_id(self) -> str:
        return self.scenario.cell_id

    def to_json(self) -> dict:
        unknown = sorted(set(self.values) - set(self.scenario.values))
        if unknown:
            raise ValueError(f"{self.scenario.kind} rows have no field {unknown[0]!r}")
        values = {k: self.values.get(k) for k in self.scenario.values}
        return {
            "cell_id": self.cell_id,
            **self.scenario.to_json(),
            "status": self.status,
            "error": self.error,
            "provenance": self.provenance,
            "usable_model": self.usable_model,
            "model_identity": self.model_identity,
            **values,
            "env": self.env,
            "command": self.command,
            "time": self.time,
        }

    @classmethod
    def from_json(cls, data: dict) -> Row:
        kind = _scenario_class(data)
        names = {f.name for f in dataclasses.fields(kind)}
        scenario = kind(**{k: v for k, v in data.items() if k in names})
        return cls(
            scenario=scenario,
            values={k: data.get(k) for k in kind.values},
            **{k: data[k] for k in ROW_FIELDS if k in data},
        )


# ---------------------------------------------------------------- the store


def parse_jsonl(text: str, where, error: type[Exception] = ResultsError) -> list[dict]:
    """One JSON object per non-blank line; a bad line raises ``error`` naming ``where`` and the line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise error(f"{where}:{n} is not a JSON row ({exc.msg})") from None
    return rows


class ResultStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def all_rows(self) -> list[dict]:
        """Every line, in the order written (a torn last line, from a crash mid-write, is left out)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        return parse_jsonl(text, self.path)

    def rows(self) -> list[dict]:
        """One row per cell: its ok row, else its latest failed one; in the order cells first appeared."""
        latest: dict[str, dict] = {}
        for row in self.all_rows():
            key = row.get("cell_id")
            if key not in latest or latest[key].get("status") != "ok":
                latest[key] = row
        return list(latest.values())

    def finished(self) -> set[str]:
        """cell_ids that completed successfully (their cells are skipped on a re-run)."""
        return {r["cell_id"] for r in self.rows() if r.get("status") == "ok"}

    def append(self, *rows: Row | dict) -> list[dict]:
        """Append the rows of cells not yet finished (one locked, flushed write); returns those written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0)
            text = f.read().decode()
            if text and not text.endswith("\n"):  # a torn line from a crash mid-write: drop it
                f.truncate(text.rfind("\n") + 1)
                text = text[: text.rfind("\n") + 1]
            done = {r.get("cell_id") for r in parse_jsonl(text, self.path) if r.get("status") == "ok"}
            new = []
            for row in rows:
                data = row.to_json() if isinstance(row, Row) else row
                if data["cell_id"] not in done:
                    new.append(data)
                    done |= {data["cell_id"]} if data.get("status") == "ok" else set()
            f.write("".join(json.dumps(r, default=str) + "\n" for r in new).encode())
            f.flush()
            os.fsync(f.fileno())
        return new
