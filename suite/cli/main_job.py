"""``spdbench run``: the main job, from a fresh install to the comparison report.

Its steps are ordinary spdbench commands, printed before they start, each writing under ``--out`` and
resuming from it; docs/main-job.md describes them, what each informs and what they cost.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import yaml

from suite.cli.common import at_least, check_model
from suite.defaults import DEPLOYMENT
from suite.errors import SpdbenchError

SPD_STRATEGIES = ["spd", "spd+ladder", "spd+tokenweave"]  # each runs the same SPD plan
STRATEGIES = ["baseline", *SPD_STRATEGIES, "ladder", "tokenweave", "seqpar", "nocomm"]  # others: default options
# Perplexity and task accuracy: seqpar computes what tokenweave does, nocomm is no model; the exact baseline's
# accuracy does not depend on N (the report's reference at any N), so it runs at one. The composites are scored
# through their own code path (spd+tokenweave is spd's model: its rows show it).
REFERENCE = "baseline"
ACCURACY_STRATEGIES = [REFERENCE, *SPD_STRATEGIES, "ladder", "tokenweave"]
SPD_BUDGET = 50  # % of blocks with SPD: the least sensitive half
SWEEP_BUDGETS = "0,25,50,75,100"  # the SPD perplexity curve (zero-shot) at the largest N
# WikiText-2 test perplexity per strategy x N: 2048 tokens, in windows enough for a paired standard error
PPL_SAMPLES, PPL_SEQ_LEN = 16, 128
# The simulated scenario: the deployment one at batch 1 (latency-bound decode) and 16 (a served batch).
SIMULATED = {"batch": [1, 16], **DEPLOYMENT}
LARGE_TP = [4, 8]
# Measured on this machine: a check that every strategy runs, so one small repetition (on a CPU the
# timings rank nothing; more repetitions would only cost time).
MEASURED = {
    "dtype": "float32",
    "device": "cpu",
    "decode_mode": "eager",
    "batch": 2,
    "prompt_len": 16,
    "new_tokens": 4,
    "repetitions": 1,
    "warmup": 0,
}


def _spd_options(tp: int, plans: dict[int, Path]) -> dict[str, str]:
    return {"plan": str(plans[tp])} if tp in plans else {"blocks": "all"}


def _options(name: str, tp: int, plans: dict[int, Path]) -> dict[str, str]:
    """SPD and its composites (``spd+...``) run the plan of N; the others their defaults."""
    return _spd_options(tp, plans) if name == "spd" or name.startswith("spd+") else {}


def _strategy_args(names: list[str], tp: int, plans: dict[int, Path]) -> list[str]:
    """``--strategy NAME[:KEY=VALUE,...]`` per strategy, as ``spd ppl`` and ``eval`` take them."""
    return [
        w
        for name in names
        for w in (
            "--strategy",
            name
            + ":" * bool(_options(name, tp, plans))
            + ",".join(f"{k}={v}" for k, v in _options(name, tp, plans).items()),
        )
    ]


def _strategies(tp: int, plans: dict[int, Path]) -> list[dict]:
    return [{"name": s, "options": _options(s, tp, plans)} for s in STRATEGIES]


def measured_matrix(model: str, tps: list[int], plans: dict[int, Path]) -> dict:
    return {"model": model, **MEASURED, "matrices": [{"tp": tp, "strategies": _strategies(tp, plans)} for tp in tps]}


def simulated_matrix(
    model: str,
    tps: list[int],
    plans: dict[int, Path],
    system: tuple[str, str],
    large: str | None,
    large_spd_blocks: int,
) -> dict:
    """The same strategies and plans at the model's shape, and at the large model's with SPD on
    ``large_spd_blocks`` blocks, simulated on ``system`` (device profile, interconnect)."""
    device_profile, interconnect = system
    matrices = [{"model": model, "tp": tp, "strategies": _strategies(tp, plans)} for tp in tps]
    if large:
        spd = {"blocks": f"last:{large_spd_blocks}"}
        matrices.append(
            {
                "model": large,
                "tp": LARGE_TP,
                "strategies": [{"name": s, "options": spd if s in SPD_STRATEGIES else {}} for s in STRATEGIES],
            }
        )
    return {
        "mode": "simulated",
        "device_profile": device_profile,
        "interconnect": interconnect,
        **SIMULATED,
        "matrices": matrices,
    }


def parse_system(text: str) -> tuple[str, str] | None:
    """``DEVICE_PROFILE:INTERCONNECT`` -> the pair; ``none`` -> None."""
    if text == "none":
        return None
    device_profile, sep, interconnect = text.partition(":")
    if not sep or not device_profile or not interconnect:
        raise SpdbenchError(
            f"simulate {text!r}: expected DEVICE_PROFILE:INTERCONNECT (e.g. h100-sxm:h100-nvswitch) or none"
        )
    return device_profile, interconnect


def _spd_blocks(model: str, percent: int) -> int:
    """Blocks in ``percent`` of the model's blocks, rounded as ``spdbench spd plan --budget`` rounds."""
    from suite.model.sources import resolve

    return round(percent / 100 * resolve(model).config.num_hidden_layers)


def steps_of(args) -> list[list[str]]:
    """The spdbench commands of the job, in order (their inputs written under ``--out``)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ["report", str(out), "-o", str(out / "report.html")]
    if args.config:
        return [["bench", "--config", args.config, "--out", str(out)], report]
    steps, plans = [], {}
    for tp in (n for n in args.tp if n > 1):
        sensitivity, plans[tp] = out / "spd" / f"sensitivity-tp{tp}.json", out / "spd" / f"plan-tp{tp}.json"
        steps.append(
            [
                "spd",
                "sensitivity",
                "--model",
                args.model,
                "--tp",
                str(tp),
                "--samples",
                str(args.samples),
                "--seq-len",
                str(args.seq_len),
                "--out",
                str(sensitivity),
                "--results",
                str(out / "spd.jsonl"),
            ]
        )
        steps.append(
            [
                "spd",
                "plan",
                "--sensitivity",
                str(sensitivity),
                "--budget",
                f"{SPD_BUDGET}%",
                "--variant",
                "zs",
                "--out",
                str(plans[tp]),
            ]
        )
    system = parse_system(args.simulate)
    if system:
        large = None if args.large_model == "none" else args.large_model
        matrix = simulated_matrix(
            args.model, args.tp, plans, system, large, _spd_blocks(large, SPD_BUDGET) if large else 0
        )
        steps.append(["bench", "--config", _write(out / "simulated.yaml", matrix), "--out", str(out)])
    measured = measured_matrix(args.model, [max(args.tp)], plans)  # the check needs one N: the most ranks
    steps.append(["bench", "--config", _write(out / "measured.yaml", measured), "--out", str(out)])
    communicating = [tp for tp in args.tp if tp > 1] or args.tp  # accuracy costs matter where there is a sync
    for tp in communicating:
        steps.append(
            [
                "spd",
                "ppl",
                "--model",
                args.model,
                "--tp",
                str(tp),
                *_strategy_args(ACCURACY_STRATEGIES, tp, plans),
                "--samples",
                str(PPL_SAMPLES),
                "--seq-len",
                str(PPL_SEQ_LEN),
                "--out",
                str(out / "perplexity.jsonl"),
            ]
        )
    if plans:
        tp = max(plans)
        steps.append(
            [
                "spd",
                "sweep",
                "--model",
                args.model,
                "--tp",
                str(tp),
                "--sensitivity",
                str(out / "spd" / f"sensitivity-tp{tp}.json"),
                "--metric",
                "ppl",
                "--variants",
                "zs",
                "--budgets",
                SWEEP_BUDGETS,
                "--eval-samples",
                str(PPL_SAMPLES),
                "--eval-seq-len",
                str(PPL_SEQ_LEN),
                "--out",
                str(out / "spd" / f"sweep-tp{tp}"),
                "--results",
                str(out / "spd.jsonl"),
            ]
        )
    for tp in communicating:  # every strategy of N on one launch of N ranks
        names = [n for n in ACCURACY_STRATEGIES if n != REFERENCE or tp == communicating[0]]
        steps.append(
            [
                "eval",
                "--model",
                args.model,
                "--tp",
                str(tp),
                *_strategy_args(names, tp, plans),
                "--tasks",
                args.tasks,
                "--limit",
                str(args.limit),
                "--out",
                str(out / "accuracy.jsonl"),
            ]
        )
    return [*steps, report]


def _write(path: Path, matrix: dict) -> str:
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return str(path)


def cmd_run(args, parser) -> int:
    from suite.cli import EXIT_USAGE, main

    at_least(1, tp=min(args.tp), limit=args.limit, samples=args.samples, seq_len=args.seq_len)
    check_model(args.model)
    if args.large_model != "none":
        check_model(args.large_model)
    system = parse_system(args.simulate)
    if system:
        from suite.latency.interconnect import load_profile  # light: checked before torch loads

        load_profile(system[1])
    if args.config and not Path(args.config).is_file():
        raise SpdbenchError(f"config {args.config}: no such file")
    if not [t for t in args.tasks.split(",") if t.strip()]:
        raise SpdbenchError("tasks is empty: name at least one task, e.g. --tasks piqa,arc_easy")
    steps = steps_of(args)
    start, failed, took = time.monotonic(), [], []
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {shlex.join(['spdbench', *step])}", flush=True)
        began = time.monotonic()
        try:
            code = main(["-v", *step] if getattr(args, "verbose", False) else step)
        except SystemExit as exc:  # a step's bad-input exit
            code = exc.code
        took.append((i, " ".join(step[:2] if step[0] == "spd" else step[:1]), time.monotonic() - began))
        print(f"[{i}/{len(steps)}] {took[-1][2]:.0f} s", flush=True)
        if code == EXIT_USAGE:
            print(f"spdbench run: step {i} stopped on bad input (exit {code}); fix it and re-run to resume")
            return code
        if code:
            failed.append(i)
            print(f"spdbench run: step {i} failed (exit {code}); the job goes on, the report shows what failed")
    report = Path(args.out) / "report.html"
    print(f"done in {time.monotonic() - start:.0f} s; report: {report}")
    print("seconds per step: " + ", ".join(f"{i} {what} {t:.0f}" for i, what, t in took))
    if failed:
        print(
            f"spdbench run: step{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed; "
            "re-run the same command to retry (finished work is kept)"
        )
        return 1
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the main job: SPD plans, simulated and measured latency, accuracy, report",
        description="The main job on the embedded default, as spdbench commands it prints: see "
        "docs/main-job.md. Re-running resumes and adds no rows.",
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="the model (smollm2-135m: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP degrees N of every step")
    p.add_argument(
        "--simulate",
        default="h100-sxm:h100-nvswitch",
        metavar="DEVICE_PROFILE:INTERCONNECT",
        help="the GPU system the latency is simulated on (8 GPUs and their links); none: no simulation",
    )
    p.add_argument(
        "--large-model",
        default="random:llama3-70b",
        help=f"also simulated, at N = {' and '.join(map(str, LARGE_TP))}; none: only --model",
    )
    p.add_argument("--config", help="run this YAML latency matrix instead (no SPD, simulated or accuracy steps)")
    p.add_argument("--tasks", default="piqa,arc_easy", help="lm-eval tasks of the accuracy pass")
    p.add_argument("--limit", type=int, default=20, help="documents per task in the accuracy pass")
    p.add_argument("--samples", type=int, default=4, help="calibration windows of the quick sensitivity pass")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--out", default="out/run", help="output folder; re-running resumes from it")
    p.set_defaults(handler=cmd_run)
