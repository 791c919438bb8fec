"""``spdbench run``: the main job, from a fresh install to the comparison report.

On the embedded default (smollm2-135m, CPU, N = 1/2/4, every strategy) it runs, as ordinary
spdbench commands printed before they start:

1. a quick SPD sensitivity pass per N > 1 and a zero-shot plan for the least sensitive half of
   the blocks (at N = 1 an SPD block equals a baseline block, so SPD runs on every block);
2. the latency matrix (every strategy x N);
3. a small accuracy pass (lm-eval tasks with ``--limit``), every strategy x N;
4. the report.

Every step writes under ``--out`` and resumes from it: re-running after an interruption skips
what is finished. With ``--config`` the latency step runs the user's matrix instead, and the
SPD and accuracy steps are left out.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import yaml

from suite.cli.common import at_least

STRATEGIES = ["baseline", "spd", "ladder", "tokenweave", "seqpar", "nocomm"]
ACCURACY_STRATEGIES = ["baseline", "spd", "ladder", "tokenweave", "nocomm"]  # seqpar computes what tokenweave does
# Small prompts on CPU: let token splitting split them (it would not below 1024 tokens).
TOKENWEAVE = {"split_min_tokens": "0", "split_multiple": "8"}


def _strategy_options(name: str, tp: int, plans: dict[int, Path]) -> dict[str, str]:
    if name == "spd":
        return {"plan": str(plans[tp])} if tp in plans else {"blocks": "all"}
    return dict(TOKENWEAVE) if name == "tokenweave" else {}


def latency_matrix(args, plans: dict[int, Path]) -> dict:
    return {"model": args.model, "dtype": "float32", "device": "cpu", "decode_mode": "eager", "batch": 2,
            "prompt_len": 32, "new_tokens": 8, "repetitions": 3, "warmup": 1,
            "matrices": [{"tp": tp, "strategies": [{"name": s, "options": _strategy_options(s, tp, plans)}
                                                    for s in STRATEGIES]} for tp in args.tp]}


def cmd_run(args, parser) -> int:
    from suite.cli import main

    at_least(1, tp=min(args.tp), limit=args.limit, samples=args.samples, seq_len=args.seq_len)
    out = Path(args.out)
    spd_dir, results = out / "spd", out / "accuracy.jsonl"
    steps: list[list[str]] = []
    plans: dict[int, Path] = {}
    if args.config:
        matrix_file = Path(args.config)
    else:
        for tp in (n for n in args.tp if n > 1):
            sens, plans[tp] = spd_dir / f"sensitivity-tp{tp}.json", spd_dir / f"plan-tp{tp}.json"
            steps.append(["spd", "sensitivity", "--model", args.model, "--tp", str(tp), "--samples",
                          str(args.samples), "--seq-len", str(args.seq_len), "--out", str(sens),
                          "--results", str(out / "spd.jsonl")])
            steps.append(["spd", "plan", "--sensitivity", str(sens), "--budget", "50%", "--variant", "zs",
                          "--out", str(plans[tp])])
        matrix_file = out / "matrix.yaml"
        out.mkdir(parents=True, exist_ok=True)
        matrix_file.write_text(yaml.safe_dump(latency_matrix(args, plans), sort_keys=False))
    steps.append(["bench", "--config", str(matrix_file), "--out", str(out)])
    tasks = [t for t in args.tasks.split(",") if t]
    if not args.config:
        for tp in args.tp:
            for name in ACCURACY_STRATEGIES:
                opts = [w for k, v in _strategy_options(name, tp, plans).items() for w in ("--strategy-opt", f"{k}={v}")]
                steps.append(["eval", "--model", args.model, "--tp", str(tp), "--strategy", name, *opts,
                              "--tasks", ",".join(tasks), "--limit", str(args.limit), "--out", str(results)])
    report = out / "report.html"
    inputs = [str(p) for p in (out / "bench.jsonl", results, out / "spd.jsonl")]
    steps.append(["report", *inputs, "-o", str(report)])
    start = time.monotonic()
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {shlex.join(['spdbench', *step])}", flush=True)
        if step[0] == "report":  # only the result files that exist (e.g. no accuracy with --config)
            step = ["report", *[p for p in inputs if Path(p).exists()], "-o", str(report)]
        try:
            code = main(step)
        except SystemExit as exc:  # a step's bad-input exit
            code = exc.code
        if code:
            print(f"spdbench run: step {i} failed (exit {code}); re-run the same command to resume")
            return code
    print(f"done in {time.monotonic() - start:.0f} s; report: {report}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("run", help="the main job: SPD plan, latency matrix, accuracy pass, report")
    p.add_argument("--model", default="smollm2-135m", help="model (default: the embedded smollm2-135m)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP degrees (default 1 2 4)")
    p.add_argument("--config", help="run this YAML latency matrix instead of the default one (no SPD/accuracy steps)")
    p.add_argument("--tasks", default="piqa,arc_easy", help="lm-eval tasks of the accuracy pass")
    p.add_argument("--limit", type=int, default=20, help="documents per task in the accuracy pass")
    p.add_argument("--samples", type=int, default=4, help="calibration windows of the quick sensitivity pass")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--out", default="out/run", help="output folder (default out/run); re-running resumes")
    p.set_defaults(handler=cmd_run)
