"""The ``spd`` strategy: Sync-Point Drop on the blocks of a plan (Kim et al., ICML 2025).

An SPD block drops the attention sync; the MLP shard of rank i sees only its own attention
partial, and one all-reduce carries both partials:

    Y_i = o_proj_i(Attn_i(RMSNorm1(X)))
    Z_i = MLP_i(RMSNorm2(X + Y_i))
    out = X + AR(Y_i + Z_i)

Other blocks run as the baseline (two syncs). Which blocks drop comes from a plan file
(``plan=PLAN.json``, with distilled weights and head-grouped layouts) or, zero-shot, from
``blocks=all | last:K | i,j,...``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from spd.plan import OverlayWeights, Plan, PlanError, load_plan
from suite.sharding import build_rank_model
from suite.strategy import Strategy, register


def run_blocks(layers, h, comm, ctx, drop: set[int]):
    """The decoder stack with SPD on the block indices in ``drop`` and baseline TP elsewhere."""
    for i, layer in enumerate(layers):
        y = layer.attn(h, ctx)
        if i in drop:
            h = h + comm.all_reduce(y + layer.ffn(h + y))
        else:
            h = h + comm.all_reduce(y)
            h = h + comm.all_reduce(layer.ffn(h))
    return h


def parse_blocks(spec: str, n_layers: int | None) -> set[int]:
    """``all``, ``last:K`` or ``i,j,...`` -> block indices; ``n_layers=None`` checks the syntax only."""
    spec, limit = spec.strip(), n_layers if n_layers is not None else float("inf")
    try:
        if spec == "all":
            return set(range(n_layers or 0))
        if spec.startswith("last:"):
            k = int(spec[5:])
            if not 0 <= k <= limit:
                raise ValueError
            return set(range(n_layers - k, n_layers)) if n_layers is not None else set()
        blocks = {int(b) for b in spec.split(",") if b.strip()}
    except ValueError:
        raise PlanError(f"option blocks={spec!r}: expected all, last:K (0 <= K <= number of blocks) "
                        "or a comma-separated list of block indices") from None
    bad = sorted(b for b in blocks if not 0 <= b < limit)
    if bad:
        raise PlanError(f"option blocks={spec!r}: block {bad[0]} is out of range (the model has {n_layers} blocks)")
    return blocks


@register("spd")
@dataclass
class SPD(Strategy):
    plan: str = ""  # SPD plan file (from `spdbench spd plan` / `spd distill`)
    blocks: str = ""  # zero-shot SPD without a plan: all, last:K or i,j,...

    exact = False

    def __post_init__(self):
        if bool(self.plan) == bool(self.blocks):
            raise PlanError("strategy spd needs exactly one of the options plan=PLAN.json or "
                            "blocks=all|last:K|i,j,... (e.g. --spd-plan plan.json or --strategy-opt blocks=all)")
        self._plan: Plan | None = load_plan(self.plan) if self.plan else None
        self._drop: set[int] | None = None
        if self.blocks:
            parse_blocks(self.blocks, None)  # the syntax now; the range once the model is known

    def validate(self, source, tp: int) -> None:
        """Check the plan (or block list) against the model and N; raises PlanError."""
        n_layers = source.config.num_hidden_layers
        if self._plan:
            self._plan.validate(source, tp)
            self._drop = self._plan.spd_blocks()
        else:
            self._drop = parse_blocks(self.blocks, n_layers)

    def load_model(self, source, tp, rank, dtype, device):
        self.validate(source, tp)
        if not self._plan:
            return build_rank_model(source, tp, rank, dtype, device)
        weights = self._plan.weights_path()
        if weights and self._plan.distilled_blocks():
            source = replace(source, weights=OverlayWeights(source.weights, weights,
                                                            self._plan.distilled_blocks()))
        return build_rank_model(source, tp, rank, dtype, device, self._plan.layout(source.config, tp))

    def run_layers(self, layers, h, comm, ctx):
        if self._drop is None:
            raise PlanError("strategy spd was not validated against a model: call load_model or validate first")
        return run_blocks(layers, h, comm, ctx, self._drop)
