"""The ``spd`` strategy: Sync-Point Drop on the blocks of a plan (Kim et al., ICML 2025).

An SPD block drops the attention sync; the MLP shard of rank i sees only its own attention
partial, and one all-reduce carries both partials:

    Y_i = o_proj_i(Attn_i(RMSNorm1(X)))
    Z_i = MLP_i(RMSNorm2(X + Y_i))
    out = X + AR(Y_i + Z_i)

Other blocks run as the baseline (two syncs). Which blocks drop comes from a plan file
(``plan=PLAN.json``, with distilled weights and head-grouped layouts) or, zero-shot, from
``blocks=all | last:K | i,j,...``.

An SPD block is one synced module (it reads the residual stream X itself); the syncs run on the
default schedule, each all-reduced before the next module reads the stream. The composites in
``spd.composite`` run the same modules on ladder's or TokenWeave's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spd.plan_file import OverlayWeights, Plan, PlanError, load_plan
from suite.parallel.strategy import Strategy, SyncedModule, all_reduce_each, megatron_modules, register
from suite.vocabulary import parse_blocks


def spd_modules(layers, drop: set[int]) -> list[SyncedModule]:
    """The stack's synced modules: a block in ``drop`` is one, Y_i + MLP_i(RMSNorm2(X + Y_i)); others two."""

    def merged(i, layer) -> SyncedModule:
        def run(x, ctx, normed=None):  # normed: RMSNorm1(X), when the stream formed X with it
            y = layer.self_attn(layer.input_layernorm(x) if normed is None else normed, ctx)
            _, u = layer.post_attention_layernorm.add_forward(x, y)  # X + Y_i and its norm, one region
            return y + layer.mlp(u)

        return SyncedModule(i, None, run, stream_norm=layer.input_layernorm)

    return [
        m for i, layer in enumerate(layers) for m in ([merged(i, layer)] if i in drop else megatron_modules(i, layer))
    ]


def run_blocks(layers, h, comm, ctx, drop: set[int]):
    """The decoder stack with SPD on the block indices in ``drop`` and baseline TP elsewhere."""
    return all_reduce_each(spd_modules(layers, drop), h, comm, ctx)


@register("spd")
@dataclass
class SPD(Strategy):
    plan: str = ""  # SPD plan file (from `spdbench spd plan` / `spd distill`)
    blocks: str = ""  # zero-shot SPD without a plan: all, last:K or i,j,...

    exact = False
    changes_model = True

    def __post_init__(self):
        if bool(self.plan) == bool(self.blocks):
            raise PlanError(
                f"strategy {self.name} needs exactly one of the options plan=PLAN.json or "
                "blocks=all|last:K|i,j,... (e.g. --spd-plan plan.json or --strategy-opt blocks=all)"
            )
        self._plan: Plan | None = load_plan(self.plan) if self.plan else None
        self._drop: set[int] | None = None
        self._n_layers: int | None = None
        if self.blocks:
            parse_blocks(self.blocks, None, error=PlanError)  # the syntax now; the range once the model is known

    def bind(self, source, tp: int) -> None:
        """Check the plan (or block list) against the model and N; raises PlanError."""
        self._n_layers = source.config.num_hidden_layers
        if self._plan:
            self._plan.validate(source, tp)
            self._drop = self._plan.spd_blocks()
        else:
            self._drop = parse_blocks(self.blocks, self._n_layers, error=PlanError)

    def layout(self, config, tp):
        return self._plan.layout(config, tp) if self._plan else super().layout(config, tp)

    def weights(self, source):
        path = self._plan.weights_path() if self._plan else None
        if path and self._plan.distilled_blocks():
            return OverlayWeights(source.weights, path, self._plan.distilled_blocks())
        return source.weights

    def model_key(self) -> str | None:
        """A plan may regroup heads and carry distilled weights: its own model; zero-shot blocks run the plain one."""
        return f"spd-plan:{Path(self.plan).resolve()}" if self._plan else None

    def describe(self) -> dict:
        if self._drop is None:
            return {}
        variant = (self._plan.budget or {}).get("variant") if self._plan else "zs"
        return {"spd_variant": variant, "spd_blocks_pct": 100.0 * len(self._drop) / self._n_layers}

    def modules(self, layers):
        if self._drop is None:
            raise PlanError(f"strategy {self.name} is not bound to a model: call bind(source, tp) first")
        return spd_modules(layers, self._drop)
