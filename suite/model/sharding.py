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
from suite.model.llama import Block, Transformer, head_dim
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


def build_weightless_rank_model(
    config: LlamaConfig, tp: int, rank: int, dtype: torch.dtype, layout: Layout | None = None
) -> Transformer:
    """Rank ``rank``'s shard with its real shapes and dtype and no weights (meta tensors): for costing
    the work of a forward pass, never for computing one."""
    with torch.device("meta"):
        blocks = [_empty_block(config, layer[rank]) for layer in layout or default_layout(config, tp)]
        model = Transformer(config, blocks).to(dtype)
    return model.eval().requires_grad_(False)


def _empty_block(config: LlamaConfig, shard: BlockShard) -> Block:
    """A block of ``shard``'s shapes on the current device (meta: no weights)."""
    return Block(config, shard.kv_of_q, len(shard.kv_heads), shard.ffn[1] - shard.ffn[0])


# A block's tensors: (parameter name, dim that is split, what it is split by: query heads, KV heads,
# FFN columns, or nothing - replicated on every rank).
BLOCK_TENSORS = (
    ("self_attn.q_proj.weight", 0, "q"),
    ("self_attn.k_proj.weight", 0, "kv"),
    ("self_attn.v_proj.weight", 0, "kv"),
    ("self_attn.o_proj.weight", 1, "q"),
    ("mlp.gate_proj.weight", 0, "ffn"),
    ("mlp.up_proj.weight", 0, "ffn"),
    ("mlp.down_proj.weight", 1, "ffn"),
    ("input_layernorm.weight", 0, None),
    ("post_attention_layernorm.weight", 0, None),
)


def shard_ranges(shard: BlockShard, split: str | None, hd: int) -> Ranges | None:
    """The rows/columns of a block tensor split by ``split`` that ``shard`` holds (None: all)."""
    return {
        "q": lambda: _runs(shard.q_heads, hd),
        "kv": lambda: _runs(shard.kv_heads, hd),
        "ffn": lambda: [shard.ffn],
        None: lambda: None,
    }[split]()


def _block(config: LlamaConfig, shard: BlockShard, state: dict[str, torch.Tensor], device) -> Block:
    with torch.device("meta"):
        block = _empty_block(config, shard)
    block.load_state_dict(state, assign=True)
    # A buffer that is not a weight (the head map) is rebuilt off the meta device.
    block.self_attn.kv_of_q = torch.tensor(shard.kv_of_q, dtype=torch.long, device=device)
    return block


def _narrow(t: torch.Tensor, dim: int, ranges: Ranges | None) -> torch.Tensor:
    return t if ranges is None else torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def build_blocks(
    source: ModelSource, layer: int, shards: list[BlockShard], dtype: torch.dtype, device: torch.device
) -> list[Block]:
    """Block ``layer`` of every rank (one shard per rank) in one process, each tensor read once."""
    config, hd = source.config, head_dim(source.config)
    states: list[dict] = [{} for _ in shards]
    for name, dim, split in BLOCK_TENSORS:
        full = source.weights.read(f"model.layers.{layer}.{name}").to(device=device, dtype=dtype)
        for state, shard in zip(states, shards):
            state[name] = _narrow(full, dim, shard_ranges(shard, split, hd)).clone()
        del full
    return [_block(config, s, state, device).eval().requires_grad_(False) for s, state in zip(shards, states)]


def unshard_block(blocks: list[Block], shards: list[BlockShard], config: LlamaConfig, layer: int) -> dict:
    """The full tensors of block ``layer`` (model names) from its rank blocks: the inverse of ``build_blocks``.

    A tensor held by several ranks (norms, replicated KV heads) is taken from the last of them.
    """
    hd, out = head_dim(config), {}
    for name, dim, split in BLOCK_TENSORS:
        parts = [(b.get_parameter(name).detach(), shard_ranges(s, split, hd)) for b, s in zip(blocks, shards)]
        shape = list(parts[0][0].shape)
        shape[dim] = max((b for _, ranges in parts for _, b in ranges or []), default=shape[dim])
        full = parts[0][0].new_empty(shape)
        for tensor, ranges in parts:
            offset = 0
            for a, b in ranges or [(0, shape[dim])]:
                full.narrow(dim, a, b - a).copy_(tensor.narrow(dim, offset, b - a))
                offset += b - a
        out[f"model.layers.{layer}.{name}"] = full
    return out


def build_ends(source: ModelSource, dtype: torch.dtype, device: torch.device, blocks=()) -> Transformer:
    """The replicated ends of the model (embedding, final norm, lm_head, RoPE) around ``blocks``."""
    config = source.config
    with torch.device("meta"):
        model = Transformer(config, list(blocks))

    def load(name: str) -> torch.Tensor:
        return source.weights.read(name).to(device=device, dtype=dtype)

    model.load_state_dict(
        {
            "embed_tokens.weight": load("model.embed_tokens.weight"),
            "norm.weight": load("model.norm.weight"),
            "lm_head.weight": load("lm_head.weight"),
        },
        assign=True,
        strict=False,
    )
    model.rotary = type(model.rotary)(config).to(device)  # RoPE frequencies are rebuilt off the meta device
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise RuntimeError(f"model left weights unloaded: {missing[:3]}")
    return model.eval().requires_grad_(False)


def build_rank_model(
    source: ModelSource, tp: int, rank: int, dtype: torch.dtype, device: torch.device, layout: Layout | None = None
) -> Transformer:
    """Rank ``rank``'s shard of the model, built on the meta device and filled tensor by tensor."""
    config, hd = source.config, head_dim(source.config)
    layout = layout or default_layout(config, tp)

    def load(name: str, dim: int, ranges: Ranges | None) -> torch.Tensor:
        return source.weights.read(name, dim, ranges).to(device=device, dtype=dtype)

    blocks = [
        _block(
            config,
            s,
            {
                name: load(f"model.layers.{i}.{name}", dim, shard_ranges(s, split, hd))
                for name, dim, split in BLOCK_TENSORS
            },
            device,
        )
        for i, s in enumerate(ranks[rank] for ranks in layout)
    ]
    return build_ends(source, dtype, device, blocks)
