"""Accuracy through lm-eval: the TP model with a strategy on N ranks, as an lm-eval model.

``SpdbenchLM`` (registered with lm-eval as ``spdbench``) keeps N rank processes in a
``RankPool``; every batch goes to every rank, rank 0 answers. Requests are scored as lm-eval's
Hugging Face model scores them: the same tokenization (``TemplateLM``), the same truncation to
the last ``max_length`` tokens and the same rolling windows for perplexity; batches are
left-padded rows of similar length. ``spdbench eval`` runs lm-eval's own task definitions on
local data (``suite.tasks``) and writes one ``accuracy`` row per task and metric.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from suite.launch import DEFAULT_TIMEOUT_S
from suite.pool import RankPool

eval_logger = logging.getLogger(__name__)


class _RankScorer:
    """One rank's model; every rank runs the same calls with the same batches."""

    def __init__(self, comm, device, model, strategy, options, dtype):
        from suite.generate import load_runner

        if getattr(comm, "projected", False):
            raise ValueError("accuracy needs real collectives; a projecting communicator only models their cost")
        self.runner = load_runner(comm, device, model, strategy, options, dtype)

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
        h = runner.run_layers(model.layers, model.embed_tokens(ids.flatten()), ctx).view(len(inputs), width, -1)
        out = []
        for row, (tokens, n) in enumerate(batch):  # the lm_head only where a continuation token is predicted
            logprobs = F.log_softmax(model.lm_head(model.norm(h[row, width - n:])).float(), dim=-1)
            target = torch.tensor(tokens[-n:], device=runner.device)
            out.append((logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.runner.generate(prompts, max_new_tokens).tokens


@register_model("spdbench")
class SpdbenchLM(TemplateLM):
    """lm-eval model args: model, tp, strategy, spd_plan, dtype, device, backend, timeout, max_length,
    batch_size, max_batch_tokens; any other key=value is a strategy option."""

    def __init__(self, model: str = "smollm2-135m", tp: int = 1, strategy: str = "baseline",
                 spd_plan: str | None = None, dtype: str = "float32", device: str | None = "cpu",
                 backend: str = "auto", timeout: float = DEFAULT_TIMEOUT_S, max_length: int | None = None,
                 batch_size: int | str = 32, max_batch_size: int | None = None, max_batch_tokens: int = 4096,
                 **strategy_options):
        from suite.generate import DTYPES
        from suite.launch import placement
        from suite.sharding import check_tp
        from suite.sources import resolve
        from suite.strategy import make_strategy

        super().__init__()
        options = {k: str(v) for k, v in strategy_options.items()}
        if spd_plan:
            options["plan"] = str(spd_plan)
        device = "cuda" if str(device or "cpu").startswith("cuda") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():  # lm-eval's CLI defaults to cuda:0
            eval_logger.warning("no CUDA GPU: the spdbench model runs on the CPU")
            device = "cpu"
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of: {', '.join(DTYPES)}")
        self.strategy = make_strategy(strategy, options)  # bad names and options fail here, before any spawn
        placement(int(tp), device, backend)
        source = resolve(model)
        check_tp(source.config, int(tp))
        self.tokenizer = source.tokenizer()
        self.max_length = int(max_length or source.config.max_position_embeddings)
        self.batch_size = int(max_batch_size or (32 if batch_size == "auto" else batch_size))
        self.max_batch_tokens = int(max_batch_tokens)
        self.description = dict(model=model, tp=int(tp), strategy=strategy, strategy_options=self.strategy.options(),
                                dtype=dtype, device=device)
        self.pool = RankPool(_RankScorer, int(tp), model, strategy, options, dtype, device=device, backend=backend,
                             timeout_s=float(timeout))

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
        """Indices of ``items``, longest first, in batches of at most batch_size rows and max_batch_tokens padded tokens."""
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
            tokens = (context + continuation)[-(self.max_length + 1):]
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
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
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
                prompts = [self.tok_encode(requests[i].args[0])[-max(1, self.max_length - new):] for i in indices]
                for batch in self._batches(prompts, len):
                    generated = self.pool.call("generate", [prompts[j] for j in batch], new)
                    texts = [self.tok_decode(ids[:ids.index(self.eot_token_id)] if self.eot_token_id in ids else ids)
                             for ids in generated]
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


# --- spdbench eval --------------------------------------------------------------------------

def accuracy_rows(results: dict, base: dict, limits: dict) -> list[dict]:
    """lm-eval's results -> one row per task and metric."""
    from suite.results import cell_id

    rows = []
    for task, values in results["results"].items():
        for metric in results["higher_is_better"][task]:
            value, stderr = values.get(f"{metric},none"), values.get(f"{metric}_stderr,none")
            if not isinstance(value, (int, float)):
                continue
            scenario = {k: base[k] for k in ("kind", "model", "strategy", "strategy_options", "tp", "dtype", "data")}
            limit = limits.get(task)
            scenario.update(task=task, metric=metric, limit=limit)
            rows.append({**base, "cell_id": cell_id(scenario), "task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "limit": limit})
    return rows


def _command(args) -> str:
    """The canonical command line that reproduces this evaluation."""
    words = ["spdbench", "eval", "--model", args.model, "--tp", str(args.tp), "--strategy", args.strategy]
    for key, value in args.options.items():
        words += ["--strategy-opt", f"{key}={value}"]
    words += ["--tasks", args.tasks]
    for limit in args.limit:
        words += ["--limit", limit]
    for option in ("data_dir", "max_length", "dtype", "device"):
        if getattr(args, option) is not None:
            words += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return shlex.join(words + ["--out", str(args.out)])


def _spd_fields(strategy, model: str) -> dict:
    """SPD's variant and share of blocks that drop their sync (null for other strategies)."""
    if strategy.name != "spd":
        return {"spd_variant": None, "spd_blocks_pct": None}
    from spd.plan import load_plan
    from spd.strategy import parse_blocks
    from suite.sources import resolve

    n_layers = resolve(model).config.num_hidden_layers
    if strategy.plan:
        plan = load_plan(strategy.plan)
        variant, blocks = (plan.budget or {}).get("variant"), plan.spd_blocks()
    else:
        variant, blocks = "zs", parse_blocks(strategy.blocks, n_layers)
    return {"spd_variant": variant, "spd_blocks_pct": 100.0 * len(blocks) / n_layers}


def _limits(values: list[str], names: list[str], folder) -> tuple[dict, dict | None]:
    """--limit values -> documents per task, and lm-eval ``samples`` when tasks differ (local data only)."""
    from suite.tasks import TaskDataError, converted

    default, per_task = None, {}
    for value in values:
        task, sep, count = value.rpartition("=")
        if sep and task not in names:
            raise TaskDataError(f"--limit {value}: task {task!r} is not in --tasks")
        if not count.isdigit() or int(count) < 1:
            raise TaskDataError(f"--limit {value} is invalid: expected a count of at least 1 (K or TASK=K)")
        if sep:
            per_task[task] = int(count)
        else:
            default = int(count)
    limits = {task: per_task.get(task, default) for task in names}
    if not per_task:
        return limits, None
    if folder is None:
        raise TaskDataError("--limit TASK=K needs local data (--data-dir); with the Hub use one --limit K")
    samples = {}
    for task in names:  # the first K documents, as --limit K takes them
        n_docs = converted(task, folder).read_text().count("\n")
        samples[task] = list(range(min(limits[task] or n_docs, n_docs)))
    return limits, samples


def cmd_eval(args, parser) -> int:
    import lm_eval

    from suite.results import ResultStore, environment
    from suite.tasks import TaskDataError, data_dir, task_configs

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        parser.error("--tasks is empty: name at least one task, e.g. --tasks piqa,arc_easy")
    for option in ("max_length", "batch_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} {value} is invalid: it must be at least 1")
    try:
        folder = data_dir(args.data_dir)
        tasks, manager = task_configs(names, folder)
        limits, samples = _limits(args.limit, names, folder)
    except TaskDataError as exc:
        parser.error(str(exc))
    store = ResultStore(args.out)
    try:
        store.rows()
    except ValueError as exc:
        parser.error(f"--out {exc}")
    lm = SpdbenchLM(model=args.model, tp=args.tp, strategy=args.strategy, dtype=args.dtype, device=args.device,
                    backend=args.backend, timeout=args.timeout, batch_size=args.batch_size,
                    max_length=args.max_length, **args.options)
    strategy = lm.strategy
    base = {"kind": "accuracy", "status": "ok", "error": None, "provenance": "measured", "interconnect": None,
            "model": args.model, "strategy": args.strategy, "strategy_options": strategy.options(),
            "usable_model": strategy.usable, "tp": args.tp, "dtype": args.dtype,
            "data": str(folder) if folder else "hub", "spd_plan": args.options.get("plan"),
            **_spd_fields(strategy, args.model),
            "env": environment(), "command": _command(args)}
    start = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, samples=samples,
                                          limit=None if samples else limits.get(names[0]),
                                          bootstrap_iters=args.bootstrap_iters, verbosity="WARNING")
    finally:
        lm.close()
    rows = accuracy_rows(results, {**base, "time": time.time()}, limits)
    store.append(*rows)
    if not strategy.usable:
        print(f"note: {args.strategy} is a latency bound, not a usable model: its scores are not an accuracy")
    for row in rows:
        stderr = f" ± {row['stderr']:.4f}" if row["stderr"] is not None else ""
        print(f"{row['task']:16s} {row['metric']:16s} {row['value']:.4f}{stderr}")
    print(f"{len(rows)} rows -> {args.out} ({time.perf_counter() - start:.0f} s, {args.strategy}, tp={args.tp})")
    return 0


def cmd_lm_eval(args, parser) -> int:
    """lm-eval's own command line, with the ``spdbench`` model registered and the local task data."""
    from lm_eval.__main__ import cli_evaluate

    from suite.tasks import TaskDataError, data_dir, include_dir

    argv = args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else list(args.lm_eval_args)
    try:
        folder = data_dir(args.data_dir)
        if folder and "--include_path" not in argv:
            argv = [*argv, "--include_path", str(include_dir(folder))]
    except TaskDataError as exc:
        parser.error(str(exc))
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


def add_command(sub) -> None:
    from suite.cli import add_model_args

    p = sub.add_parser("eval", help="accuracy and perplexity with lm-eval's tasks on N tensor-parallel ranks")
    add_model_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. piqa,arc_easy,hellaswag,wikitext")
    p.add_argument("--limit", action="append", default=[], metavar="K | TASK=K",
                   help="documents per task (default: all); TASK=K sets one task's, repeatable "
                        "(e.g. --limit 50 --limit wikitext=2)")
    p.add_argument("--data-dir", help="offline data folder (default: $SPDBENCH_DATA, else ../shared/data next to "
                                      "the project if present, else the Hugging Face Hub)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--max-length", type=int, help="context window in tokens (default: the model's); longer "
                                                  "documents are scored in rolling windows")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap resamples for the stderr of perplexity-like metrics (lm-eval's default: 100000)")
    p.add_argument("--out", required=True, help="results file (JSONL), appended to")
    p.set_defaults(handler=cmd_eval)
    p = sub.add_parser("lm-eval", help="lm-eval's own command line with the spdbench model and the local data",
                       description="Runs lm-eval's CLI (arguments after --) with the model `spdbench` registered, "
                                   "e.g. spdbench lm-eval -- --model spdbench --model_args "
                                   "model=smollm2-135m,tp=4,strategy=spd,spd_plan=plan.json --tasks piqa --device cpu")
    p.add_argument("--data-dir", help="offline data folder, as for `spdbench eval`; its tasks replace the Hub's")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="-- then lm-eval's arguments")
    p.set_defaults(handler=cmd_lm_eval)
