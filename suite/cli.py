"""The ``spdbench`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from suite import launch as launching

EXIT_USAGE = 2
# Modules that add subcommands: each defines ``add_command(subparsers)`` and sets
# ``handler(args, parser) -> int`` on its parser (``parser.error`` for bad input).
COMMAND_MODULES = ("suite.bench", "suite.projection", "suite.evaluate", "spd.cli", "reports.cli", "suite.demo")


class _Parser(argparse.ArgumentParser):
    """Bad input: one line naming the problem, exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _generate_job(comm, device, args, prompts):
    from suite.generate import load_runner

    runner = load_runner(comm, device, args.model, args.strategy, args.options, args.dtype)
    return runner.generate(prompts, args.max_new_tokens, cuda_graph=args.cuda_graph)


def cmd_generate(args, parser) -> int:
    from suite.sharding import check_tp
    from suite.sources import resolve
    from suite.strategy import make_strategy

    strategy = make_strategy(args.strategy, args.options)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens} is invalid: it must be at least 1")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    launching.placement(args.tp, args.device, args.backend)
    source = resolve(args.model)  # validates the model and fills the weight cache before ranks start
    check_tp(source.config, args.tp)
    if hasattr(strategy, "validate"):  # e.g. an SPD plan made for another model or N
        strategy.validate(source, args.tp)
    tokenizer = source.tokenizer()
    prompts = [tokenizer.encode(p) for p in args.prompt]
    if any(not p for p in prompts):
        parser.error("--prompt must not be empty")
    gen = launching.launch(_generate_job, args.tp, args, prompts, device=args.device, backend=args.backend,
                           timeout_s=args.timeout)
    if not launching.is_main_rank():
        return 0
    eos = getattr(tokenizer, "eos_token_id", None)
    texts = [tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)
             for ids in gen.tokens]
    decode_ms = 1e3 * sum(gen.decode_s) / len(gen.decode_s) if gen.decode_s else None
    result = {"model": args.model, "strategy": args.strategy, "strategy_options": strategy.options(),
              "tp": args.tp, "dtype": args.dtype, "device": args.device, "usable_model": strategy.usable,
              "token_ids": gen.tokens, "text": texts, "prefill_ms": 1e3 * gen.prefill_s,
              "decode_ms_per_token": decode_ms}
    if args.json:
        print(json.dumps(result))
        return 0
    if not strategy.usable:
        print(f"note: {args.strategy} is a latency bound, not a usable model: its text is meaningless")
    for prompt, text in zip(args.prompt, texts):
        print(f"--- {prompt!r}\n{text}")
    per_token = f"{decode_ms:.2f} ms/token" if decode_ms is not None else "n/a"
    print(f"prefill {result['prefill_ms']:.1f} ms, decode {per_token} ({args.strategy}, tp={args.tp})")
    return 0


def add_model_args(p: argparse.ArgumentParser) -> None:
    from suite.generate import DTYPES

    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded), random:<preset>, a .gguf path, an HF folder or hub id")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree N")
    p.add_argument("--strategy", default="baseline", help="baseline, spd, ladder, tokenweave, seqpar, nocomm, ...")
    p.add_argument("--strategy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. layers=last:16, split_min_tokens=0)")
    p.add_argument("--spd-plan", metavar="PLAN.json",
                   help="SPD plan file (implies --strategy spd; same as --strategy-opt plan=PLAN.json)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="process-group backend (auto: NCCL when every rank has its own GPU, else gloo)")
    p.add_argument("--timeout", type=float, default=launching.DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait before the run fails")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spdbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="greedy generation on N tensor-parallel ranks")
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text, repeatable (one batch)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--cuda-graph", action="store_true", help="capture decode in a CUDA graph")
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.set_defaults(handler=cmd_generate)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from suite.sharding import ShardingError
    from suite.sources import ModelSourceError
    from suite.strategy import StrategyError, parse_options

    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    try:
        if hasattr(args, "strategy_opt"):
            args.options = parse_options(args.strategy_opt)
            if args.spd_plan:  # implies --strategy spd
                if args.strategy not in ("baseline", "spd"):
                    sub.error(f"--spd-plan needs --strategy spd, not {args.strategy}")
                args.strategy, args.options["plan"] = "spd", args.spd_plan
        return args.handler(args, sub)
    except (ModelSourceError, StrategyError, ShardingError, launching.LaunchError) as exc:
        sub.error(str(exc))
    except launching.RankError as exc:
        print(f"spdbench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spdbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
