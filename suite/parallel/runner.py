"""Prefill and greedy decode with a KV cache, timed per step.

A ``Runner`` binds a rank-local model to a strategy and a communicator. Prompts are left-padded
into one batch; every rank runs the same batch. Decode can be captured in a CUDA graph (one
replay per token), because an eager decode step at small batch is launch-bound and would hide
every difference between strategies. In the ``compiled`` kernel mode a decode step attends over a
power-of-two bound of the filled cache (at least ``KV_BOUND_MIN`` slots), one CUDA graph per bound; in
``eager`` over the whole cache.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from suite.errors import SpdbenchError
from suite.model.kernels import apply_kernels
from suite.model.llama import Transformer
from suite.model.sources import DTYPES, resolve
from suite.parallel.comm import Communicator
from suite.parallel.strategy import Strategy, bound_strategy

KV_BOUND_MIN = 16  # the smallest cache bound a compiled decode step attends over


def decode_kv_len(filled: int, max_len: int, kernels: str) -> int:
    """Cache slots a decode step attends over when ``filled`` slots hold keys: the whole cache (eager), or the
    next power of two (compiled), at least ``KV_BOUND_MIN`` and at most the cache (a few static shapes)."""
    if kernels == "eager":
        return max_len
    return min(max_len, max(KV_BOUND_MIN, 1 << (filled - 1).bit_length()))


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (exactly max_new_tokens each)
    prefill_logits: torch.Tensor  # [batch, vocab] float32 logits after the last prompt token
    prefill_s: float  # time to first token
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [batch, vocab] per decode step, if kept


class _Clock:
    """Step timer: CUDA events on a GPU (no sync inside the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class Runner:
    def __init__(self, model: Transformer, strategy: Strategy, comm: Communicator):
        self.model, self.strategy, self.comm = model, strategy, comm
        self.device = model.embed_tokens.weight.device
        self._cache_shape: tuple[int, int] | None = None
        self._graphs: dict = {}  # kv_len -> (graph, token buffer, position buffer, output)
        self._pad = None  # the left-pad buffer every graph reads

    def run_layers(self, layers, h, ctx):
        return self.strategy.run_layers(layers, h, self.comm, ctx)

    def _prepare(self, prompts: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(not p for p in prompts):
            raise SpdbenchError("prompts: every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        if max_len > self.model.config.max_position_embeddings:
            raise SpdbenchError(
                f"prompt plus new tokens ({max_len}) exceeds the model's context "
                f"({self.model.config.max_position_embeddings})"
            )
        tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        pad = torch.tensor([width - len(p) for p in prompts], device=self.device)
        if self._cache_shape != (len(prompts), max_len):
            self.model.setup_cache(len(prompts), max_len)
            self._cache_shape, self._graphs, self._pad = (len(prompts), max_len), {}, None
        return tokens, pad

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits at every position, [batch, width, vocab], for left-padded prompts (pad rows are junk)."""
        tokens, pad = self._prepare(prompts, max(len(p) for p in prompts))
        width = tokens.shape[1]
        ctx = self.model.context(pad, torch.arange(width, device=self.device), width)
        return self.model(tokens.flatten(), ctx, self.run_layers).view(len(prompts), width, -1)

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, cuda_graph: bool = False, keep_logits: bool = False
    ) -> Generation:
        width = max(len(p) for p in prompts)
        tokens, pad = self._prepare(prompts, width + max_new_tokens)
        max_len = width + max_new_tokens
        clock = _Clock(self.device)
        clock.mark()
        ctx = self.model.context(pad, torch.arange(width, device=self.device), width)
        logits = self.model(tokens.flatten(), ctx, self.run_layers, last_only=True)
        nxt = logits.argmax(-1)
        clock.mark()
        prefill_logits = logits.float()
        out, kept = [nxt], []
        if cuda_graph:
            self._graph_pad(pad)
        positions = torch.arange(width, max_len, device=self.device)  # one copy, not one per token
        decode_clock = _Clock(self.device)
        decode_clock.mark()
        for i in range(max_new_tokens - 1):
            pos = positions[i : i + 1]
            kv_len = decode_kv_len(width + i + 1, max_len, self.model.kernels)
            logits = self._replay(kv_len, nxt, pos) if cuda_graph else self._step(nxt, pos, pad, kv_len)
            nxt = logits.argmax(-1)
            out.append(nxt)
            if keep_logits:
                kept.append(logits.float().cpu())
            decode_clock.mark()
        generated = torch.stack(out, dim=1).tolist()
        return Generation(generated, prefill_logits.cpu(), clock.intervals()[0], decode_clock.intervals(), kept)

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, kv_len: int) -> torch.Tensor:
        ctx = self.model.context(pad, pos, kv_len)
        return self.model(tokens, ctx, self.run_layers, last_only=True)

    def _graph_pad(self, pad: torch.Tensor) -> None:
        """This generation's left padding, in the buffer the decode graphs read."""
        if self.device.type != "cuda":
            raise SpdbenchError("CUDA-graph decode needs device cuda")
        if self._pad is None:
            self._pad = pad.clone()
        self._pad.copy_(pad)

    def _replay(self, kv_len: int, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step replayed from the CUDA graph of this cache bound (captured on first use)."""
        if kv_len not in self._graphs:
            tok, pos_buf = tokens.clone(), pos.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up (and compilation) writes the same cache slot the replay writes
                    self._step(tok, pos_buf, self._pad, kv_len)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: work of other threads (NCCL's watchdog) cannot invalidate the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._step(tok, pos_buf, self._pad, kv_len)
            self._graphs[kv_len] = (graph, tok, pos_buf, out)
        graph, tok, pos_buf, out = self._graphs[kv_len]
        tok.copy_(tokens)
        pos_buf.copy_(pos)
        graph.replay()
        return out


def load_runner(
    comm: Communicator,
    device: torch.device,
    model: str,
    strategy: str,
    options: dict | None = None,
    dtype: str = "float32",
    kernels: str = "eager",
) -> Runner:
    """This rank's runner: its shard of ``model`` driven by ``strategy``, in kernel mode ``kernels``."""
    source = resolve(model, device)
    chosen = bound_strategy(strategy, options, source, comm.world)
    model = apply_kernels(chosen.load_model(source, comm.world, comm.rank, DTYPES[dtype], device), kernels)
    return Runner(model, chosen, comm)


class ModelCache:
    """The rank model of consecutive cells, rebuilt only when a cell needs another one.

    Cells share a model when they have the same model, dtype, kernel mode and strategy ``model_key`` (every
    strategy that runs the plain shard shares it); the previous model is freed before the next
    is built.
    """

    def __init__(self, device: torch.device):
        self.device, self.sources, self.key, self.model = device, {}, None, None

    def source(self, model: str):
        if model not in self.sources:
            self.sources[model] = resolve(model, self.device)
        return self.sources[model]

    def runner(self, model: str, dtype: str, strategy: Strategy, comm: Communicator, kernels: str = "eager") -> Runner:
        """A runner of ``strategy`` (bound to ``model`` and ``comm.world``) on rank ``comm.rank``."""
        key = (model, dtype, kernels, strategy.model_key(), comm.rank)
        if key != self.key:
            self.model = self.key = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.model = apply_kernels(
                strategy.load_model(self.source(model), comm.world, comm.rank, DTYPES[dtype], self.device), kernels
            )
            self.key = key
        return Runner(self.model, strategy, comm)
