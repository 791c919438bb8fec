"""The SPD plan file: which blocks drop their attention sync, and how each is prepared.

A small versioned JSON file, read and checked here (the policy that fills it: ``spd.plan``)::

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
from suite.vocabulary import SPD_MODES

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
