"""``spdbench report RESULTS... -o report.html``: one self-contained HTML page from result files."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from suite.errors import SpdbenchError


def cmd_report(args, parser) -> int:
    if not args.output.endswith((".html", ".htm")):
        parser.error(f"--output {args.output} should name an .html file (e.g. -o report.html)")
    missing = [p for p in args.results if not Path(p).exists()]
    if missing:  # answered before pandas and matplotlib load
        raise SpdbenchError(f"results {missing[0]}: no such file or folder")
    from reports import gate
    from reports.frames import load
    from reports.render import write

    max_drop = gate.parse_limits(args.max_accuracy_drop, "--max-accuracy-drop")
    min_accuracy = gate.parse_limits(args.min_accuracy, "--min-accuracy")
    results = load(args.results)
    checks = gate.check(results.rows, max_drop, min_accuracy) if max_drop or min_accuracy else None
    print(f"wrote {write(results, args.output, args.title, checks)}")
    failed = [text for text, ok in checks or [] if not ok]
    for text in failed:
        print(f"spdbench report: regression: {text}", file=sys.stderr)
    return 1 if failed else 0


NOT_CHOICES = ("nocomm", "seqpar")  # a latency bound, and tokenweave's sync without its overlap: no one's pick


def cmd_atlas(args, parser) -> int:
    from reports.atlas import BATCHES, MODELS, SYSTEMS
    from suite.cli.common import at_least, check_model
    from suite.vocabulary import check_strategy, installed_strategies

    unknown = [s for s in args.systems or [] if s not in SYSTEMS]
    if unknown:
        raise SpdbenchError(f"system {unknown[0]!r} is unknown; choose among {', '.join(SYSTEMS)}")
    at_least(1, tp=min(args.tp or [1]), batch=min(args.batch or [1]))
    models = args.models or MODELS
    for model in models:
        check_model(model)
    strategies = args.strategies or sorted(installed_strategies() - set(NOT_CHOICES))
    for name in strategies:
        check_strategy(name)
    extra = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpdbenchError(f"set {pair!r}: expected KEY=VALUE, a bench matrix key (e.g. kernels=compiled)")
        extra[key] = yaml.safe_load(value)
    import time

    from reports import atlas
    from suite.cli import main
    from suite.model.sources import resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "atlas.yaml"
    matrix = atlas.matrix(
        {m: resolve(m).config.num_hidden_layers for m in models},
        args.systems or list(SYSTEMS),
        args.tp,
        args.batch or BATCHES,
        strategies,
        extra,
    )
    config.write_text(yaml.safe_dump(matrix, sort_keys=False))
    start = time.monotonic()
    code = main(["bench", "--config", str(config), "--out", str(out)])
    page = atlas.write(out / "bench.jsonl", out / "atlas.html")
    print(f"wrote {page} ({time.monotonic() - start:.0f} s)")
    return code


def add_atlas(sub) -> None:
    from reports.atlas import BATCHES, MODELS, SYSTEMS

    p = sub.add_parser("atlas", help="simulated decision map: which method wins per system x N, model and batch")
    p.add_argument("--out", default="out/atlas", help="folder of the rows (resumed) and atlas.html")
    p.add_argument("--models", nargs="+", help=f"models (default: {' '.join(MODELS)})")
    p.add_argument("--systems", nargs="+", help=f"systems (default: all: {', '.join(SYSTEMS)})")
    p.add_argument("--tp", type=int, nargs="+", help="N to keep (default: each system's: 2 4 8 in a node, 16 over two)")
    p.add_argument("--batch", type=int, nargs="+", help=f"batch sizes (default: {' '.join(map(str, BATCHES))})")
    p.add_argument(
        "--strategies",
        nargs="+",
        help="strategies (default: every installed one but nocomm, a bound, and seqpar, an analysis of tokenweave)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further bench matrix key for every cell, repeatable (YAML value)",
    )
    p.set_defaults(handler=cmd_atlas)


def add_command(sub) -> None:
    p = sub.add_parser("report", help="HTML report (tables, figures, environment) from result files")
    p.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS",
        help="JSONL result stores (spdbench bench/eval/spd), folders of them (e.g. the --out of "
        "'spdbench run'), and pytest-benchmark JSON files",
    )
    p.add_argument("-o", "--output", default="report.html", help="the HTML file to write")
    p.add_argument("--title", default="spdbench report", help="page title")
    p.add_argument(
        "--max-accuracy-drop",
        action="append",
        default=[],
        metavar="STRATEGY=PP",
        help="fail (exit 1) if STRATEGY's mean accuracy is more than PP points below the baseline's "
        "(repeatable, e.g. tokenweave=0.5)",
    )
    p.add_argument(
        "--min-accuracy",
        action="append",
        default=[],
        metavar="TASK=VALUE",
        help="fail (exit 1) if the baseline's accuracy on TASK is below VALUE (repeatable, e.g. piqa=0.6)",
    )
    p.set_defaults(handler=cmd_report)
