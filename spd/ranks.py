"""A decoder block's N rank shards in one process, run by the SPD schedule itself.

SPD's tooling (sensitivity, B2B distillation, head grouping) needs every rank's view of a block
in one process. ``RankBlocks`` holds the rank blocks that ``suite.model.sharding`` builds for N
ranks and runs them with ``spd.strategy.run_blocks`` on a ``LocalGroup`` (N threads whose
collectives sum in-process), so the tooling computes what N ranks compute:

    TP block:  run_blocks([block_i], X, comm_i, ctx, drop=set())
    SPD block: run_blocks([block_i], X, comm_i, ctx, drop={0})

``BlockStream`` runs the unmodified model over calibration windows one block at a time: the
embedding, then each block built from the weights, run and released. Memory holds one block
(and the replicated embedding, final norm and lm_head) plus the activations, never the whole
model. Windows are [rows, length] token ids from position 0, unpadded (causal attention);
activations are [rows, length, hidden], float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from spd.strategy import run_blocks
from suite.model.llama import Transformer, head_dim
from suite.model.sharding import BlockShard, build_blocks, build_ends, default_layout, unshard_block
from suite.model.sources import ModelSource
from suite.parallel.comm import LocalGroup

NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
KV = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")


def window_context(ends: Transformer, rows: int, length: int):
    """The forward context of ``rows`` unpadded windows of ``length`` tokens from position 0."""
    device = ends.embed_tokens.weight.device
    return ends.context(torch.zeros(rows, dtype=torch.long, device=device), torch.arange(length, device=device), length)


class RankBlocks:
    """Block ``layer`` of every rank (one ``BlockShard`` per rank), in one process."""

    def __init__(self, ends: Transformer, source: ModelSource, layer: int, shards: list[BlockShard]):
        self.ends, self.config, self.layer, self.shards = ends, source.config, layer, shards
        self.device = ends.embed_tokens.weight.device
        self.blocks = build_blocks(source, layer, shards, torch.float32, self.device)
        self.group = LocalGroup(len(shards))

    def _context(self, x: torch.Tensor):
        rows, length, _ = x.shape
        for block in self.blocks:  # a fresh cache per call: autograd may still hold the last one
            block.self_attn.setup_cache(rows, length, torch.float32, self.device)
        return window_context(self.ends, rows, length)

    def __call__(self, x: torch.Tensor, spd: bool = False) -> torch.Tensor:
        """The block's output on ``x`` as N ranks compute it: baseline TP, or SPD."""
        ctx, flat, drop = self._context(x), x.flatten(0, 1), {0} if spd else set()
        out = self.group.run(lambda comm, block: run_blocks([block], flat, comm, ctx, drop), self.blocks)
        return out[0].view_as(x)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of every query head (ranks in order), [heads, rows, length, length]."""
        ctx, flat = self._context(x), x.flatten(0, 1)
        return torch.cat([block.attention_probs(flat, ctx) for block in self.blocks], dim=1).transpose(0, 1)

    def attn_partials(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's attention partial o_proj_i(Attn_i(RMSNorm1(x))), [ranks, rows, length, hidden]."""
        ctx, flat = self._context(x), x.flatten(0, 1)
        return torch.stack([block.attn(flat, ctx).view_as(x) for block in self.blocks])

    def ffn(self, rank: int, h: torch.Tensor) -> torch.Tensor:
        """Rank ``rank``'s MLP partial on the stream ``h``."""
        return self.blocks[rank].ffn(h)

    def trainable(self, norms: bool) -> list[torch.nn.Parameter]:
        """Every rank's weights, the RMSNorm weights only if ``norms``; they then require grad."""
        params = [p for block in self.blocks for name, p in block.named_parameters() if norms or name not in NORMS]
        for p in params:
            p.requires_grad_(True)
        return params

    def _replicas(self) -> list[list[tuple[torch.nn.Parameter, slice]]]:
        """Parameter slices that hold the same weights on several ranks: the norms, shared KV heads."""
        hd, groups = head_dim(self.config), {}
        for block, shard in zip(self.blocks, self.shards):
            for name in NORMS:
                groups.setdefault(name, []).append((block.get_parameter(name), slice(None)))
            for i, kv in enumerate(shard.kv_heads):
                for name in KV:
                    groups.setdefault((name, kv), []).append((block.get_parameter(name), slice(i * hd, (i + 1) * hd)))
        return [g for g in groups.values() if len(g) > 1]

    def sync_replica_grads(self) -> None:
        """Give every copy of a replicated weight the summed gradient of all copies (what a
        gradient all-reduce over the ranks holding it does), so the copies stay equal."""
        for group in self._replicas():
            grads = [p.grad[rows] for p, rows in group if p.grad is not None]
            if grads:
                total = torch.stack(grads).sum(0)
                for g in grads:
                    g.copy_(total)

    def state(self) -> dict[str, torch.Tensor]:
        """The block's full tensors under their model names (for a safetensors file)."""
        return {n: t.contiguous() for n, t in unshard_block(self.blocks, self.shards, self.config, self.layer).items()}


class BlockStream:
    """Sets of calibration windows through the unmodified (TP = N) model, one block at a time."""

    def __init__(self, source: ModelSource, tp: int, device: torch.device, windows: list[torch.Tensor] = ()):
        self.source, self.layout = source, default_layout(source.config, tp)
        self.ends = build_ends(source, torch.float32, device)
        self.windows = [w.to(device) for w in windows]

    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        return self.ends.embed(windows.flatten()).view(*windows.shape, -1)

    def block(self, layer: int, shards: list[BlockShard] | None = None) -> RankBlocks:
        """Block ``layer`` of every rank: the Megatron layout, or ``shards``."""
        return RankBlocks(self.ends, self.source, layer, shards or self.layout[layer])

    @torch.no_grad()
    def blocks(self, last: int) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
        """For blocks 0..last: (block, each window set's input to it, its TP output). Each block is
        released before the next is built (``block(layer)`` builds it again for a caller)."""
        inputs = [self.embed(w) for w in self.windows]
        for layer in range(last + 1):
            block = self.block(layer)
            outputs = [block(x) for x in inputs]
            del block
            yield layer, inputs, outputs
            inputs = outputs
