"""One decoder block's N shards computed explicitly in a single process (for B2B and HG).

Each rank's partials are the same slices of the same full weights the sharded model loads
(``suite.model.sharding``), so the sums below are the all-reduces of the multi-rank model:

    TP:  H = X + sum_i Y_i;          out = H + sum_i MLP_i(RMSNorm2(H))
    SPD: out = X + sum_i (Y_i + MLP_i(RMSNorm2(X + Y_i)))

Inputs are full windows ``[batch, length, hidden]`` (no padding, causal attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from suite.parallel.comm import Communicator
from suite.model.sharding import BlockShard, build_rank_model, default_layout
from spd.strategy import run_blocks

WEIGHTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
           "input_layernorm.weight", "post_attention_layernorm.weight")
NORMS = WEIGHTS[-2:]


class ShardedBlock(nn.Module):
    def __init__(self, config, weights: dict[str, torch.Tensor], shards: list[BlockShard]):
        super().__init__()
        self.config, self.shards = config, shards
        self.n_q, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.hd = config.head_dim or config.hidden_size // self.n_q
        self.w = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(weights[n].detach().clone().float())
                                   for n in WEIGHTS})
        self.rotary = LlamaRotaryEmbedding(config)

    @classmethod
    def load(cls, source, block: int, shards: list[BlockShard]) -> ShardedBlock:
        return cls(source.config, {n: source.weights.read(f"model.layers.{block}.{n}") for n in WEIGHTS}, shards)

    def weight(self, name: str) -> torch.Tensor:
        return self.w[name.replace(".", "/")]

    def state(self, block: int) -> dict[str, torch.Tensor]:
        """The block's tensors under their model names (for a safetensors file)."""
        return {f"model.layers.{block}.{n}": self.weight(n).detach().contiguous() for n in WEIGHTS}

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.weight(name) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps))

    def _qkv(self, x: torch.Tensor):
        b, length, _ = x.shape
        u = self.norm(x, "input_layernorm.weight")
        q = F.linear(u, self.weight("self_attn.q_proj.weight")).view(b, length, self.n_q, self.hd).transpose(1, 2)
        k = F.linear(u, self.weight("self_attn.k_proj.weight")).view(b, length, self.n_kv, self.hd).transpose(1, 2)
        v = F.linear(u, self.weight("self_attn.v_proj.weight")).view(b, length, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = self.rotary(x, torch.arange(length, device=x.device).expand(b, -1))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        group = self.n_q // self.n_kv
        return q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def head_partials(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's o_proj contribution, [heads, batch, length, hidden]."""
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, length, hd]
        wo = self.weight("self_attn.o_proj.weight").view(-1, self.n_q, self.hd)  # [hidden, heads, hd]
        return torch.einsum("bhld,ehd->hble", out, wo)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities per head, [heads, batch, length, length]."""
        q, k, _ = self._qkv(x)
        scores = q @ k.transpose(-1, -2) / self.hd ** 0.5
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1).transpose(0, 1)

    def mlp(self, h: torch.Tensor, ffn: tuple[int, int]) -> torch.Tensor:
        a, b = ffn
        u = self.norm(h, "post_attention_layernorm.weight")
        gate = F.linear(u, self.weight("mlp.gate_proj.weight")[a:b])
        up = F.linear(u, self.weight("mlp.up_proj.weight")[a:b])
        return F.linear(F.silu(gate) * up, self.weight("mlp.down_proj.weight")[:, a:b])

    def attn_partials(self, x: torch.Tensor) -> list[torch.Tensor]:
        heads = self.head_partials(x)
        return [heads[list(s.q_heads)].sum(0) for s in self.shards]

    def tp(self, x: torch.Tensor) -> torch.Tensor:
        h = x + sum(self.attn_partials(x))
        return h + sum(self.mlp(h, s.ffn) for s in self.shards)

    def spd(self, x: torch.Tensor) -> torch.Tensor:
        return x + sum(y + self.mlp(x + y, s.ffn) for y, s in zip(self.attn_partials(x), self.shards))


@torch.no_grad()
def block_inputs(source, windows: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering every block of the unmodified model: L tensors [S, length, hidden]."""
    model = build_rank_model(source, 1, 0, torch.float32, torch.device("cpu"))
    comm, (n, length) = Communicator(), windows.shape
    model.setup_cache(n, length)
    ctx = model.context(torch.zeros(n, dtype=torch.long), torch.arange(length), length)
    h, out = model.embed(windows.flatten()), []
    for layer in model.layers:
        out.append(h.view(n, length, -1))
        h = run_blocks([layer], h, comm, ctx, drop=set())
    return out


def default_shards(config, tp: int, block: int = 0) -> list[BlockShard]:
    return default_layout(config, tp)[block]
