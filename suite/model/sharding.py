"""Exact Megatron sharding of a LLaMA for rank i of N.

Attention is split by whole query heads (q_proj rows, o_proj columns); MLP by FFN columns
(gate/up rows, down columns). Head counts that N does not divide give ranks uneven head
counts; a rank holds every KV head its query heads read, so KV heads are replicated when
there are fewer of them than ranks (as vLLM does). Nothing is padded: the sum of the
partials over ranks is exactly the single-device block output.

Embeddings, final norm and lm_head are replicated on every rank (as gpt-fast does): the
strategies under study differ only in the per-block syncs, which this keeps isolated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from suite.errors import SpdbenchError
from suite.model.llama import Block, Transformer
from suite.model.sources import ModelSource, Ranges


def split_evenly(n: int, parts: int) -> list[range]:
    """Contiguous ranges covering 0..n-1; the first n % parts ranges are one longer."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclass(frozen=True)
class BlockShard:
    """What one rank holds of one decoder block."""

    q_heads: tuple[int, ...]  # global query heads, in local order
    ffn: tuple[int, int]  # FFN column range [start, stop)
    group: int  # query heads per KV head

    @property
    def kv_heads(self) -> tuple[int, ...]:
        return tuple(sorted({h // self.group for h in self.q_heads}))

    @property
    def kv_of_q(self) -> list[int]:
        """For each local query head, the index of its KV head among ``kv_heads``."""
        local = {kv: i for i, kv in enumerate(self.kv_heads)}
        return [local[h // self.group] for h in self.q_heads]


Layout = list[list[BlockShard]]  # [layer][rank]


class ShardingError(SpdbenchError):
    """The model cannot be split as asked."""


def check_tp(config: LlamaConfig, tp: int) -> None:
    heads = config.num_attention_heads
    if not 1 <= tp <= heads:
        raise ShardingError(f"tp {tp} is invalid: it must be between 1 and the model's {heads} attention heads")


def default_layout(config: LlamaConfig, tp: int) -> Layout:
    check_tp(config, tp)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv
    head_ranges = split_evenly(heads, tp)
    ffn_ranges = split_evenly(config.intermediate_size, tp)
    per_rank = [BlockShard(tuple(h), (f.start, f.stop), group) for h, f in zip(head_ranges, ffn_ranges)]
    return [list(per_rank) for _ in range(config.num_hidden_layers)]


def _runs(items: tuple[int, ...], width: int) -> Ranges:
    """Index ranges (in units of ``width``) for a list of items, merging consecutive ones."""
    runs: Ranges = []
    for i in items:
        if runs and runs[-1][1] == i * width:
            runs[-1] = (runs[-1][0], (i + 1) * width)
        else:
            runs.append((i * width, (i + 1) * width))
    return runs


def _skeleton(config: LlamaConfig, rank: int, layout: Layout) -> Transformer:
    """Rank ``rank``'s shard with every tensor on the meta device (shapes only)."""
    with torch.device("meta"):
        blocks = [Block(config, s.kv_of_q, len(s.kv_heads), s.ffn[1] - s.ffn[0]) for s in (l[rank] for l in layout)]
        return Transformer(config, blocks)


def build_weightless_rank_model(config: LlamaConfig, tp: int, rank: int, dtype: torch.dtype,
                                layout: Layout | None = None) -> Transformer:
    """Rank ``rank``'s shard with its real shapes and dtype and no weights (meta tensors): for costing
    the work of a forward pass, never for computing one."""
    model = _skeleton(config, rank, layout or default_layout(config, tp)).to(dtype)
    return model.eval().requires_grad_(False)


def build_rank_model(source: ModelSource, tp: int, rank: int, dtype: torch.dtype, device: torch.device,
                     layout: Layout | None = None) -> Transformer:
    """Rank ``rank``'s shard of the model, built on the meta device and filled tensor by tensor."""
    config = source.config
    layout = layout or default_layout(config, tp)
    hd = config.head_dim or config.hidden_size // config.num_attention_heads
    model = _skeleton(config, rank, layout)

    def load(name: str, dim: int = 0, ranges: Ranges | None = None) -> torch.Tensor:
        return source.weights.read(name, dim, ranges).to(device=device, dtype=dtype)

    state = {"embed_tokens.weight": load("model.embed_tokens.weight"), "norm.weight": load("model.norm.weight"),
             "lm_head.weight": load("lm_head.weight")}
    for i, shards in enumerate(layout):
        s, p = shards[rank], f"model.layers.{i}."
        q, kv, ffn = _runs(s.q_heads, hd), _runs(s.kv_heads, hd), [s.ffn]
        state |= {f"layers.{i}.self_attn.q_proj.weight": load(p + "self_attn.q_proj.weight", 0, q),
                  f"layers.{i}.self_attn.k_proj.weight": load(p + "self_attn.k_proj.weight", 0, kv),
                  f"layers.{i}.self_attn.v_proj.weight": load(p + "self_attn.v_proj.weight", 0, kv),
                  f"layers.{i}.self_attn.o_proj.weight": load(p + "self_attn.o_proj.weight", 1, q),
                  f"layers.{i}.mlp.gate_proj.weight": load(p + "mlp.gate_proj.weight", 0, ffn),
                  f"layers.{i}.mlp.up_proj.weight": load(p + "mlp.up_proj.weight", 0, ffn),
                  f"layers.{i}.mlp.down_proj.weight": load(p + "mlp.down_proj.weight", 1, ffn),
                  f"layers.{i}.input_layernorm.weight": load(p + "input_layernorm.weight"),
                  f"layers.{i}.post_attention_layernorm.weight": load(p + "post_attention_layernorm.weight")}
    model.load_state_dict(state, assign=True, strict=False)
    # Buffers that are not weights (RoPE frequencies, head maps) are rebuilt off the meta device.
    model.rotary = type(model.rotary)(config).to(device)
    for block, s in zip(model.layers, (l[rank] for l in layout)):
        block.self_attn.kv_of_q = torch.tensor(s.kv_of_q, dtype=torch.long, device=device)
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise RuntimeError(f"shard of rank {rank} left weights unloaded: {missing[:3]}")
    return model.eval().requires_grad_(False)
