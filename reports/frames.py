"""Result files -> rows -> pandas frames: the JSONL result stores (one row per line, see
``suite/results.py``) and pytest-benchmark JSON files, read without torch or model code."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from suite.errors import SpdbenchError
from suite.results import SCENARIOS, ResultStore, Row


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


def options_label(options) -> str:
    if not isinstance(options, dict) or not options:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if v not in ("", None))


def frame(rows: list[dict], kind: str) -> pd.DataFrame:
    """Successful rows of one kind (every field of the kind is in every row: ``suite.results``)."""
    fields = [f.name for f in dataclasses.fields(SCENARIOS[kind])] + list(SCENARIOS[kind].values)
    df = pd.DataFrame(
        [r for r in rows if r["kind"] == kind and r["status"] == "ok"],
        columns=["cell_id", "kind", *fields, "status", "provenance", "usable_model", "env", "command"],
    )
    df["options"] = df["strategy_options"].map(options_label)
    return df


def row_keys(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """One text key per row: its ``cols`` joined by '|'."""
    return pd.Series(["|".join(map(str, t)) for t in df[cols].itertuples(index=False)], index=df.index, dtype=object)
