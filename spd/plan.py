"""The SPD plan: which blocks drop their attention sync, and how each is prepared.

A small versioned JSON file::

    {"format": "spdbench-spd-plan", "version": 1, "model": "<ModelSource.identity>", "tp": N,
     "blocks": [{"block": 29, "mode": "zs", "sensitivity": 0.01}, ...],   # unlisted blocks: "tp"
     "thresholds": {"t1": ..., "t2": ..., "rule": "..."}, "budget": {...},
     "weights": "weights.safetensors" | null,   # distilled tensors, relative to the plan file
     "distill": {...settings and per-block MSE...}}

Modes: ``tp`` (baseline block), ``zs`` (zero-shot SPD), ``b2b`` (SPD with distilled weights),
``hg+b2b`` (head-grouped layout, then distilled weights). A head-grouped block carries
``"layout": [{"q_heads": [...], "ffn": [start, stop]}, ...]`` (one entry per rank).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from suite.files import write_json_atomic
from suite.model.sharding import BlockShard, Layout, check_tp, default_layout
from suite.model.sources import ModelSource, WeightSource
from suite.parallel.strategy import StrategyError
from suite.vocabulary import SPD_MODES, check_variant, parse_blocks, strongest_mode

FORMAT, VERSION = "spdbench-spd-plan", 1
DISTILLED = ("b2b", "hg+b2b")


class PlanError(StrategyError):
    """The SPD plan file is unusable for this run."""


@dataclass
class Plan:
    model: str
    tp: int
    blocks: dict[int, dict] = field(default_factory=dict)  # block -> {"mode", "sensitivity", ["layout"]}
    thresholds: dict | None = None
    budget: dict | None = None
    weights: str | None = None
    distill: dict | None = None
    path: Path | None = None  # where it was read from (resolves ``weights``)

    def mode(self, block: int) -> str:
        return self.blocks.get(block, {}).get("mode", "tp")

    def spd_blocks(self) -> set[int]:
        return {b for b, e in self.blocks.items() if e["mode"] != "tp"}

    def distilled_blocks(self) -> set[int]:
        return {b for b, e in self.blocks.items() if e["mode"] in DISTILLED}

    def weights_path(self) -> Path | None:
        if not self.weights:
            return None
        return (self.path.parent if self.path else Path()) / self.weights

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "tp": self.tp,
            "blocks": [{"block": b, **self.blocks[b]} for b in sorted(self.blocks)],
            "thresholds": self.thresholds,
            "budget": self.budget,
            "weights": self.weights,
            "distill": self.distill,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_json_atomic(path, self.to_json())
        self.path = path
        return path

    def validate(self, source: ModelSource, tp: int, need_weights: bool = True) -> None:
        """Reject a plan made for another model, another N, or blocks the model does not have."""
        where = f"SPD plan {self.path or ''}".rstrip()
        if self.model != source.identity:
            raise PlanError(
                f"{where} was made for model {self.model!r}, not {source.identity!r}: "
                "run `spdbench spd sensitivity/plan` for this model"
            )
        if self.tp != tp:
            raise PlanError(
                f"{where} was made for tp {self.tp}, not {tp}: SPD plans depend on N; make a plan for this N"
            )
        check_tp(source.config, tp)
        n_layers = source.config.num_hidden_layers
        bad = [b for b in self.blocks if not 0 <= b < n_layers]
        if bad:
            raise PlanError(f"{where}: block {bad[0]} is out of range (the model has blocks 0..{n_layers - 1})")
        for b, e in self.blocks.items():
            if "layout" in e:
                _check_layout(e["layout"], source.config, tp, f"{where}: block {b}")
        weights = self.weights_path()
        if need_weights and self.distilled_blocks() and (weights is None or not weights.is_file()):
            missing = f"{weights} is missing" if weights else "the plan names no weights file"
            raise PlanError(
                f"{where}: blocks in mode b2b/hg+b2b need distilled weights, but {missing}: "
                "run `spdbench spd distill` on it"
            )

    def layout(self, config, tp: int) -> Layout:
        """The default Megatron layout, with head-grouped blocks replaced by their permuted shards."""
        layout = default_layout(config, tp)
        group = config.num_attention_heads // config.num_key_value_heads
        for b, e in self.blocks.items():
            if e["mode"] == "hg+b2b" and "layout" in e:
                layout[b] = [BlockShard(tuple(r["q_heads"]), tuple(r["ffn"]), group) for r in e["layout"]]
        return layout


def _check_layout(layout, config, tp: int, where: str) -> None:
    try:
        heads = sorted(h for r in layout for h in r["q_heads"])
        ffn = sorted(tuple(r["ffn"]) for r in layout)
    except (TypeError, KeyError):
        raise PlanError(f"{where}: layout entries need q_heads and ffn") from None
    tiles = (
        all(a[1] == b[0] for a, b in zip(ffn, ffn[1:])) and ffn[0][0] == 0 and ffn[-1][1] == config.intermediate_size
    )
    if (
        len(layout) != tp
        or heads != list(range(config.num_attention_heads))
        or not tiles
        or any(not r["q_heads"] or r["ffn"][1] <= r["ffn"][0] for r in layout)
    ):
        raise PlanError(
            f"{where}: layout must give each of the {tp} ranks some heads and an FFN range, "
            "covering every head and FFN column exactly once"
        )


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check the structure of a plan file (model and N are checked by ``Plan.validate``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"SPD plan {path} not found: make one with `spdbench spd plan`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(
            f"SPD plan {path} is not a readable JSON file ({exc.__class__.__name__}); "
            "re-create it with `spdbench spd plan`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PlanError(f"{path} is not an SPD plan (format {FORMAT!r} expected)")
    if data.get("version") != VERSION:
        raise PlanError(f"SPD plan {path} has version {data.get('version')!r}; this spdbench reads version {VERSION}")
    try:
        blocks = {}
        for entry in data["blocks"]:
            entry = dict(entry)
            b = entry.pop("block")
            if not isinstance(b, int) or b in blocks:
                raise PlanError(f"SPD plan {path}: block {b!r} is not a block index or is listed twice")
            if entry.get("mode") not in SPD_MODES:
                raise PlanError(
                    f"SPD plan {path}: block {b} has unknown mode {entry.get('mode')!r}; "
                    f"choose one of {', '.join(SPD_MODES)}"
                )
            blocks[b] = entry
        plan = Plan(
            str(data["model"]),
            int(data["tp"]),
            blocks,
            data.get("thresholds"),
            data.get("budget"),
            data.get("weights"),
            data.get("distill"),
            path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, PlanError):
            raise
        raise PlanError(
            f"SPD plan {path} is malformed ({exc.__class__.__name__}: {exc}); re-create it with `spdbench spd plan`"
        ) from None
    return plan


def block_of(name: str) -> int | None:
    """``model.layers.7.mlp.up_proj.weight`` -> 7."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[:2] == ["model", "layers"] else None


class OverlayWeights(WeightSource):
    """Distilled tensors of the given blocks served over the base model's."""

    def __init__(self, base: WeightSource, file: Path, blocks: set[int]):
        from safetensors import safe_open

        self.base, self.blocks = base, blocks
        self._file = safe_open(file, "pt")
        self._names = set(self._file.keys())

    def read(self, name, dim=0, ranges=None):
        if name not in self._names or block_of(name) not in self.blocks:
            return self.base.read(name, dim, ranges)
        t = self._file.get_tensor(name)
        if ranges is None:
            return t
        return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def parse_budget(budget: str, n_layers: int) -> int:
    """``50%`` (of the blocks, rounded) or a block count -> number of SPD blocks."""
    try:
        n = round(float(budget[:-1]) / 100 * n_layers) if budget.endswith("%") else int(budget)
    except ValueError:
        n = -1
    if not 0 <= n <= n_layers:
        raise PlanError(f"budget {budget!r}: expected a percentage 0%..100% or a block count 0..{n_layers}")
    return n


def classify(sensitivity: float, t1: float, t2: float) -> str:
    """ISB (s <= t1) -> zs; SB (t1 < s <= t2) -> b2b; ESB (s > t2) -> hg+b2b."""
    return "zs" if sensitivity <= t1 else "b2b" if sensitivity <= t2 else "hg+b2b"


def _threshold(name: str, value: float | str, baseline: float | None) -> tuple[float, str]:
    """A threshold given as a perplexity increase (``0.5``) or a share of the baseline perplexity (``2%``)."""
    text = str(value).strip()
    try:
        number = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        raise PlanError(
            f"{name} {value!r}: expected a perplexity increase (0.5) or a share of the baseline perplexity (2%)"
        ) from None
    if not text.endswith("%"):
        return number, f"{name} = {text} (absolute perplexity increase)"
    if baseline is None:
        raise PlanError(
            f"{name} {text}: a share of the baseline perplexity needs a sensitivity file that records "
            "it; give an absolute perplexity increase"
        )
    return number / 100 * baseline, f"{name} = {text} of the baseline calibration perplexity {baseline:.4g}"


def thresholds(state: dict, t1: float | str | None, t2: float | str | None) -> dict:
    """t1 and t2 with the rule that gave them: a quantile of all blocks' sensitivities (default), an
    absolute perplexity increase (``0.5``) or a share of the baseline calibration perplexity (``2%``)."""
    import statistics

    quantiles = statistics.quantiles([float(s) for s in state["sensitivity"].values()], n=3, method="inclusive")
    baseline = state.get("ppl", {}).get(str(state["n_layers"]))
    out, rules = {}, []
    for name, value, q, share in (("t1", t1, quantiles[0], "1/3"), ("t2", t2, quantiles[1], "2/3")):
        if value is None or str(value).strip() == "":
            out[name] = q
            rules.append(f"{name} = {share} quantile (inclusive) of all blocks' sensitivities")
        else:
            out[name], rule = _threshold(name, value, baseline)
            rules.append(rule)
    if out["t1"] > out["t2"]:
        raise PlanError(f"t1 {out['t1']} is above t2 {out['t2']}: thresholds must satisfy t1 <= t2")
    return out | {"rule": "; ".join(rules)}


def make_plan(
    state: dict, budget: str, t1: float | str | None = None, t2: float | str | None = None, variant: str = "zs+b2b+hg"
) -> Plan:
    """SPD on the least sensitive blocks up to ``budget``, classified by the thresholds."""
    check_variant(variant, PlanError)
    sens = {int(b): s for b, s in state["sensitivity"].items()}
    n_layers = state["n_layers"]
    if sorted(sens) != list(range(n_layers)):
        raise PlanError("the sensitivity analysis is unfinished: re-run `spdbench spd sensitivity` to complete it")
    limits = thresholds(state, t1, t2)
    n = parse_budget(budget, n_layers)
    chosen = sorted(sens, key=lambda b: (sens[b], b))[:n]
    blocks = {}
    for b in sorted(sens):
        mode = classify(sens[b], limits["t1"], limits["t2"]) if b in chosen else "tp"
        mode = {"zs": {"b2b": "zs", "hg+b2b": "zs"}, "zs+b2b": {"hg+b2b": "b2b"}}.get(variant, {}).get(mode, mode)
        blocks[b] = {"mode": mode, "sensitivity": sens[b]}
    return Plan(
        state["model"],
        state["tp"],
        blocks,
        thresholds=limits,
        budget={"requested": budget, "blocks": n, "of": n_layers, "variant": variant},
    )


def plan_for_blocks(model: str, tp: int, n_layers: int, blocks: str, variant: str) -> Plan:
    """SPD on the given blocks (``all``, ``last:K`` or ``i,j,...``), without a sensitivity analysis:
    every block gets the variant's mode (zs, b2b, or hg+b2b)."""
    check_variant(variant, PlanError)
    chosen = parse_blocks(blocks, n_layers, error=PlanError)
    return Plan(
        model,
        tp,
        {b: {"mode": strongest_mode(variant)} for b in sorted(chosen)},
        budget={"requested": f"blocks {blocks}", "blocks": len(chosen), "of": n_layers, "variant": variant},
    )


def restrict(plan: Plan, budget: str) -> Plan:
    """The same plan (modes, layouts, weights) with SPD only on its ``budget`` least sensitive blocks."""
    n = parse_budget(budget, len(plan.blocks))
    chosen = sorted(
        (b for b in plan.blocks if plan.mode(b) != "tp"), key=lambda b: (plan.blocks[b].get("sensitivity", 0.0), b)
    )[:n]
    if len(chosen) < n:
        raise PlanError(f"budget {budget}: the plan has only {len(chosen)} SPD blocks")
    blocks = {b: e if b in chosen else {**e, "mode": "tp"} for b, e in plan.blocks.items()}
    return Plan(
        plan.model,
        plan.tp,
        blocks,
        plan.thresholds,
        {**(plan.budget or {}), "requested": budget, "blocks": n},
        plan.weights,
        plan.distill,
        plan.path,
    )
