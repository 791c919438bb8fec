"""``spdbench eval`` and ``spdbench lm-eval``: accuracy through the tensor-parallel model."""

from __future__ import annotations

import shlex
import sys
import time

from suite.cli.common import add_model_args, at_least, check_data_dir, check_model, kernels_of, strategy_specs
from suite.errors import SpdbenchError


def canonical_command(args, strategy: str, options: dict) -> str:
    """The command line that reproduces this evaluation."""
    words = ["spdbench", "eval", "--model", args.model, "--tp", str(args.tp), "--strategy", strategy]
    for key, value in options.items():
        words += ["--strategy-opt", f"{key}={value}"]
    words += ["--tasks", args.tasks]
    for limit in args.limit:
        words += ["--limit", limit]
    for option in ("data_dir", "max_length", "dtype", "device", "kernels"):
        if getattr(args, option) is not None:
            words += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return shlex.join(words + ["--out", str(args.out)])


def cmd_eval(args, parser) -> int:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise SpdbenchError("tasks is empty: name at least one task, e.g. --tasks piqa,arc_easy")
    at_least(1, tp=args.tp, max_length=args.max_length, batch_size=args.batch_size)
    check_model(args.model)
    check_data_dir(args.data_dir)
    configs = strategy_specs(args)
    from suite.accuracy.evaluate import evaluate, parse_limits
    from suite.accuracy.tasks import data_dir
    from suite.cli.generate import print_model_warning
    from suite.parallel.strategy import strategy_class
    from suite.results import ResultStore

    parse_limits(args.limit, names)
    folder = data_dir(args.data_dir)
    ResultStore(args.out).rows()  # a broken results file fails now, not after the evaluation
    start = time.perf_counter()
    results = evaluate(
        args.model,
        args.tp,
        [(s, o, canonical_command(args, s, o)) for s, o in configs],
        names,
        args.limit,
        folder,
        args.out,
        dtype=args.dtype,
        device=args.device,
        kernels=kernels_of(args),
        backend=args.backend,
        timeout=args.timeout,
        batch_size=args.batch_size,
        max_length=args.max_length,
        bootstrap_iters=args.bootstrap_iters,
    )
    for (strategy, options), rows in zip(configs, results):
        print(f"{strategy}{' ' + str(options) if options else ''} N={args.tp}:")
        print_model_warning(strategy_class(strategy), "score")
        for row in rows:
            stderr = row.values["stderr"]
            print(
                f"  {row.scenario.task:16s} {row.scenario.metric:16s} {row.values['value']:.4f}"
                + (f" ± {stderr:.4f}" if stderr is not None else "")
            )
    print(f"{sum(map(len, results))} rows in {args.out} ({time.perf_counter() - start:.0f} s, tp={args.tp})")
    return 0


def cmd_lm_eval(args, parser) -> int:
    """lm-eval's own command line, with the ``spdbench`` model registered and the local task data."""
    check_data_dir(args.data_dir)
    from lm_eval.__main__ import cli_evaluate

    import suite.accuracy.lm_eval_model  # noqa: F401  (registers the model ``spdbench``)
    from suite.accuracy.tasks import data_dir, include_dir

    argv = args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else list(args.lm_eval_args)
    folder = data_dir(args.data_dir)
    if folder and "--include_path" not in argv:
        argv = [*argv, "--include_path", str(include_dir(folder))]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy and perplexity with lm-eval's tasks on N tensor-parallel ranks")
    add_model_args(p, several=True)
    p.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval tasks, e.g. piqa,arc_easy,hellaswag,wikitext"
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="K | TASK=K",
        help="documents per task (default: all); TASK=K sets one task's, repeatable "
        "(e.g. --limit 50 --limit wikitext=2)",
    )
    p.add_argument(
        "--data-dir",
        help="offline data folder (default: $SPDBENCH_DATA, else ../shared/data next to "
        "the project if present, else the Hugging Face Hub)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument(
        "--max-length",
        type=int,
        help="context window in tokens (default: the model's); longer documents are scored in rolling windows",
    )
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=1000,
        help="bootstrap resamples for the stderr of perplexity-like metrics (lm-eval's default: 100000)",
    )
    p.add_argument("--out", required=True, help="results file (JSONL), appended to; re-running resumes")
    p.set_defaults(handler=cmd_eval)


def add_lm_eval(sub) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="lm-eval's own command line with the spdbench model and the local data",
        description="Runs lm-eval's CLI (arguments after --) with the model spdbench registered, "
        "e.g. spdbench lm-eval -- --model spdbench --model_args "
        "model=smollm2-135m,tp=4,strategy=spd,spd_plan=plan.json --tasks piqa --device cpu",
    )
    p.add_argument("--data-dir", help="offline data folder, as for 'spdbench eval'; its tasks replace the Hub's")
    p.add_argument("lm_eval_args", nargs="...", help="-- then lm-eval's arguments")
    p.set_defaults(handler=cmd_lm_eval)
