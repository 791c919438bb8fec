"""Accuracy through lm-eval: the TP model with a strategy on N ranks, as an lm-eval model.

``SpdbenchLM`` (registered with lm-eval as ``spdbench``) keeps N rank processes in a
``RankPool``; every batch goes to every rank, rank 0 answers. Requests are scored as lm-eval's
Hugging Face model scores them: the same tokenization (``TemplateLM``), the same truncation to
the last ``max_length`` tokens and the same rolling windows for perplexity; batches are
left-padded rows of similar length. ``spdbench eval`` runs lm-eval's own task definitions on
local data (``suite.accuracy.tasks``) and writes one ``accuracy`` row per task and metric.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from suite.defaults import DEFAULT_TIMEOUT_S
from suite.errors import SpdbenchError
from suite.parallel.pool import RankPool

eval_logger = logging.getLogger(__name__)


class _RankScorer:
    """One rank's model; every rank runs the same calls with the same batches. ``use`` switches the
    strategy (a model its previous strategy shares is kept: ``ModelCache``)."""

    def __init__(self, comm, device, model, dtype, kernels="eager"):
        from suite.parallel.runner import ModelCache

        if not comm.carries_data:
            raise SpdbenchError("accuracy needs real collectives; a projecting communicator only models their cost")
        self.comm, self.model_name, self.dtype, self.kernels = comm, model, dtype, kernels
        self.models, self.runner = ModelCache(device), None

    def use(self, strategy: str, options: dict) -> None:
        from suite.parallel.strategy import bound_strategy

        chosen = bound_strategy(strategy, options, self.models.source(self.model_name), self.comm.world)
        self.runner = self.models.runner(self.model_name, self.dtype, chosen, self.comm, self.kernels)

    @torch.inference_mode()
    def score(self, batch: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): log P(last n tokens | the tokens before) and whether all n are greedy."""
        model, runner = self.runner.model, self.runner
        inputs = [tokens[:-1] for tokens, _ in batch]
        width = max(map(len, inputs))
        pad = torch.tensor([width - len(x) for x in inputs], device=runner.device)
        ids = torch.tensor([[0] * (width - len(x)) + x for x in inputs], device=runner.device)
        model.setup_cache(len(inputs), width)
        runner._cache_shape = None  # the runner's cache is replaced
        ctx = model.context(pad, torch.arange(width, device=runner.device), width)
        h = runner.run_layers(model.layers, model.embed(ids.flatten()), ctx).view(len(inputs), width, -1)
        out = []
        for row, (tokens, n) in enumerate(batch):  # the lm_head only where a continuation token is predicted
            logprobs = F.log_softmax(model.head(h[row, width - n :]).float(), dim=-1)
            target = torch.tensor(tokens[-n:], device=runner.device)
            out.append((logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.runner.generate(prompts, max_new_tokens).tokens


@register_model("spdbench")
class SpdbenchLM(TemplateLM):
    """lm-eval model args: model, tp, strategy, spd_plan, dtype, device, kernels, backend, timeout, max_length,
    batch_size, max_batch_tokens; any other key=value is a strategy option."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        tp: int = 1,
        strategy: str = "baseline",
        spd_plan: str | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        kernels: str = "eager",
        backend: str = "auto",
        timeout: float = DEFAULT_TIMEOUT_S,
        max_length: int | None = None,
        batch_size: int | str = 32,
        max_batch_size: int | None = None,
        max_batch_tokens: int = 4096,
        **strategy_options,
    ):
        from suite.defaults import DTYPE_NAMES, KERNELS
        from suite.model.sharding import check_tp
        from suite.model.sources import resolve
        from suite.parallel.launch import placement
        from suite.parallel.strategy import bound_strategy

        super().__init__()
        options = {k: str(v) for k, v in strategy_options.items()}
        if spd_plan:
            options["plan"] = str(spd_plan)
        device = "cuda" if str(device or "cpu").startswith("cuda") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():  # lm-eval's CLI defaults to cuda:0
            eval_logger.warning("no CUDA GPU: the spdbench model runs on the CPU")
            device = "cpu"
        if dtype not in DTYPE_NAMES:
            raise SpdbenchError(f"dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPE_NAMES)}")
        if kernels not in KERNELS:
            raise SpdbenchError(f"kernels {kernels!r} is not supported; choose one of: {', '.join(KERNELS)}")
        placement(int(tp), device, backend)
        source = resolve(model)
        check_tp(source.config, int(tp))
        self.model_name, self.source, self.tp = model, source, int(tp)
        self.dtype, self.placed_on, self.kernels = dtype, device, kernels
        self.strategy = bound_strategy(
            strategy, options, source, int(tp)
        )  # bad names, options, plans: before any spawn
        self.tokenizer = source.tokenizer()
        self.max_length = int(max_length or source.config.max_position_embeddings)
        self.batch_size = int(max_batch_size or (32 if batch_size == "auto" else batch_size))
        self.max_batch_tokens = int(max_batch_tokens)
        self.pool = RankPool(
            _RankScorer, int(tp), model, dtype, kernels, device=device, backend=backend, timeout_s=float(timeout)
        )
        self._use(strategy, options)

    def use(self, strategy: str, options: dict) -> None:
        """Score with ``strategy`` from now on, on the same ranks."""
        from suite.parallel.strategy import bound_strategy

        self.strategy = bound_strategy(strategy, options, self.source, self.tp)
        self._use(strategy, options)

    def _use(self, strategy: str, options: dict) -> None:
        self.pool.call("use", strategy, options)
        self.description = dict(
            model=self.model_name,
            tp=self.tp,
            strategy=strategy,
            strategy_options=self.strategy.options(),
            dtype=self.dtype,
            device=self.placed_on,
            kernels=self.kernels,
        )

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _batches(self, items: list, length) -> list[list[int]]:
        """Indices of ``items``, longest first, in batches of at most batch_size rows and max_batch_tokens
        padded tokens."""
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))
        batches, current = [], []
        for i in order:
            width = length(items[current[0]]) if current else length(items[i])
            if current and (len(current) >= self.batch_size or width * (len(current) + 1) > self.max_batch_tokens):
                batches.append(current)
                current = []
            current.append(i)
        return batches + [current] if current else batches

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log P(continuation | context) for token pairs, truncated on the left to max_length inputs."""
        items = []
        for context, continuation in pairs:
            tokens = (context + continuation)[-(self.max_length + 1) :]
            items.append((tokens, min(len(continuation), len(tokens) - 1)))
        out = [None] * len(items)
        batches = self._batches(items, lambda item: len(item[0]) - 1)
        with tqdm(total=len(items), disable=disable_tqdm, desc="Scoring") as bar:
            for batch in batches:
                for i, answer in zip(batch, self.pool.call("score", [items[i] for i in batch])):
                    out[i] = answer
                bar.update(len(batch))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        answers = self._score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (key, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity: disjoint windows of at most max_length tokens, each with its preceding context."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows, disable_tqdm)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (sampling is not supported)."""
        out = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Generating") as bar:
            for indices in groups.values():
                kwargs = dict(requests[indices[0]].args[1])
                if kwargs.pop("do_sample", False) or kwargs.get("temperature", 0) > 0:
                    raise ValueError("spdbench generates greedily; the task asks for sampling (do_sample/temperature)")
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(kwargs.get("max_gen_toks", 256))
                prompts = [self.tok_encode(requests[i].args[0])[-max(1, self.max_length - new) :] for i in indices]
                for batch in self._batches(prompts, len):
                    generated = self.pool.call("generate", [prompts[j] for j in batch], new)
                    texts = [
                        self.tok_decode(ids[: ids.index(self.eot_token_id)] if self.eot_token_id in ids else ids)
                        for ids in generated
                    ]
                    for j, text in zip(batch, texts):
                        for stop in until:
                            if stop:
                                text = text.split(stop)[0]
                        out[indices[j]] = text
                        self.cache_hook.add_partial("generate_until", requests[indices[j]].args, text)
                    bar.update(len(batch))
        return out

    def get_model_info(self) -> dict:
        return {"spdbench": self.description}

    def close(self) -> None:
        self.pool.close()
