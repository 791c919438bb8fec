"""``spdbench report RESULTS... -o report.html``: one self-contained HTML page from result files."""

from __future__ import annotations


def cmd_report(args, parser) -> int:
    from reports.render import ReportError, write

    if not args.output.endswith((".html", ".htm")):
        parser.error(f"--output {args.output} should name an .html file (e.g. -o report.html)")
    try:
        out = write(args.results, args.output, args.title)
    except ReportError as exc:
        parser.error(str(exc))
    print(f"wrote {out}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("report", help="HTML report (tables, figures, environment) from result files")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="JSONL result stores (spdbench bench/eval/project/spd) and pytest-benchmark JSON files")
    p.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--title", default="spdbench report", help="page title")
    p.set_defaults(handler=cmd_report)
