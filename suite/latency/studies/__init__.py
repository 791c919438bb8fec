"""Simulated studies that ``docs/validation.md`` reports after the validation, so that no figure on the page
is typed by hand. Each is a bench matrix beside this file (``spdbench bench --config`` runs
it on its own), simulated with ``simulate_cells`` and summarised here for the page's template:

- ``spd-pcie``: the SPD paper's headline setting on ``pcie-nop2p``, SPD's latency below baseline's per
  decode launch mode, with the profile's small all-reduce by N;
- ``tokenweave-prefill``: TokenWeave's prefill against the no-communication model, its fused sync and
  the portable one, each cell's ratio and the cells outside the range TokenWeave's results allow;
- ``kernel-regimes``: each strategy's prefill against baseline's and its share of the
  no-communication bound, (baseline - strategy) / (baseline - nocomm), under eager and compiled kernels.
"""

from __future__ import annotations

from pathlib import Path

from suite.errors import SpdbenchError
from suite.latency.bench import load_config
from suite.latency.device import load_device
from suite.latency.interconnect import load_profile

STUDY_DIR = Path(__file__).parent
NEAR_BOUND = (0.9, 1.2)  # TokenWeave reports prefills close to, sometimes just below, the model without communication


def study_cells(name: str) -> list:
    return load_config(STUDY_DIR / f"{name}.yaml")


def simulate(cells) -> list[dict]:
    """Each cell's settings and simulated figures (ms); a cell that fails stops the study."""
    from suite.latency.simulation.cells import simulate_cells

    rows = []
    for cell, values, error in simulate_cells(cells):
        if error:
            raise SpdbenchError(f"study cell {cell.strategy} on {cell.model} at N = {cell.tp}: {error}")
        rows.append(
            {
                "strategy": variant(cell.strategy, cell.strategy_options),
                "kernels": cell.kernels,
                "decode_mode": cell.decode_mode,
                "tp": cell.tp,
                "prompt_len": cell.prompt_len,
                "prefill_ms": values["prefill_ms_median"],
                "decode_ms": values["decode_ms_per_token_median"],
                "e2e_ms": values["e2e_ms_median"],
            }
        )
    return rows


def variant(strategy: str, options: dict) -> str:
    """The strategy's name, with the one option these studies vary."""
    return f"{strategy} fused=false" if str(options.get("fused", "")).lower() == "false" else strategy


def spd_pcie(cells: list, rows: list[dict]) -> dict:
    from suite.model.sources import resolve

    cell = next(c for c in cells if c.strategy == "spd")
    profile = load_profile(cell.interconnect)
    by = {(r["decode_mode"], r["strategy"]): r for r in rows}
    modes = []
    for mode in sorted({r["decode_mode"] for r in rows}):
        base, spd = by[mode, "baseline"], by[mode, "spd"]
        modes.append(
            {
                "decode_mode": mode,
                "below_pct": 100 * (1 - spd["e2e_ms"] / base["e2e_ms"]),
                "baseline_step_ms": base["decode_ms"],
                "spd_step_ms": spd["decode_ms"],
            }
        )
    smallest = {
        launch: {n: 1e6 * profile.seconds("all_reduce", n, 8, launch) for n in profile.ns(launch)}
        for launch in profile.launches()
    }
    return {
        "cell": cell,
        "dropped": int(cell.strategy_options["blocks"].removeprefix("last:")),
        "blocks": resolve(cell.model).config.num_hidden_layers,
        "modes": modes,
        "smallest_all_reduce_us": smallest,
        "method": profile.method["cuda_graph"],
    }


def tokenweave_prefill(cells: list, rows: list[dict]) -> dict:
    cell = cells[0]
    by = {(r["kernels"], r["tp"], r["prompt_len"], r["strategy"]): r for r in rows}
    table = []
    for kernels, tp, prompt in sorted({k[:3] for k in by}):
        nocomm = by[kernels, tp, prompt, "nocomm"]["prefill_ms"]
        row = {"kernels": kernels, "tp": tp, "prompt_len": prompt, "nocomm": nocomm}
        for name in ("tokenweave", "tokenweave fused=false", "baseline"):
            row[name] = by[kernels, tp, prompt, name]["prefill_ms"]
            row[f"{name} ratio"] = row[name] / nocomm
        table.append(row)
    low, high = NEAR_BOUND
    variants = {}
    for name in ("tokenweave", "tokenweave fused=false"):
        ratios = [r[f"{name} ratio"] for r in table]
        variants[name] = {
            "lowest": min(ratios),
            "highest": max(ratios),
            "outside": [r for r in table if not low <= r[f"{name} ratio"] <= high],
        }
    device, link = load_device(cell.device_profile), load_profile(cell.interconnect)
    return {
        "cell": cell,
        "rows": table,
        "variants": variants,
        "range": NEAR_BOUND,
        "comm_sms": link.sms,
        "device_sms": device.sms,
        "gemm_tflops": {m: device.flops_per_s("gemm", m) / 1e12 for m in (512, 1024)},
    }


def kernel_regimes(cells: list, rows: list[dict]) -> dict:
    cell = cells[0]
    table = []
    for kernels in sorted({r["kernels"] for r in rows}, key=["eager", "compiled"].index):
        of = {r["strategy"]: r for r in rows if r["kernels"] == kernels}
        base, bound = of["baseline"]["prefill_ms"], of["nocomm"]["prefill_ms"]
        for name, r in of.items():
            table.append(
                {
                    "kernels": kernels,
                    "strategy": name,
                    "prefill_ms": r["prefill_ms"],
                    "speedup": base / r["prefill_ms"],
                    "bound_share_pct": 100 * (base - r["prefill_ms"]) / (base - bound),
                    "to_nocomm": r["prefill_ms"] / bound,
                    "decode_ms": r["decode_ms"],
                    "decode_vs_baseline_pct": 100 * (r["decode_ms"] / of["baseline"]["decode_ms"] - 1),
                }
            )
    return {"cell": cell, "rows": table, "by": {(r["kernels"], r["strategy"]): r for r in table}}


SUMMARIES = {"spd-pcie": spd_pcie, "tokenweave-prefill": tokenweave_prefill, "kernel-regimes": kernel_regimes}


def studies(cells: dict[str, list] | None = None) -> dict:
    """Every study simulated and summarised, keyed by name with ``-`` as ``_`` (``cells``: a subset per
    study, for a quicker check)."""
    chosen = {name: cells[name] if cells else study_cells(name) for name in SUMMARIES}
    return {
        name.replace("-", "_"): summary(chosen[name], simulate(chosen[name])) for name, summary in SUMMARIES.items()
    }
