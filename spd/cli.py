"""``spdbench spd ...``: sensitivity analysis, plans, B2B distillation and the perplexity sweep."""

from __future__ import annotations

from suite.cli.common import add_placement_args, at_least, command_line
from suite.defaults import EMBEDDED_MODEL


def _run_args(p) -> None:
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help="smollm2-135m, random:<preset>, a .gguf, an HF folder or hub id")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree N the plan is for")
    add_placement_args(p)


def _calib_args(p, samples: int, seq_len: int) -> None:
    p.add_argument("--calib", help="calibration text (default: calibration_wiki/wiki.utf8 in the data folder, "
                                   "SPDBENCH_DATA or ../shared/data)")
    p.add_argument("--samples", type=int, default=samples, help="calibration windows (random offsets, fixed seed)")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets")


def _distill_args(p) -> None:
    from spd.settings import DistillSettings

    d = DistillSettings()
    p.add_argument("--epochs", type=int, default=d.epochs, help="B2B epochs (paper: 10)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (paper: 5e-5)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per optimizer step")
    p.add_argument("--train-norms", action="store_true", help="also train the block's RMSNorm weights")
    p.add_argument("--heldout-samples", type=int, default=d.heldout_samples,
                   help="held-out windows (seed+1) on which the before/after MSE is measured")


def cmd_sensitivity(args, parser) -> int:
    at_least(1, tp=args.tp, samples=args.samples, seq_len=args.seq_len)
    from spd.sensitivity import analyse, rows
    from suite.parallel import launch as launching
    from suite.results import ResultStore

    launching.placement(args.tp, args.device, args.backend)
    state = analyse(args.model, args.tp, args.out, args.calib, args.samples, args.seq_len, args.seed,
                    device=args.device, backend=args.backend, timeout_s=args.timeout)
    if args.results:
        ResultStore(args.results).append(*rows(state, command_line()))
    ranked = sorted(state["sensitivity"].items(), key=lambda kv: kv[1])
    print(f"baseline perplexity {state['ppl'][str(state['n_layers'])]:.3f}; least sensitive blocks: "
          + ", ".join(f"{b} ({s:+.3f})" for b, s in ranked[:5]))
    print(f"wrote {args.out}")
    return 0


def cmd_plan(args, parser) -> int:
    from spd.plan import make_plan
    from spd.sensitivity import load_sensitivity

    plan = make_plan(load_sensitivity(args.sensitivity), args.budget, args.t1, args.t2, args.variant)
    plan.save(args.out)
    modes = [plan.mode(b) for b in sorted(plan.blocks)]
    print(f"{plan.budget['blocks']} of {plan.budget['of']} blocks SPD: " + ", ".join(
        f"{m} {modes.count(m)}" for m in ("zs", "b2b", "hg+b2b")) +
        f" (t1={plan.thresholds['t1']:.4g}, t2={plan.thresholds['t2']:.4g}); wrote {args.out}")
    return 0


def _settings(args):
    from spd.settings import DistillSettings

    return DistillSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, train_norms=args.train_norms,
                           samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                           heldout_samples=args.heldout_samples, heldout_seed=args.seed + 1, calib=args.calib)


def cmd_distill(args, parser) -> int:
    at_least(1, samples=args.samples, seq_len=args.seq_len, epochs=args.epochs, batch_size=args.batch_size)
    from spd.distill import distill_to

    path = distill_to(args.plan, args.out, _settings(args), args.model)
    print(f"wrote {path} and its weights")
    return 0


def cmd_sweep(args, parser) -> int:
    at_least(1, tp=args.tp, samples=args.samples, seq_len=args.seq_len, eval_samples=args.eval_samples,
             eval_seq_len=args.eval_seq_len)
    from spd.sweep import sweep
    from suite.parallel import launch as launching

    budgets = [int(b) for b in args.budgets.split(",")]
    launching.placement(args.tp, args.device, args.backend)
    table = sweep(args.model, args.tp, args.sensitivity, budgets, _settings(args), args.out, args.eval_samples,
                  args.eval_seq_len, args.results, command_line(), device=args.device, backend=args.backend,
                  timeout=args.timeout)
    print(table.to_string())
    return 0


def add_command(sub) -> None:
    spd = sub.add_parser("spd", help="SPD tooling: sensitivity, plan, distill, sweep")
    cmds = spd.add_subparsers(dest="spd_command", required=True, parser_class=type(spd))

    p = cmds.add_parser("sensitivity", help="per-block sensitivity by progressive zero-shot SPD (resumable)")
    _run_args(p)
    _calib_args(p, samples=8, seq_len=256)
    p.add_argument("--out", required=True, help="sensitivity JSON (re-read to resume)")
    p.add_argument("--results", help="also append spd_sensitivity rows to this JSONL results file")
    p.set_defaults(handler=cmd_sensitivity)

    p = cmds.add_parser("plan", help="SPD plan for a budget of blocks from a sensitivity file")
    p.add_argument("--sensitivity", required=True, help="output of `spdbench spd sensitivity`")
    p.add_argument("--budget", required=True, help="share of blocks (50%%) or a block count (15)")
    p.add_argument("--t1", type=float, help="ISB/SB threshold (default: 1/3 quantile of all sensitivities)")
    p.add_argument("--t2", type=float, help="SB/ESB threshold (default: 2/3 quantile of all sensitivities)")
    p.add_argument("--variant", default="zs+b2b+hg", choices=["zs", "zs+b2b", "zs+b2b+hg"],
                   help="zs: every SPD block zero-shot; zs+b2b: no head grouping; zs+b2b+hg: full")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_plan)

    p = cmds.add_parser("distill", help="B2B distillation (and head grouping) of a plan's SB/ESB blocks")
    p.add_argument("--plan", required=True)
    p.add_argument("--model", help="model, when the plan's model identity is not a --model value (HF folders)")
    _calib_args(p, samples=16, seq_len=256)
    _distill_args(p)
    p.add_argument("--out", required=True, help="folder for plan.json and weights.safetensors")
    p.set_defaults(handler=cmd_distill)

    p = cmds.add_parser("sweep", help="WikiText-2 perplexity for budgets x {zs, zs+b2b, zs+b2b+hg}")
    _run_args(p)
    _calib_args(p, samples=16, seq_len=256)
    _distill_args(p)
    p.add_argument("--sensitivity", required=True, help="output of `spdbench spd sensitivity` for --model/--tp")
    p.add_argument("--budgets", default="0,25,50,75,100", help="percentages of SPD blocks")
    p.add_argument("--eval-samples", type=int, default=16, help="WikiText-2 test windows (consecutive)")
    p.add_argument("--eval-seq-len", type=int, default=256, help="tokens per WikiText-2 window")
    p.add_argument("--out", required=True, help="folder for the plans and distilled weights (reused when present)")
    p.add_argument("--results", help="append spd_ppl rows to this JSONL results file")
    p.set_defaults(handler=cmd_sweep)
