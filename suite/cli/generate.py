"""``spdbench generate``: greedy generation on N tensor-parallel ranks."""

from __future__ import annotations

import json

from suite.cli.common import add_model_args, at_least, check_model, kernels_of, strategy_options


def _generate_job(
    comm,
    device,
    model: str,
    strategy: str,
    options: dict,
    dtype: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    cuda_graph: bool,
    kernels: str,
):
    from suite.parallel.runner import load_runner

    runner = load_runner(comm, device, model, strategy, options, dtype, kernels)
    return runner.generate(prompts, max_new_tokens, cuda_graph=cuda_graph)


def cmd_generate(args, parser) -> int:
    at_least(1, tp=args.tp, max_new_tokens=args.max_new_tokens)
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    if any(not p for p in args.prompt):
        parser.error("--prompt must not be empty")
    check_model(args.model)
    name, options = strategy_options(args)

    from suite.model.sharding import check_tp
    from suite.model.sources import resolve
    from suite.parallel import launch as launching
    from suite.parallel.strategy import bound_strategy

    launching.placement(args.tp, args.device, args.backend)
    source = resolve(args.model)  # validates the model and fills the weight cache before ranks start
    check_tp(source.config, args.tp)
    strategy = bound_strategy(name, options, source, args.tp)  # e.g. an SPD plan made for another model or N
    tokenizer = source.tokenizer()
    prompts = [tokenizer.encode(p) for p in args.prompt]
    gen = launching.launch(
        _generate_job,
        args.tp,
        args.model,
        name,
        options,
        args.dtype,
        prompts,
        args.max_new_tokens,
        args.cuda_graph,
        kernels_of(args),
        device=args.device,
        backend=args.backend,
        timeout_s=args.timeout,
    )
    if not launching.is_main_rank():
        return 0
    eos = getattr(tokenizer, "eos_token_id", None)
    texts = [
        tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True) for ids in gen.tokens
    ]
    decode_ms = 1e3 * sum(gen.decode_s) / len(gen.decode_s) if gen.decode_s else None
    result = {
        "model": args.model,
        "strategy": name,
        "strategy_options": strategy.options(),
        "tp": args.tp,
        "dtype": args.dtype,
        "device": args.device,
        "kernels": kernels_of(args),
        "usable_model": strategy.usable,
        "token_ids": gen.tokens,
        "text": texts,
        "prefill_ms": 1e3 * gen.prefill_s,
        "decode_ms_per_token": decode_ms,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print_model_warning(strategy, "text")
    for prompt, text in zip(args.prompt, texts):
        print(f"--- {prompt!r}\n{text}")
    per_token = f"{decode_ms:.2f} ms/token" if decode_ms is not None else "n/a"
    print(f"prefill {result['prefill_ms']:.1f} ms, decode {per_token} ({name}, tp={args.tp})")
    return 0


def print_model_warning(strategy, what: str) -> None:
    """One line when the strategy is not the pretrained model (a bound, or a changed model)."""
    if not strategy.usable:
        print(f"note: {strategy.name} is a latency bound, not a usable model: its {what} is meaningless")
    elif strategy.changes_model:
        print(
            f"note: {strategy.name} changes the model (no retraining here): its {what} may differ from the "
            "pretrained model's"
        )


def add_command(sub) -> None:
    gen = sub.add_parser("generate", help="greedy generation on N tensor-parallel ranks")
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text, repeatable (one batch)")
    gen.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens generated per prompt (exact: no stop at EOS)"
    )
    gen.add_argument("--cuda-graph", action="store_true", help="capture decode in a CUDA graph")
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.set_defaults(handler=cmd_generate)
