"""What to run to fill a gap: an n/a cell of the page links to the numbered command that fills it."""

from __future__ import annotations

import shlex

from reports.cells import REFERENCE, Cell, plain
from reports.frames import Results, frame


class Fills:
    """Numbered commands that fill the page's gaps: an n/a cell links to the command that fills it."""

    def __init__(self, results: Results):
        self.items: dict[str, dict] = {}
        self.stores = results.stores
        acc = frame(results.rows, "accuracy")
        acc = acc[acc.strategy == REFERENCE] if not acc.empty else acc
        self.tasks = {m: ",".join(sorted(set(g.task))) for m, g in acc.groupby("model")}
        self.limits = {m: plain(g["limit"].iloc[0]) for m, g in acc.groupby("model")}

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
