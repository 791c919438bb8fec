"""What composing SPD with an overlap schedule buys, from simulated rows (docs/composition.md).

    spdbench bench --config configs/simulated-composition.yaml --out out/composition
    python scripts/composition.py out/composition/bench.jsonl            # the tables
    python scripts/composition.py --clock h100-sxm h100-nvswitch 8 16     # one cell on the virtual clock

The tables: each strategy's end-to-end speedup over baseline per system and N (batch 16; "-": no row,
e.g. it does not fit), and every comparison a composite loses against one of its parts at the same plan
(``reports/composition.py``, the report's section of the same name). ``--clock
simulates one cell's prefill and decode step per strategy and prints where the time goes: compute
busy (any kernel running), link busy, and exposed communication (a collective in flight while no
kernel runs: compute waiting on it).
"""

from __future__ import annotations

import argparse

from reports import analysis, composition, frames
from reports.cells import REFERENCE

SHOWN = ["spd", "spd+ladder", "ladder", "spd+tokenweave", "tokenweave"]


def markdown(header: list[str], rows: list[list]) -> str:
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header), *rows])


def speedups(lat, batch: int) -> str:
    """End-to-end speedup over the baseline per system and N at one batch; SPD columns: one per plan."""
    lat = lat[lat.batch == batch]
    base = lat[lat.strategy == REFERENCE].set_index("scenario").e2e_ms_median
    rows = []
    for (link, tp), g in lat.groupby(["interconnect", "tp"]):
        cells = []
        for name in SHOWN:
            runs = g[g.strategy == name].sort_values("options", key=lambda o: o.map(len), ascending=False)
            cells.append(" / ".join(f"{base[r.scenario] / r.e2e_ms_median:.2f}x" for r in runs.itertuples()) or "-")
        rows.append([link, tp, *cells])
    return markdown(["system", "N", *SHOWN], rows)


def clock(device: str, link: str, tp: int, batch: int, blocks: str, kernels: str) -> None:
    from suite.latency.simulation.cells import Simulator, load_profiles
    from suite.model.sources import resolve
    from suite.parallel.strategy import bound_strategy

    model, simulator = "random:llama3-70b", Simulator(*load_profiles(device, link), kernels)
    print(
        f"{model} on {device} + {link}, {kernels} kernels, N = {tp}, batch {batch}, prompt 1024, "
        f"SPD blocks {blocks} (ms)"
    )
    print("| strategy | step | time | compute busy | link busy | exposed communication | kernels |")
    print("|---|---|---|---|---|---|---|")
    for name in ["baseline", "nocomm", *SHOWN]:
        strategy = bound_strategy(name, {"blocks": blocks} if name.startswith("spd") else {}, resolve(model), tp)
        rank, shard = simulator.rank_model(model, "float16", tp, strategy)
        for step, new_tokens in (("prefill", 1), ("decode", 512)):  # the clock holds the last step simulated
            generation = simulator.generation(shard, strategy, tp, rank, batch, 1024, new_tokens, True)
            ran = generation.decode or generation.prefill
            merged: list[list[float]] = []
            for start, end in sorted(simulator.clock.busy):
                if merged and start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            busy = sum(end - start for start, end in merged)
            print(
                f"| {name} | {step} | {ran.seconds * 1e3:.2f} | {busy * 1e3:.2f} | {ran.link_s * 1e3:.2f} | "
                f"{ran.exposed_s * 1e3:.2f} | {ran.kernels} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", help="bench.jsonl of configs/simulated-composition.yaml")
    parser.add_argument("--batch", type=int, default=16, help="the speedup table's batch")
    parser.add_argument(
        "--clock",
        nargs=4,
        metavar=("DEVICE", "INTERCONNECT", "N", "BATCH"),
        help="simulate one cell per strategy and print where the time goes",
    )
    parser.add_argument("--blocks", default="last:40", help="with --clock: the SPD blocks")
    parser.add_argument("--kernels", default="compiled", help="with --clock: the kernel regime")
    args = parser.parse_args()
    if args.clock:
        device, link, tp, batch = args.clock
        clock(device, link, int(tp), int(batch), args.blocks, args.kernels)
    elif args.rows:
        rows = frames.load([args.rows])
        lat = analysis.latency_table(frames.frame(rows.rows, "latency"), {})
        print(speedups(lat, args.batch), "\n")
        for system in composition.slower(lat):
            print(f"{system['title']}: slower in {system['slower']} of {system['compared']} comparisons")
            print(markdown(system["header"], system["rows"]), "\n")
    else:
        parser.error("give the rows file or --clock")


if __name__ == "__main__":
    main()
