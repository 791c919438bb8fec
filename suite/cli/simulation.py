"""``spdbench devbench`` and ``validate-simulation``: the device side of simulated latency."""

from __future__ import annotations

import json
from pathlib import Path

from suite.cli.common import at_least, command_line
from suite.errors import SpdbenchError


def cmd_devbench(args, parser) -> int:
    at_least(0, device_index=args.device_index)
    if args.out and not args.out.endswith((".yaml", ".yml")):
        raise SpdbenchError(f"out {args.out!r}: the profile is written as YAML: give a .yaml file name")
    from suite.latency import devbench

    data = devbench.profile(devbench.measure(args.device_index), args.name)
    path = devbench.write(data, args.out)
    print(f"device profile written to {path}; use it with device_profile: {path}")
    return 0


def cmd_validate(args, parser) -> int:
    from suite.latency import studies
    from suite.latency.simulation import kernel_checks, validation

    published = validation.load_published(args.published)
    decode = validation.validate_decode(published, args.device_profile, args.interconnect)
    kernels = kernel_checks.checks(args.kernels)
    datasets = [validation.validate_dataset(validation.load_published(name)) for name in validation.DATASETS]
    if args.json:
        print(json.dumps({"decode": decode, "kernels": kernels, "datasets": datasets}, default=str))
    else:
        import pandas as pd

        table = pd.DataFrame(decode["cells"])[["model", "tp", "published", "simulated", "error_pct"]]
        print(
            f"{decode['title']}: simulated on {decode['simulation']['device_profile']} + "
            f"{decode['simulation']['interconnect']}; error = simulated / measured - 1 (tokens/s)"
        )
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        for key, label in (("required", "the bar's cells"), ("all", "every row")):
            s = decode[key]
            print(
                f"{label}: median |error| {s['median_abs_error_pct']:.1f}%, worst {s['worst_abs_error_pct']:.1f}% "
                f"({s['worst_cell']}), OOM matched {s['oom_matched']} of {s['oom_cells']}"
            )
        bar = decode["bar"]
        print(
            f"bar (median <= {bar['median_abs_error_pct']}%, worst <= {bar['worst_abs_error_pct']}%): "
            f"{'met' if decode['meets_bar'] else 'not met'}"
        )
        for data in datasets:
            s = data["summary"]
            print(
                f"{data['name']} ({data['measure']}, kernels {data['simulation']['kernels']}): {s['cells']} cells, "
                f"median |error| {s['median_abs_error_pct']:.1f}%, worst {s['worst_abs_error_pct']:.1f}% "
                f"(target {data['target']['median_abs_error_pct']}% / {data['target']['worst_abs_error_pct']}%): "
                f"{'met' if data['meets_target'] else 'not met'}"
            )
    if args.write:
        path = Path(args.write)
        path.write_text(validation.markdown(decode, kernels, datasets, studies.studies(), command_line()))
        print(f"written {path}")
    return 0


def add_devbench(sub) -> None:
    p = sub.add_parser(
        "devbench",
        help="measure a device profile on the GPU at hand (for mode: simulated)",
        description="Times GEMMs, GEMVs, attention, tiny kernels and launches on this GPU with "
        "CUDA events (well under a minute) and writes a device profile file.",
    )
    p.add_argument("--out", help="profile file to write (default: NAME.yaml)")
    p.add_argument("--name", help="profile name (default: measured-GPU-NAME)")
    p.add_argument("--device-index", type=int, default=0, help="CUDA device to measure")
    p.set_defaults(handler=cmd_devbench)


def add_validate_simulation(sub) -> None:
    p = sub.add_parser(
        "validate-simulation",
        help="simulated cells against published measurements, error per cell",
        description="Simulates every cell of a published end-to-end table as it was measured "
        "(default: gpt-fast's tensor-parallel decode on 8x A100) and prints the error of tokens/s "
        "per cell, the median and the worst; --write renders docs/validation.md, with the simulated "
        "studies of suite/latency/studies.",
    )
    p.add_argument("--published", default="gpt-fast-tp", help="published table: a shipped name or a file")
    p.add_argument(
        "--kernels",
        default="vidur-gemm",
        help="the GEMM times the device profiles were derived from: a shipped name or a file",
    )
    p.add_argument("--device-profile", help="device profile (default: the table's own)")
    p.add_argument("--interconnect", help="interconnect profile (default: the table's own)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--write", metavar="MARKDOWN", help="write the validation page (e.g. docs/validation.md)")
    p.set_defaults(handler=cmd_validate)
