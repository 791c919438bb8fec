"""``spdbench spd ...``: sensitivity analysis, plans, B2B distillation, the budget sweeps and strategy perplexity."""

from __future__ import annotations

from spd.settings import PAPER_TASKS, SPD_STRATEGIES
from suite.cli.common import add_placement_args, at_least, command_line, parse_strategy
from suite.defaults import DEVICES, DTYPE_NAMES, EMBEDDED_MODEL
from suite.errors import SpdbenchError
from suite.vocabulary import SPD_VARIANTS


def _model_args(p, tp_required: bool = True) -> None:
    p.add_argument(
        "--model", default=EMBEDDED_MODEL, help="smollm2-135m, random:<preset>, a .gguf, an HF folder or hub id"
    )
    p.add_argument("--tp", type=int, required=tp_required, help="tensor-parallel degree N the plan is for")


def _device_arg(p) -> None:
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the block-by-block tooling runs (one block of the model in memory at a time)",
    )


def _calib_args(p, samples: int, seq_len: int) -> None:
    p.add_argument(
        "--calib",
        help="calibration text (default: calibration_wiki/wiki.utf8 in the data folder, "
        "SPDBENCH_DATA or ../shared/data)",
    )
    p.add_argument(
        "--samples", type=int, default=samples, help="calibration windows (random offsets, fixed seed; the paper: 128)"
    )
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per calibration window (the paper: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets")


def _distill_args(p) -> None:
    from spd.settings import DistillSettings

    d = DistillSettings()
    p.add_argument("--epochs", type=int, default=d.epochs, help="B2B epochs (paper: 10)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (paper: 5e-5)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per optimizer step")
    p.add_argument("--train-norms", action="store_true", help="also train the block's RMSNorm weights")
    p.add_argument(
        "--heldout-samples",
        type=int,
        default=d.heldout_samples,
        help="held-out windows (seed+1) on which the before/after MSE is measured",
    )
    p.add_argument(
        "--hg-split-kv-groups",
        action="store_true",
        help="head grouping may split KV groups: a rank then holds the extra KV heads its query heads "
        "read (needed when KV heads = N, e.g. Llama-3-8B at N = 8; the plan records the KV cost)",
    )


def cmd_sensitivity(args, parser) -> int:
    at_least(1, tp=args.tp, samples=args.samples, seq_len=args.seq_len, batch=args.batch, resamples=args.resamples)
    from spd.sensitivity import analyse, rows
    from suite.results import ResultStore

    state = analyse(
        args.model,
        args.tp,
        args.out,
        args.calib,
        args.samples,
        args.seq_len,
        args.seed,
        args.batch,
        args.device,
        args.resamples,
    )
    if args.results:
        ResultStore(args.results).append(*rows(state, command_line()))
    ranked = sorted(state["sensitivity"].items(), key=lambda kv: kv[1])
    stability = state["stability"]
    print(
        f"baseline perplexity {state['ppl'][str(state['n_layers'])]:.3f}; least sensitive blocks: "
        + ", ".join(f"{b} ({s:+.3f})" for b, s in ranked[:5])
    )
    print(
        f"stability ({stability['resamples']} bootstrap resamples of the {stability['windows']} windows, mean / "
        f"5th percentile): block-order rank correlation {stability['rank_correlation']['mean']:.3f} / "
        f"{stability['rank_correlation']['p05']:.3f}; chosen-set agreement "
        + ", ".join(f"{b} {v['mean']:.2f} / {v['p05']:.2f}" for b, v in stability["chosen_set_agreement"].items())
    )
    print(f"wrote {args.out}")
    return 0


def cmd_plan(args, parser) -> int:
    from spd.plan import make_plan, plan_for_blocks

    from_sensitivity = args.sensitivity is not None
    if (
        from_sensitivity != (args.budget is not None)
        or from_sensitivity == bool(args.blocks)
        or not from_sensitivity
        and (args.tp is None or args.t1 or args.t2)
    ):
        raise SpdbenchError(
            "plan: give either sensitivity and budget (e.g. --sensitivity sens.json --budget 50%), "
            "or model, tp and blocks (e.g. --model random:llama2-13b --tp 4 --blocks 0,5)"
        )
    if from_sensitivity:
        from spd.sensitivity import load_sensitivity

        plan = make_plan(load_sensitivity(args.sensitivity), args.budget, args.t1, args.t2, args.variant)
    else:
        at_least(1, tp=args.tp)
        from suite.model.sharding import check_tp
        from suite.model.sources import resolve

        source = resolve(args.model)
        check_tp(source.config, args.tp)
        plan = plan_for_blocks(source.identity, args.tp, source.config.num_hidden_layers, args.blocks, args.variant)
    plan.save(args.out)
    modes = [plan.mode(b) for b in sorted(plan.blocks)]
    limits = f" (t1={plan.thresholds['t1']:.4g}, t2={plan.thresholds['t2']:.4g})" if plan.thresholds else ""
    print(
        f"{plan.budget['blocks']} of {plan.budget['of']} blocks SPD: "
        + ", ".join(f"{m} {modes.count(m)}" for m in ("zs", "b2b", "hg+b2b"))
        + f"{limits}; wrote {args.out}"
    )
    return 0


def _settings(args):
    from spd.settings import DistillSettings

    return DistillSettings(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        train_norms=args.train_norms,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        heldout_samples=args.heldout_samples,
        heldout_seed=args.seed + 1,
        calib=args.calib,
        hg_split_kv_groups=args.hg_split_kv_groups,
        device=args.device,
    )


def cmd_distill(args, parser) -> int:
    at_least(
        1,
        samples=args.samples,
        seq_len=args.seq_len,
        epochs=args.epochs,
        batch_size=args.batch_size,
        heldout_samples=args.heldout_samples,
    )
    from spd.distill import distill_to

    path = distill_to(args.plan, args.out, _settings(args), args.model)
    print(f"wrote {path} and its weights")
    return 0


def cmd_sweep(args, parser) -> int:
    at_least(
        1,
        tp=args.tp,
        samples=args.samples,
        seq_len=args.seq_len,
        eval_samples=args.eval_samples,
        eval_seq_len=args.eval_seq_len,
        eval_batch_size=args.eval_batch_size,
    )
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise SpdbenchError(f"budgets {args.budgets!r}: expected comma-separated percentages, e.g. 0,25,50") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from spd import sweep
    from suite.parallel import launch as launching

    launching.placement(args.tp, args.device, args.backend)
    results = args.results or f"{args.out}/results.jsonl"
    if args.metric == "accuracy":
        from suite.accuracy.evaluate import parse_limits
        from suite.accuracy.tasks import data_dir

        parse_limits(args.limit, tasks)  # bad limits fail before the distillation
        folder = data_dir(args.data_dir)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or set(variants) - set(SPD_VARIANTS):
        raise SpdbenchError(f"variants {args.variants!r}: choose among {', '.join(SPD_VARIANTS)} (comma-separated)")
    paths = sweep.plans(args.model, args.tp, args.sensitivity, budgets, _settings(args), args.out, variants)
    if args.metric == "ppl":
        table = sweep.ppl_sweep(
            args.model,
            args.tp,
            paths,
            args.eval_samples,
            args.eval_seq_len,
            results,
            command_line(),
            device=args.device,
            backend=args.backend,
            timeout=args.timeout,
            strategy=args.strategy,
        )
    else:
        table = sweep.accuracy_sweep(
            args.model,
            args.tp,
            paths,
            tasks,
            args.limit,
            folder,
            results,
            command_line(),
            device=args.device,
            backend=args.backend,
            timeout=args.timeout,
            batch_size=args.eval_batch_size,
            strategy=args.strategy,
        )
    print(table.to_string())
    print(f"rows in {results}")
    return 0


def cmd_ppl(args, parser) -> int:
    at_least(1, tp=args.tp, samples=args.samples, seq_len=args.seq_len)
    configs = [parse_strategy(s) for s in args.strategy or ["baseline"]]
    from spd.ppl import strategy_ppl
    from suite.parallel import launch as launching

    launching.placement(args.tp, args.device, args.backend)
    for name, options, ppl in strategy_ppl(
        args.model,
        args.tp,
        configs,
        args.samples,
        args.seq_len,
        args.out,
        command_line(),
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        timeout=args.timeout,
    ):
        print(f"{name}{' ' + str(options) if options else ''} N={args.tp}: perplexity {ppl:.3f}")
    print(f"rows in {args.out}")
    return 0


def add_command(sub) -> None:
    spd = sub.add_parser("spd", help="SPD tooling: sensitivity, plan, distill, sweep")
    cmds = spd.add_subparsers(dest="spd_command", required=True, parser_class=type(spd))

    p = cmds.add_parser(
        "sensitivity",
        help="per-block sensitivity by progressive zero-shot SPD, with its "
        "bootstrap stability (streamed block by block; resumable)",
    )
    _model_args(p)
    _device_arg(p)
    _calib_args(p, samples=8, seq_len=256)
    p.add_argument(
        "--batch",
        type=int,
        default=8,
        help="windows per streamed pass (memory: L+1 residual streams of this many windows)",
    )
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the stability report")
    p.add_argument("--out", required=True, help="sensitivity JSON (re-read to resume)")
    p.add_argument("--results", help="also append spd_sensitivity and spd_stability rows to this JSONL file")
    p.set_defaults(handler=cmd_sensitivity)

    p = cmds.add_parser("plan", help="SPD plan: for a budget from a sensitivity file, or for given blocks")
    p.add_argument("--sensitivity", help="output of `spdbench spd sensitivity` (with --budget)")
    p.add_argument("--budget", help="share of blocks (50%%) or a block count (15), with --sensitivity")
    p.add_argument(
        "--t1",
        help="ISB/SB threshold: a perplexity increase (0.5) or a share of the baseline "
        "calibration perplexity (2%%); default: 1/3 quantile of all sensitivities",
    )
    p.add_argument("--t2", help="SB/ESB threshold, as --t1; default: 2/3 quantile of all sensitivities")
    _model_args(p, tp_required=False)
    p.add_argument(
        "--blocks",
        help="without a sensitivity file: the SPD blocks (all, last:K or i,j,...), each in the variant's mode",
    )
    p.add_argument(
        "--variant",
        default="zs+b2b+hg",
        choices=SPD_VARIANTS,
        help="zs: every SPD block zero-shot; zs+b2b: no head grouping; zs+b2b+hg: full",
    )
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_plan)

    p = cmds.add_parser(
        "distill", help="B2B distillation (and head grouping) of a plan's SB/ESB blocks (streamed block by block)"
    )
    p.add_argument("--plan", required=True)
    p.add_argument("--model", help="model, when the plan's model identity is not a --model value (HF folders)")
    _device_arg(p)
    _calib_args(p, samples=16, seq_len=256)
    _distill_args(p)
    p.add_argument("--out", required=True, help="folder for plan.json and weights.safetensors")
    p.set_defaults(handler=cmd_distill)

    p = cmds.add_parser("ppl", help="WikiText-2 test perplexity of strategies through the TP model (resumable)")
    _model_args(p)
    add_placement_args(p)
    p.add_argument(
        "--strategy",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="a strategy and its options, repeatable (e.g. spd:plan=plan.json); default baseline",
    )
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    p.add_argument("--samples", type=int, default=16, help="WikiText-2 test windows (consecutive)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--out", required=True, help="JSONL results file the perplexity rows are appended to")
    p.set_defaults(handler=cmd_ppl)

    p = cmds.add_parser(
        "sweep", help="perplexity or lm-eval accuracy for SPD budgets x {zs, zs+b2b, zs+b2b+hg} (resumable)"
    )
    _model_args(p)
    add_placement_args(p)
    _calib_args(p, samples=16, seq_len=256)
    _distill_args(p)
    p.add_argument("--sensitivity", required=True, help="output of `spdbench spd sensitivity` for --model/--tp")
    p.add_argument(
        "--metric",
        choices=["ppl", "accuracy"],
        default="ppl",
        help="ppl: WikiText-2 test perplexity; accuracy: lm-eval tasks (the paper's figure)",
    )
    p.add_argument("--budgets", default="0,25,50,75,100", help="percentages of SPD blocks")
    p.add_argument(
        "--strategy",
        choices=SPD_STRATEGIES,
        default="spd",
        help="run each plan as spd, or composed with ladder's or TokenWeave's schedule",
    )
    p.add_argument(
        "--variants",
        default="zs,zs+b2b,zs+b2b+hg",
        help="plan variants, comma-separated (zs alone needs no distillation)",
    )
    p.add_argument("--eval-samples", type=int, default=16, help="ppl: WikiText-2 test windows (consecutive)")
    p.add_argument("--eval-seq-len", type=int, default=256, help="ppl: tokens per WikiText-2 window")
    p.add_argument(
        "--tasks",
        default=",".join(PAPER_TASKS),
        help="accuracy: lm-eval tasks (the paper's zero-shot tasks, without SciQ)",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="K | TASK=K",
        help="accuracy: documents per task (default: all); TASK=K sets one task's, repeatable",
    )
    p.add_argument("--data-dir", help="accuracy: offline data folder (default: $SPDBENCH_DATA, else ../shared/data)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="accuracy: rows per forward pass")
    p.add_argument("--out", required=True, help="folder for the plans and distilled weights (reused when present)")
    p.add_argument("--results", help="JSONL results file the rows are appended to (default: OUT/results.jsonl)")
    p.set_defaults(handler=cmd_sweep)
