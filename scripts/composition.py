"""What composing SPD with an overlap schedule buys, from simulated rows (docs/composition.md).

    spdbench bench --config configs/simulated-composition.yaml --out out/composition
    python scripts/composition.py out/composition/bench.jsonl            # the tables
    python scripts/composition.py --clock h100-sxm h100-nvswitch 8 16     # one cell on the virtual clock

The tables: each strategy's end-to-end speedup over baseline per system and N (batch 16), and every
cell (system, N, batch, step, plan) where a composite is slower than one of its parts. ``--clock``
simulates one cell's prefill and decode step per strategy and prints where the time goes: compute
busy (any kernel running), link busy, and exposed communication (a collective in flight while no
kernel runs: compute waiting on it).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

PARTS = {"spd+ladder": "ladder", "spd+tokenweave": "tokenweave"}
STEPS = {"prefill": "prefill_ms_median", "decode": "decode_ms_per_token_median"}
PLANS = {"last:40": "50%", "all": "100%"}
SHOWN = ["spd", "spd+ladder", "ladder", "spd+tokenweave", "tokenweave"]


def load(path: str) -> dict:
    """(interconnect, tp, batch) -> (strategy, plan) -> row, ok rows only."""
    cells = defaultdict(dict)
    for line in open(path):
        row = json.loads(line)
        if row["status"] == "ok":
            plan = row["strategy_options"].get("blocks", "")
            cells[row["interconnect"], row["tp"], row["batch"]][row["strategy"], plan] = row
    return cells


def speedups(cells: dict, batch: int) -> str:
    lines = ["| system | N | " + " | ".join(SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for (link, tp, b), rows in sorted(cells.items()):
        if b != batch:
            continue
        base = rows["baseline", ""]["e2e_ms_median"]
        shown = []
        for name in SHOWN:
            if name in ("ladder", "tokenweave"):
                shown.append(f"{base / rows[name, '']['e2e_ms_median']:.2f}x")
            else:
                shown.append(" / ".join(f"{base / rows[name, p]['e2e_ms_median']:.2f}x" for p in PLANS))
        lines.append(f"| {link} | {tp} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def slower(cells: dict) -> str:
    lines = ["| composite | system | step | plan | N x batch where it is slower than a part (composite / part ms) |",
             "|---|---|---|---|---|"]
    for composite, overlap in PARTS.items():
        for link in sorted({k[0] for k in cells}):
            for step, key in STEPS.items():
                for plan in PLANS:
                    found = []
                    for (l, tp, b), rows in sorted(cells.items()):
                        if l != link or (composite, plan) not in rows:
                            continue
                        ours = rows[composite, plan][key]
                        worse = [(part[0], rows[part][key]) for part in (("spd", plan), (overlap, ""))
                                 if ours > rows[part][key]]
                        if worse:
                            parts = ", ".join(f"{name} {ms:.1f}" for name, ms in worse)
                            found.append(f"{tp}x{b} ({ours:.1f} / {parts})")
                    total = sum(1 for (l, _, _), rows in cells.items() if l == link and (composite, plan) in rows)
                    lines.append(f"| {composite} | {link} | {step} | {PLANS[plan]} | "
                                 f"{len(found)} of {total}: {'; '.join(found) or '-'} |")
    return "\n".join(lines)


def clock(device: str, link: str, tp: int, batch: int, blocks: str) -> None:
    from suite.latency.simulation.cells import Simulator, load_profiles
    from suite.model.sources import resolve
    from suite.parallel.strategy import bound_strategy

    model, simulator = "random:llama3-70b", Simulator(*load_profiles(device, link))
    print(f"{model} on {device} + {link}, N = {tp}, batch {batch}, prompt 1024, SPD blocks {blocks} (ms)")
    print("| strategy | step | time | compute busy | link busy | exposed communication | kernels |")
    print("|---|---|---|---|---|---|---|")
    for name in ["baseline", "nocomm", *SHOWN]:
        strategy = bound_strategy(name, {"blocks": blocks} if name.startswith("spd") else {}, resolve(model), tp)
        rank, shard = simulator.rank_model(model, "float16", tp, strategy)
        for step, new_tokens in (("prefill", 1), ("decode", 2)):  # the clock holds the last step simulated
            generation = simulator.generation(shard, strategy, tp, rank, batch, 1024, new_tokens, True)
            ran = generation.decode or generation.prefill
            merged: list[list[float]] = []
            for start, end in sorted(simulator.clock.busy):
                if merged and start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            busy = sum(end - start for start, end in merged)
            print(f"| {name} | {step} | {ran.seconds * 1e3:.2f} | {busy * 1e3:.2f} | {ran.link_s * 1e3:.2f} | "
                  f"{ran.exposed_s * 1e3:.2f} | {ran.kernels} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", help="bench.jsonl of configs/simulated-composition.yaml")
    parser.add_argument("--batch", type=int, default=16, help="the speedup table's batch")
    parser.add_argument("--clock", nargs=4, metavar=("DEVICE", "INTERCONNECT", "N", "BATCH"),
                        help="simulate one cell per strategy and print where the time goes")
    parser.add_argument("--blocks", default="last:40", help="with --clock: the SPD blocks")
    args = parser.parse_args()
    if args.clock:
        device, link, tp, batch = args.clock
        clock(device, link, int(tp), int(batch), args.blocks)
    elif args.rows:
        cells = load(args.rows)
        print(speedups(cells, args.batch), "\n")
        print(slower(cells))
    else:
        parser.error("give the rows file or --clock")


if __name__ == "__main__":
    main()
