"""Regression checks on accuracy rows, for CI: a strategy may lose at most so many points against
the baseline, and the baseline must reach a floor per task (a broken model or harness fails it)."""

from __future__ import annotations

import math

from reports.analysis import accuracy_deltas, headline_accuracy
from reports.cells import REFERENCE
from reports.frames import frame
from suite.errors import SpdbenchError


def parse_limits(items: list[str], option: str) -> dict[str, float]:
    """``NAME=NUMBER`` items -> {name: number}; a bad item names the option and the fix."""
    limits = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            limits[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SpdbenchError(f"{option} {item!r}: expected NAME=NUMBER (e.g. {option} spd=2.0)")
    return limits


def check(rows: list[dict], max_drop: dict[str, float], min_accuracy: dict[str, float]) -> list[tuple[str, bool]]:
    """(description, passed) per checked configuration; a check with nothing to check fails."""
    acc = frame(rows, "accuracy")
    results = []
    summary, _ = accuracy_deltas(acc) if not acc.empty else (acc, {})
    for strategy, limit in max_drop.items():
        mine = summary[summary.strategy == strategy] if not summary.empty else summary
        if mine.empty:
            results.append((f"{strategy}: no accuracy rows to check against the allowed drop of {limit} pp", False))
        for r in mine.itertuples():
            where = f"{r.model} {strategy}{f' ({r.options})' if r.options else ''} N={r.tp}"
            if math.isnan(r.delta_pp):
                results.append((f"{where}: no baseline accuracy on the same tasks to compare with", False))
            else:
                results.append(
                    (f"{where}: {r.delta_pp:+.2f} pp vs baseline (allowed: -{limit} pp)", -r.delta_pp <= limit)
                )
    base = headline_accuracy(acc[acc.strategy == REFERENCE]) if not acc.empty else acc
    for task, floor in min_accuracy.items():
        mine = base[base.task == task] if not base.empty else base
        if mine.empty:
            results.append((f"baseline {task}: no accuracy rows to check against the floor {floor}", False))
        for r in mine.itertuples():
            results.append(
                (f"baseline {r.model} N={r.tp} {task} {r.metric} = {r.value:.4f} (floor {floor})", r.value >= floor)
            )
    return results
