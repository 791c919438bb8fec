"""The rank-local LLaMA: the model math for one tensor-parallel rank, and nothing else.

Every module that tensor parallelism splits returns a full-width *partial* output
(``Attention``: o_proj over this rank's heads; ``MLP``: down_proj over this rank's FFN
columns). Summing the partials over ranks gives the single-device result; *when* and *how*
that sum happens is the strategy's business (``suite.parallel.strategy``), never the model's.

Activations travel as a flat ``[tokens, hidden]`` stream; a ``ForwardContext`` says which
rows of the batch and which cache positions those tokens are, so strategies may cut the
stream anywhere (token splitting) and attention still sees the right keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, RMSNorm(x + delta))``: a residual add and the norm that reads its sum, one region (one
        kernel compiled)."""
        h = x + delta
        return h, self(h)


@dataclass
class Segment:
    """A rectangle of the batch: ``rows`` x ``len(slots)`` tokens, contiguous in the flat stream.

    A ``causal`` segment holds rows without padding whose tokens are the last ``length`` of cache
    positions ``0 .. kv_len-1``, each attending to every key up to its own: causal attention aligned
    to the lower right (SDPA's ``is_causal`` when ``length == kv_len``), with no mask built.
    Otherwise ``mask`` says where attention is allowed.
    """

    tokens: slice  # position of the rectangle in the flat token stream
    rows: slice  # batch rows (= KV-cache rows)
    slots: torch.Tensor  # [length] cache positions these tokens occupy
    kv_len: int  # cache positions attended to (keys 0 .. kv_len-1)
    mask: torch.Tensor | None  # [rows, 1, length, kv_len] True where attention is allowed (None: causal)
    cos: torch.Tensor  # [rows, length, head_dim]
    sin: torch.Tensor
    causal: bool = False

    @property
    def n_rows(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def length(self) -> int:
        return self.slots.shape[0]

    def attention_mask(self):
        """``(attn_mask, is_causal)`` for SDPA: the causal kernels for causal segments, else the mask."""
        if not self.causal:
            return self.mask, False
        if self.length == self.kv_len:
            return None, True
        return causal_lower_right(self.length, self.kv_len), False

    def allowed(self) -> torch.Tensor:
        """Where attention is allowed, as a boolean mask (built for a causal segment too)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.length, self.kv_len, dtype=torch.bool, device=self.slots.device).tril(
            self.kv_len - self.length
        )

    def sub(self, rows: slice, cols: slice, offset: int) -> Segment:
        """The sub-rectangle ``rows x cols`` (relative), placed at ``offset`` in a new stream (a segment
        of the same class).

        Slots ascend by one, so the keys after ``cols`` are not needed; a causal segment's part
        after a cut is the lower-right-aligned causal part of the same rows."""
        slots = self.slots[cols]
        n = (rows.stop - rows.start) * slots.shape[0]
        kv_len = self.kv_len - (self.length - cols.stop)
        return replace(
            self,
            tokens=slice(offset, offset + n),
            rows=slice(self.rows.start + rows.start, self.rows.start + rows.stop),
            slots=slots,
            kv_len=kv_len,
            mask=None if self.mask is None else self.mask[rows, :, cols, :kv_len],
            cos=self.cos[rows, cols],
            sin=self.sin[rows, cols],
        )


@dataclass
class ForwardContext:
    """The tokens of one forward call, as segments of the flat stream (in order)."""

    segments: list[Segment]

    def split(self, at: int) -> tuple[ForwardContext, ForwardContext]:
        """Cut the stream after ``at`` tokens; a row that straddles the cut is split in two."""
        first, second = [], []
        for seg in self.segments:
            start, stop, width = seg.tokens.start, seg.tokens.stop, seg.length
            if stop <= at:
                first.append(seg.sub(slice(0, seg.n_rows), slice(0, width), seg.tokens.start))
                continue
            if start >= at:
                second.append(seg.sub(slice(0, seg.n_rows), slice(0, width), start - at))
                continue
            full_rows, rest = divmod(at - start, width)
            pieces = [
                (first, slice(0, full_rows), slice(0, width)),
                (first, slice(full_rows, full_rows + 1), slice(0, rest)),
                (second, slice(full_rows, full_rows + 1), slice(rest, width)),
                (second, slice(full_rows + 1 if rest else full_rows, seg.n_rows), slice(0, width)),
            ]
            if not rest:  # the cut falls between rows: no straddling row
                pieces = [pieces[0], pieces[3]]
            for out, rows, cols in pieces:
                if rows.stop > rows.start and cols.stop > cols.start:
                    offset = out[-1].tokens.stop if out else 0
                    out.append(seg.sub(rows, cols, offset))
        return ForwardContext(first), ForwardContext(second)


def merged_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One linear layer whose output is the concatenation of ``parts``' outputs (one GEMM instead of several).
    Each part's weight becomes a view of the merged weight: the values exist once."""
    merged = torch.cat([p.weight for p in parts])
    with torch.device("meta"):
        linear = nn.Linear(merged.shape[1], merged.shape[0], bias=False)
    linear.weight = nn.Parameter(merged, requires_grad=False)
    for part, rows in zip(parts, merged.split([p.weight.shape[0] for p in parts])):
        part.weight = nn.Parameter(rows, requires_grad=False)
    return linear


def head_dim(config: LlamaConfig) -> int:
    return config.head_dim or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    """This rank's query heads (and the KV heads they read); returns the o_proj partial."""

    def __init__(self, config: LlamaConfig, kv_of_q: list[int], n_kv: int):
        super().__init__()
        self.head_dim = head_dim(config)
        self.n_q, self.n_kv = len(kv_of_q), n_kv
        dim, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(dim, self.n_q * hd, bias=False)
        self.k_proj = nn.Linear(dim, n_kv * hd, bias=False)
        self.v_proj = nn.Linear(dim, n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_q * hd, dim, bias=False)
        group = self.n_q // n_kv if n_kv and self.n_q % n_kv == 0 else 0
        # Uneven head splits can give a rank query heads from KV groups of different sizes;
        # then K/V are expanded per query head by index instead of SDPA's uniform GQA.
        self.uniform_gqa = group > 0 and kv_of_q == [i // group for i in range(self.n_q)]
        self.register_buffer("kv_of_q", torch.tensor(kv_of_q, dtype=torch.long), persistent=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.qkv_proj: nn.Linear | None = None  # set by ``merge_projections``
        self.project = self._project  # the q/k/v projection with RoPE; the compiled kernel mode replaces it
        # Masked GQA attention with the query group folded into the query length (compiled kernel mode)
        self.fold_groups = False

    def merge_projections(self) -> None:
        """One GEMM for q, k and v: their weights become row blocks (views) of one merged weight."""
        self.qkv_proj = merged_linear([self.q_proj, self.k_proj, self.v_proj])

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        parts = [self._segment(x[seg.tokens], seg) for seg in ctx.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def probabilities(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention probabilities of this rank's query heads, [rows, heads, length, kv_len] (one segment)."""
        (seg,) = ctx.segments
        q, k, _ = self._qkv(x[seg.tokens], seg)
        scores = q @ k.index_select(1, self.kv_of_q).transpose(-1, -2) / self.head_dim**0.5
        return scores.masked_fill(~seg.allowed(), float("-inf")).softmax(-1)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [tokens, dim], cos/sin [tokens, hd] -> q [tokens, n_q, hd], k and v [tokens, n_kv, hd]; RoPE on q, k."""
        hd = self.head_dim
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([self.n_q * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q, k = apply_rotary_pos_emb(q.view(-1, self.n_q, hd), k.view(-1, self.n_kv, hd), cos, sin)
        return q, k, v.view(-1, self.n_kv, hd)

    def _qkv(self, x: torch.Tensor, seg: Segment) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [rows, n_q, length, hd] with RoPE; this segment's K/V written to the cache; the keys
        and values it attends to, [rows, n_kv, kv_len, hd]."""
        rows, length, hd = seg.n_rows, seg.length, self.head_dim
        q, k, v = self.project(x, seg.cos.reshape(-1, hd), seg.sin.reshape(-1, hd))
        q, k, v = (t.view(rows, length, -1, hd).transpose(1, 2) for t in (q, k, v))
        k_cache, v_cache = self.k_cache[seg.rows], self.v_cache[seg.rows]
        k_cache.index_copy_(2, seg.slots, k)
        v_cache.index_copy_(2, seg.slots, v)
        return q, k_cache[:, :, : seg.kv_len], v_cache[:, :, : seg.kv_len]

    def _segment(self, x: torch.Tensor, seg: Segment) -> torch.Tensor:
        rows, length, hd = seg.n_rows, seg.length, self.head_dim
        q, k, v = self._qkv(x, seg)
        mask, is_causal = seg.attention_mask()
        if self.uniform_gqa and self.fold_groups and not seg.causal:
            out = _folded_gqa(q, k, v, mask)
        elif self.uniform_gqa:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv != self.n_q
            )
        else:
            k, v = k.index_select(1, self.kv_of_q), v.index_select(1, self.kv_of_q)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(rows * length, self.n_q * hd))


def _folded_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of q [rows, n_q, length, hd] over K/V [rows, n_kv, kv_len, hd] (KV head j serving
    query heads j*g .. j*g+g-1) without repeating K/V: each KV head's g query heads become g*length queries of
    one head, the mask repeated over them (a [rows, 1, 1, kv_len] decode mask broadcasts as it is)."""
    rows, n_q, length, hd = q.shape
    n_kv = k.shape[1]
    group = n_q // n_kv
    if length > 1:
        mask = mask.unsqueeze(2).expand(rows, 1, group, length, mask.shape[-1]).reshape(rows, 1, group * length, -1)
    out = F.scaled_dot_product_attention(q.reshape(rows, n_kv, group * length, hd), k, v, attn_mask=mask)
    return out.view(rows, n_q, length, hd)


class MLP(nn.Module):
    """SwiGLU over this rank's FFN columns; returns the down_proj partial."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by ``merge_projections``

    def merge_projections(self) -> None:
        """One GEMM for gate and up: their weights become row blocks (views) of one merged weight."""
        self.gate_up_proj = merged_linear([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder block; strategies compose its pieces with the communicator."""

    def __init__(self, config: LlamaConfig, kv_of_q: list[int], n_kv: int, ffn: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, kv_of_q, n_kv)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, ffn)

    def attn(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Partial attention output of this rank: o_proj_i(Attn_i(RMSNorm1(h)))."""
        return self.self_attn(self.input_layernorm(h), ctx)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """Partial MLP output of this rank: down_i(silu(gate_i(u)) * up_i(u)), u = RMSNorm2(h)."""
        return self.mlp(self.post_attention_layernorm(h))

    def attention_probs(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention probabilities of this rank's query heads on RMSNorm1(h), [rows, heads, length, kv_len]."""
        return self.self_attn.probabilities(self.input_layernorm(h), ctx)


class Transformer(nn.Module):
    """Embeddings and lm_head are replicated on every rank; the blocks are sharded."""

    def __init__(self, config: LlamaConfig, blocks: list[Block]):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(config)
        self.kernels = "eager"  # kernel mode (suite.model.kernels)

    def setup_cache(self, batch: int, max_len: int) -> None:
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.setup_cache(batch, max_len, p.dtype, p.device)

    def context(self, pad: torch.Tensor, slots: torch.Tensor, kv_len: int) -> ForwardContext:
        """All rows of a left-padded batch at cache positions ``slots``.

        ``pad[b]`` is row b's number of left-pad slots: its tokens attend causally to cache
        positions >= pad[b], and a pad position attends only to itself (never a row of NaNs).
        A prefill from slot 0 without padding is plain causal attention: no mask is built.
        """
        positions = (slots.view(1, -1) - pad.view(-1, 1)).clamp(min=0)
        cos, sin = self.rotary(self.embed_tokens.weight, positions)
        rows = pad.shape[0]
        # decode (one slot, kv_len > 1) never reads ``pad`` back from the device
        causal = slots.shape[0] == kv_len and not bool(pad.any())
        mask = None
        if not causal:
            keys = torch.arange(kv_len, device=slots.device)
            query = slots.view(1, -1, 1)
            mask = ((keys <= query) & ((keys >= pad.view(-1, 1, 1)) | (keys == query))).unsqueeze(1)
        seg = Segment(slice(0, rows * slots.shape[0]), slice(0, rows), slots, kv_len, mask, cos, sin, causal)
        return ForwardContext([seg])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block: flat [T] ids -> [T, hidden]."""
        return self.embed_tokens(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the residual stream after the last block: lm_head(RMSNorm(h))."""
        return self.lm_head(self.norm(h))

    def forward(self, tokens: torch.Tensor, ctx: ForwardContext, run_layers, last_only: bool = False):
        """tokens: flat [T] ids; ``run_layers(layers, h, ctx)`` is the strategy bound to a communicator."""
        h = run_layers(self.layers, self.embed(tokens), ctx)
        if last_only:  # the last token of every row of a whole-batch context
            (seg,) = ctx.segments
            h = h.view(seg.n_rows, seg.length, -1)[:, -1]
        return self.head(h)
