"""Prefill and greedy decode with a KV cache, timed per step.

A ``Runner`` binds a rank-local model to a strategy and a communicator. Prompts are left-padded
into one batch; every rank runs the same batch. Decode can be captured in a CUDA graph (one
replay per token), because an eager decode step at small batch is launch-bound and would hide
every difference between strategies.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from suite.errors import SpdbenchError
from suite.model.llama import Transformer
from suite.model.sources import DTYPES, resolve
from suite.parallel.comm import Communicator
from suite.parallel.strategy import Strategy, bound_strategy


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
        self._graph = None

    def run_layers(self, layers, h, ctx):
        return self.strategy.run_layers(layers, h, self.comm, ctx)

    def _prepare(self, prompts: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(not p for p in prompts):
            raise SpdbenchError("prompts: every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        if max_len > self.model.config.max_position_embeddings:
            raise SpdbenchError(f"prompt plus new tokens ({max_len}) exceeds the model's context "
                             f"({self.model.config.max_position_embeddings})")
        tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        pad = torch.tensor([width - len(p) for p in prompts], device=self.device)
        if self._cache_shape != (len(prompts), max_len):
            self.model.setup_cache(len(prompts), max_len)
            self._cache_shape, self._graph = (len(prompts), max_len), None
        return tokens, pad

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits at every position, [batch, width, vocab], for left-padded prompts (pad rows are junk)."""
        tokens, pad = self._prepare(prompts, max(len(p) for p in prompts))
        width = tokens.shape[1]
        ctx = self.model.context(pad, torch.arange(width, device=self.device), width)
        return self.model(tokens.flatten(), ctx, self.run_layers).view(len(prompts), width, -1)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, cuda_graph: bool = False,
                 keep_logits: bool = False) -> Generation:
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
        step = self._graphed_step(pad, max_len, nxt, width) if cuda_graph else None
        positions = torch.arange(width, max_len, device=self.device)  # one copy, not one per token
        decode_clock = _Clock(self.device)
        decode_clock.mark()
        for i in range(max_new_tokens - 1):
            pos = positions[i:i + 1]
            logits = step(nxt, pos) if step else self._step(nxt, pos, pad, max_len)
            nxt = logits.argmax(-1)
            out.append(nxt)
            if keep_logits:
                kept.append(logits.float().cpu())
            decode_clock.mark()
        generated = torch.stack(out, dim=1).tolist()
        return Generation(generated, prefill_logits.cpu(), clock.intervals()[0], decode_clock.intervals(), kept)

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor, max_len: int) -> torch.Tensor:
        ctx = self.model.context(pad, pos, max_len)
        return self.model(tokens, ctx, self.run_layers, last_only=True)

    def _graphed_step(self, pad, max_len, first_tokens, first_pos):
        """Capture one decode step in a CUDA graph; returns a replaying step function."""
        if self.device.type != "cuda":
            raise SpdbenchError("CUDA-graph decode needs device cuda")
        if self._graph is None:
            tok, pos = first_tokens.clone(), torch.tensor([first_pos], device=self.device)
            pad = pad.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up writes the same cache slot the first replay writes
                    self._step(tok, pos, pad, max_len)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: work of other threads (NCCL's watchdog) cannot invalidate the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._step(tok, pos, pad, max_len)
            self._graph = (graph, tok, pos, pad, out)
        graph, tok, pos_buf, pad_buf, out = self._graph
        pad_buf.copy_(pad)

        def replay(tokens, pos):
            tok.copy_(tokens)
            pos_buf.copy_(pos)
            graph.replay()
            return out
        return replay


def load_runner(comm: Communicator, device: torch.device, model: str, strategy: str,
                options: dict | None = None, dtype: str = "float32") -> Runner:
    """This rank's runner: its shard of ``model`` driven by ``strategy``."""
    source = resolve(model, device)
    chosen = bound_strategy(strategy, options, source, comm.world)
    return Runner(chosen.load_model(source, comm.world, comm.rank, DTYPES[dtype], device), chosen, comm)


class ModelCache:
    """The rank model of consecutive cells, rebuilt only when a cell needs another one.

    Cells share a model when they have the same model, dtype and strategy ``model_key`` (every
    strategy that runs the plain shard shares it); the previous model is freed before the next
    is built.
    """

    def __init__(self, device: torch.device):
        self.device, self.sources, self.key, self.model = device, {}, None, None

    def source(self, model: str):
        if model not in self.sources:
            self.sources[model] = resolve(model, self.device)
        return self.sources[model]

    def runner(self, model: str, dtype: str, strategy: Strategy, comm: Communicator) -> Runner:
        """A runner of ``strategy`` (bound to ``model`` and ``comm.world``) on rank ``comm.rank``."""
        key = (model, dtype, strategy.model_key(), comm.rank)
        if key != self.key:
            self.model = self.key = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.model = strategy.load_model(self.source(model), comm.world, comm.rank, DTYPES[dtype], self.device)
            self.key = key
        return Runner(self.model, strategy, comm)
