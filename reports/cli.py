"""``spdbench report RESULTS... -o report.html``: one self-contained HTML page from result files."""

from __future__ import annotations

import sys
from pathlib import Path

from suite.errors import SpdbenchError


def cmd_report(args, parser) -> int:
    if not args.output.endswith((".html", ".htm")):
        parser.error(f"--output {args.output} should name an .html file (e.g. -o report.html)")
    missing = [p for p in args.results if not Path(p).exists()]
    if missing:  # answered before pandas and matplotlib load
        raise SpdbenchError(f"results {missing[0]}: no such file or folder")
    from reports import gate
    from reports.render import load, write
    max_drop = gate.parse_limits(args.max_accuracy_drop, "--max-accuracy-drop")
    min_accuracy = gate.parse_limits(args.min_accuracy, "--min-accuracy")
    results = load(args.results)
    checks = gate.check(results.rows, max_drop, min_accuracy) if max_drop or min_accuracy else None
    print(f"wrote {write(results, args.output, args.title, checks)}")
    failed = [text for text, ok in checks or [] if not ok]
    for text in failed:
        print(f"spdbench report: regression: {text}", file=sys.stderr)
    return 1 if failed else 0


def add_command(sub) -> None:
    p = sub.add_parser("report", help="HTML report (tables, figures, environment) from result files")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="JSONL result stores (spdbench bench/eval/spd), folders of them (e.g. the --out of "
                        "'spdbench run'), and pytest-benchmark JSON files")
    p.add_argument("-o", "--output", default="report.html", help="the HTML file to write")
    p.add_argument("--title", default="spdbench report", help="page title")
    p.add_argument("--max-accuracy-drop", action="append", default=[], metavar="STRATEGY=PP",
                   help="fail (exit 1) if STRATEGY's mean accuracy is more than PP points below the baseline's "
                        "(repeatable, e.g. tokenweave=0.5)")
    p.add_argument("--min-accuracy", action="append", default=[], metavar="TASK=VALUE",
                   help="fail (exit 1) if the baseline's accuracy on TASK is below VALUE (repeatable, e.g. piqa=0.6)")
    p.set_defaults(handler=cmd_report)
