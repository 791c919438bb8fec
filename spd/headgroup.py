"""Head grouping (HG) for extremely sensitive blocks.

1. Each query head's attention map (probabilities on the calibration windows, flattened);
   D[a, b] = Euclidean distance between the maps of heads a and b.
2. Partition the heads over the N ranks maximising the sum of D over pairs of heads that share
   a rank. Exhaustive over all partitions when there are at most ``EXHAUSTIVE_LIMIT`` of them
   (e.g. 8 heads on 4 ranks, 9 heads on 4 ranks); otherwise a local search: start from the
   Megatron split and swap units between ranks while the objective improves.
3. Match head groups to MLP shards (the Megatron FFN ranges) maximising the summed norm of
   MLP_f(RMSNorm2(X + Y_g)), the MLP output before the residual add (all N! matchings for
   N <= 8, greedy beyond).

The maps and each head's o_proj contribution Y_h come from the model's own attention
(``Block.attention_probs`` and ``Block.attn``) on a layout with one query head per "rank";
the MLP outputs from the Megatron rank blocks.

Units that move: with GQA, query heads sharing a KV head move together when N divides the
number of KV heads (each rank then holds whole KV groups). Otherwise (e.g. SmolLM2: 3 KV heads
on 4 ranks, where Megatron already splits groups), or when ``split_kv_groups`` is set, single
query heads move, with the Megatron per-rank head counts; a rank loads every KV head its query
heads read (the sharding replicates KV heads), which keeps the math exact at the cost of extra
KV projections and KV cache on that rank (``kv_cost``). When KV heads = N (Llama-2-70B,
Llama-3-8B/70B at N = 8) whole groups can only trade places, which changes nothing: there
head grouping needs ``split_kv_groups``.
"""

from __future__ import annotations

import itertools
import math

import torch

from spd.ranks import BlockStream, RankBlocks
from suite.model.llama import head_dim
from suite.model.sharding import BlockShard, default_layout

EXHAUSTIVE_LIMIT = 200_000


def units_and_sizes(config, tp: int, split_kv_groups: bool = False) -> tuple[list[tuple[int, ...]], list[int]]:
    """The units that move together and how many units each rank gets."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv
    if kv % tp == 0 and not split_kv_groups:
        return [tuple(range(g * group, (g + 1) * group)) for g in range(kv)], [kv // tp] * tp
    return [(h,) for h in range(heads)], [len(s.q_heads) for s in default_layout(config, tp)[0]]


def _score(groups, dist: torch.Tensor) -> float:
    total = 0.0
    for g in groups:
        heads = [h for unit in g for h in unit]
        total += sum(dist[a][b] for a, b in itertools.combinations(heads, 2))
    return total


def _partitions(units, sizes):
    if not sizes:
        yield []
        return
    for first in itertools.combinations(units, sizes[0]):
        rest = [u for u in units if u not in first]
        for tail in _partitions(rest, sizes[1:]):
            yield [first, *tail]


def _count(n: int, sizes: list[int]) -> int:
    return math.factorial(n) // math.prod(math.factorial(s) for s in sizes)


def group_heads(dist: torch.Tensor, units, sizes) -> list[tuple]:
    """Partition ``units`` into groups of ``sizes`` maximising within-group head distance."""
    dist = dist.tolist()
    if _count(len(units), sizes) <= EXHAUSTIVE_LIMIT:
        return max(_partitions(units, sizes), key=lambda p: _score(p, dist))
    bounds = list(itertools.accumulate([0, *sizes]))
    groups = [list(units[a:b]) for a, b in zip(bounds, bounds[1:])]
    improved = True
    while improved:
        improved = False
        for g1, g2 in itertools.combinations(range(len(groups)), 2):
            for i, j in itertools.product(range(len(groups[g1])), range(len(groups[g2]))):
                before = _score([groups[g1], groups[g2]], dist)
                groups[g1][i], groups[g2][j] = groups[g2][j], groups[g1][i]
                if _score([groups[g1], groups[g2]], dist) > before + 1e-9:
                    improved = True
                else:
                    groups[g1][i], groups[g2][j] = groups[g2][j], groups[g1][i]
    return [tuple(g) for g in groups]


def match_ffn(norms: torch.Tensor) -> list[int]:
    """``norms[g, f]``: MLP-shard f's output norm for head group g; returns f for each g (max total)."""
    n = norms.shape[0]
    if n <= 8:
        return list(
            max(itertools.permutations(range(n)), key=lambda p: sum(norms[g, f].item() for g, f in enumerate(p)))
        )
    choice, free = [], set(range(n))
    for g in range(n):
        f = max(free, key=lambda f: norms[g, f].item())
        choice.append(f)
        free.remove(f)
    return choice


@torch.no_grad()
def head_grouping(
    stream: BlockStream, megatron: RankBlocks, x: torch.Tensor, split_kv_groups: bool = False
) -> list[dict]:
    """The HG layout of ``megatron``'s block from its calibration inputs ``x`` [S, length, hidden]:
    one entry per rank."""
    config, tp = stream.source.config, len(megatron.shards)
    per_head = stream.block(megatron.layer, default_layout(config, config.num_attention_heads)[megatron.layer])
    maps = per_head.attention_probs(x).flatten(1)
    partials = per_head.attn_partials(x)  # each head's o_proj contribution, [heads, S, length, hidden]
    del per_head
    dist = torch.cdist(maps, maps)
    units, sizes = units_and_sizes(config, tp, split_kv_groups)
    groups = [sorted(h for unit in g for h in unit) for g in group_heads(dist, units, sizes)]
    norms = torch.tensor(
        [[megatron.ffn(f, x + partials[g].sum(0)).norm(dim=-1).mean().item() for f in range(tp)] for g in groups]
    )
    ffn = match_ffn(norms)
    return [{"q_heads": g, "ffn": list(megatron.shards[f].ffn)} for g, f in zip(groups, ffn)]


def shards_of(layout: list[dict], config) -> list[BlockShard]:
    group = config.num_attention_heads // config.num_key_value_heads
    return [BlockShard(tuple(r["q_heads"]), tuple(r["ffn"]), group) for r in layout]


def kv_cost(config, shards: list[BlockShard]) -> dict:
    """What a layout's KV replication costs against the Megatron layout, per token of this block.

    K and V heads held per rank; extra KV cache elements (K and V, all ranks together and on the
    heaviest rank) and extra K/V projection FLOPs (2 x hidden x head_dim per head, for K and V)."""
    megatron = default_layout(config, len(shards))[0]
    held, base = [len(s.kv_heads) for s in shards], [len(s.kv_heads) for s in megatron]
    hd, extra = head_dim(config), sum(held) - sum(base)
    return {
        "kv_heads": held,
        "megatron_kv_heads": base,
        "extra_kv_heads": extra,
        "extra_kv_cache_elements_per_token": 2 * hd * extra,
        "heaviest_rank_kv_factor": max(held) / max(base),
        "extra_kv_proj_flops_per_token": 2 * 2 * config.hidden_size * hd * extra,
    }
