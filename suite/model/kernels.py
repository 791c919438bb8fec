"""Kernel modes of a rank model: ``eager`` runs the model math op by op as written; ``compiled`` runs it as a
deployment does (docs/kernels.md).

``compiled``, for every strategy alike (the strategies only call the blocks' modules):

- q/k/v and gate/up are merged into one GEMM each (the sharded weights, concatenated: exact);
- each module body between two syncs is compiled by Inductor (regional compilation: one compiled region per
  module kind, shared by every block): RMSNorm, the q/k/v projection with RoPE, the SwiGLU MLP; the residual
  add after a sync and the norm that reads its sum are one region (``RMSNorm.add_forward``, which the
  strategies call through ``ResidualStream``). The strategies' schedules and collectives stay their own
  Python code;
- masked GQA attention folds each KV head's query group into the query length (no repeated K/V), and the
  runner's decode reads a power-of-two bound of the filled cache instead of the whole cache.
"""

from __future__ import annotations

import torch

from suite.defaults import KERNELS
from suite.errors import SpdbenchError
from suite.model.llama import Transformer

RECOMPILE_LIMIT = 64  # compiled variants of one region (shapes) before a run fails


def apply_kernels(model: Transformer, kernels: str) -> Transformer:
    """Put ``model`` in kernel mode ``kernels`` (once, after its weights are loaded)."""
    if kernels not in KERNELS:
        raise SpdbenchError(f"kernels {kernels!r}: choose one of {', '.join(KERNELS)}")
    if kernels == model.kernels:
        return model
    if model.kernels != "eager":
        raise SpdbenchError(f"kernels: a {model.kernels} model cannot be turned {kernels}; load it again")
    # Shapes that differ (prefill, decode, token-split halves, uneven shards) recompile a region a few times;
    # past the limit torch would quietly run it eager: fail instead.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        attn.merge_projections()
        mlp.merge_projections()
        attn.project = torch.compile(attn._project, fullgraph=True)
        attn.fold_groups = True
        mlp.compile(fullgraph=True)
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.compile(fullgraph=True)
            norm.add_forward = torch.compile(norm.add_forward, fullgraph=True)
    model.norm.compile(fullgraph=True)
    model.kernels = kernels
    return model
