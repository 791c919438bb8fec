"""Simulated cells against published measurements (``suite/latency/published/*.yaml``, with their sources).

``validate_decode`` simulates every cell of an end-to-end table (gpt-fast's tensor-parallel decode
throughput) as the measured program ran it and gives the error of tokens/s per cell, the median and the
worst; a measured OOM is matched by a simulated "does not fit". ``validate_dataset`` does the same for a
table of prefill times, decode step times or end-to-end batch times (``measure``), each simulated under
the kernel regime, profiles and launch mode its implementation ran; cells left out of the summary (a
regime the simulation does not model) stay listed with the reason. ``DATASETS`` are the shipped ones.
``markdown`` renders them, with the per-kernel checks of ``kernel_checks`` and the simulated studies of
``studies``, as ``docs/validation.md``, so the document is regenerated, never edited, when a profile changes.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import jinja2

from suite.errors import SpdbenchError
from suite.latency.device import load_device
from suite.latency.profile_files import read_mapping

PUBLISHED_DIR = Path(__file__).parents[1] / "published"
PEERS_DIR = Path(__file__).parents[1] / "peers"  # other tools' outputs on the published tables
BAR = {"median_abs_error_pct": 15.0, "worst_abs_error_pct": 35.0}  # the bar of the required cells
TARGET = {"median_abs_error_pct": 10.0, "worst_abs_error_pct": 25.0}  # per dataset, beyond batch-1 decode
DATASETS = ("argonne-vllm-h100", "lmdeploy-llama2-70b", "splitwise-prefill")
MEASURES = {
    "prefill_ms": lambda run: 1e3 * run.prefill.seconds,
    "e2e_s": lambda run: run.e2e_s,
    "decode_ms": lambda run: 1e3 * run.decode.seconds,
}
TEMPLATE = Path(__file__).with_name("validation.md.j2")


def load_published(name_or_path: str) -> dict:
    """A shipped table by name (``gpt-fast-tp``) or a file of the same form."""
    data, path = read_mapping(name_or_path, PUBLISHED_DIR, "published", SpdbenchError)
    if not data.get("sources") or not data.get("cells"):
        raise SpdbenchError(f"{path}: expected a mapping with sources and cells")
    return data


def _summary(cells: list[dict]) -> dict:
    errors = [c for c in cells if c["error_pct"] is not None]
    if not errors:
        return {
            "cells": 0,
            "median_abs_error_pct": None,
            "worst_abs_error_pct": None,
            "worst_cell": None,
            "oom_matched": sum(c["oom_matched"] for c in cells),
            "oom_cells": sum(c["published"] == "OOM" for c in cells),
        }
    worst = max(errors, key=lambda c: abs(c["error_pct"]))
    return {
        "cells": len(errors),
        "median_abs_error_pct": statistics.median(abs(c["error_pct"]) for c in errors),
        "worst_abs_error_pct": abs(worst["error_pct"]),
        "worst_cell": f"{worst['model']} tp={worst['tp']}",
        "oom_matched": sum(c["oom_matched"] for c in cells),
        "oom_cells": sum(c["published"] == "OOM" for c in cells),
    }


def validate_decode(
    published: dict, device_profile: str | None = None, interconnect: str | None = None, strategy: str = "baseline"
) -> dict:
    """Every cell of ``published`` simulated as it was measured: per-cell errors and summaries."""
    import torch

    from suite.latency.interconnect import load_profile
    from suite.latency.projection import heaviest_rank
    from suite.latency.simulation.cells import DoesNotFit, Simulator
    from suite.model.sharding import build_weightless_rank_model
    from suite.model.sources import DTYPES, resolve
    from suite.parallel.strategy import bound_strategy

    setting = dict(published["simulation"])
    setting["device_profile"] = device_profile or setting["device_profile"]
    setting["interconnect"] = interconnect or setting["interconnect"]
    device, link = load_device(setting["device_profile"]), load_profile(setting["interconnect"])
    simulator = Simulator(device, link, setting["kernels"])
    rows = []
    for cell in published["cells"]:
        source = resolve(f"random:{cell['preset']}")
        chosen = bound_strategy(strategy, {}, source, cell["tp"])
        layout = chosen.layout(source.config, cell["tp"])
        rank = heaviest_rank(source.config, cell["tp"], layout)
        model = build_weightless_rank_model(source.config, cell["tp"], rank, DTYPES[setting["dtype"]], layout)
        row = {
            "model": cell["model"],
            "preset": cell["preset"],
            "tp": cell["tp"],
            "required": cell["required"],
            "published": cell.get("tokens_per_s", cell.get("outcome")),
        }
        try:
            with torch.no_grad():
                run = simulator.generation(
                    model,
                    chosen,
                    cell["tp"],
                    rank,
                    setting["batch"],
                    setting["prompt_len"],
                    setting["new_tokens"],
                    setting["decode_mode"] == "cuda_graph",
                )
        except DoesNotFit as exc:
            rows.append(
                row
                | {
                    "simulated": "does not fit",
                    "error_pct": None,
                    "note": str(exc),
                    "oom_matched": row["published"] == "OOM",
                    "decode_ms": None,
                    "link_ms": None,
                    "kernels": None,
                }
            )
            continue
        simulated = setting["batch"] * setting["new_tokens"] / run.e2e_s
        measured = row["published"] if isinstance(row["published"], (int, float)) else None
        rows.append(
            row
            | {
                "simulated": simulated,
                "oom_matched": False,
                "note": "",
                "error_pct": 100 * (simulated / measured - 1) if measured else None,
                "decode_ms": 1e3 * run.decode.seconds,
                "link_ms": 1e3 * run.decode.link_s,
                "kernels": run.decode.kernels,
            }
        )
    peer = _peer(published["name"], rows)
    required = [r for r in rows if r["required"]]
    summary = _summary(required)
    meets = (
        summary["cells"] > 0
        and summary["oom_matched"] == summary["oom_cells"]
        and all(summary[k] <= v for k, v in BAR.items())
    )
    return {
        "name": published["name"],
        "title": published["title"],
        "sources": published["sources"],
        "setting": published["setting"],
        "simulation": setting,
        "cells": rows,
        "required": summary,
        "all": _summary(rows),
        "bar": BAR,
        "meets_bar": meets,
        "peer": peer,
        "profiles": {
            "device": {"name": device.name, "sources": device.sources, "method": device.method},
            "interconnect": {"name": link.name, "sources": link.sources, "method": link.method},
        },
    }


def validate_dataset(published: dict) -> dict:
    """Every cell of a published prefill / decode / end-to-end table simulated as its implementation ran it."""
    import torch

    from suite.latency.interconnect import load_profile
    from suite.latency.projection import heaviest_rank
    from suite.latency.simulation.cells import DoesNotFit, Simulator
    from suite.model.sharding import build_weightless_rank_model
    from suite.model.sources import DTYPES, resolve
    from suite.parallel.strategy import bound_strategy

    setting, measure = published["simulation"], MEASURES[published["measure"]]
    simulators, models, rows = {}, {}, []
    for cell in published["cells"]:
        profiles = setting.get(cell.get("hardware"), setting)
        names = (profiles["device_profile"], profiles["interconnect"])
        if names not in simulators:
            simulators[names] = Simulator(load_device(names[0]), load_profile(names[1]), setting["kernels"])
        key = (cell["preset"], cell["tp"])
        if key not in models:
            source = resolve(f"random:{cell['preset']}")
            chosen = bound_strategy(setting["strategy"], {}, source, cell["tp"])
            layout = chosen.layout(source.config, cell["tp"])
            rank = heaviest_rank(source.config, cell["tp"], layout)
            models = {
                key: (
                    chosen,
                    rank,
                    build_weightless_rank_model(source.config, cell["tp"], rank, DTYPES[setting["dtype"]], layout),
                )
            }
        chosen, rank, model = models[key]
        batch, new_tokens = cell.get("batch", 1), cell.get("new_tokens", 1)
        row = {
            "model": cell["preset"],
            "hardware": names[0],
            "tp": cell["tp"],
            "batch": batch,
            "prompt_len": cell["prompt_len"],
            "new_tokens": new_tokens,
            "published": cell["measured"],
            "required": cell["required"],
        }
        try:
            with torch.no_grad():
                run = simulators[names].generation(
                    model,
                    chosen,
                    cell["tp"],
                    rank,
                    batch,
                    cell["prompt_len"],
                    new_tokens,
                    setting["decode_mode"] == "cuda_graph",
                )
        except DoesNotFit as exc:
            rows.append(row | {"simulated": None, "error_pct": None, "note": str(exc)})
            continue
        simulated = measure(run)
        rows.append(row | {"simulated": simulated, "error_pct": 100 * (simulated / cell["measured"] - 1), "note": ""})
    summary = _errors([r for r in rows if r["required"]])
    meets = summary["cells"] > 0 and all(summary[k] <= v for k, v in TARGET.items())
    return {
        "name": published["name"],
        "title": published["title"],
        "sources": published["sources"],
        "setting": published["setting"],
        "left_out": published.get("left_out", ""),
        "measure": published["measure"],
        "simulation": setting,
        "cells": rows,
        "summary": summary,
        "target": TARGET,
        "meets_target": meets,
    }


def _errors(rows: list[dict]) -> dict:
    errors = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
    return {
        "cells": len(errors),
        "median_abs_error_pct": statistics.median(errors) if errors else None,
        "worst_abs_error_pct": max(errors) if errors else None,
    }


def overall(decode: dict, datasets: list[dict]) -> dict:
    """Median and worst |error| over the summarised cells of every dataset (gpt-fast's bar cells included)."""
    rows = [c for c in decode["cells"] if c["required"]] + [r for d in datasets for r in d["cells"] if r["required"]]
    return _errors(rows)


def _peer(table: str, rows: list[dict]) -> dict | None:
    """GenZ-LLM's tokens/s on the same cells (``peers/genz-TABLE.yaml``), with its errors; adds
    ``peer_tokens_per_s`` and ``peer_error_pct`` to ``rows``."""
    path = PEERS_DIR / f"genz-{table}.yaml"
    if not path.is_file():
        return None
    data, _ = read_mapping(path, PEERS_DIR, "peer", SpdbenchError)
    by_cell = {(c["model"], c["tp"]): c["tokens_per_s"] for c in data["cells"]}
    for row in rows:
        tokens = by_cell.get((row["model"], row["tp"]))
        measured = row["published"] if isinstance(row["published"], (int, float)) else None
        row["peer_tokens_per_s"] = tokens
        row["peer_error_pct"] = 100 * (tokens / measured - 1) if tokens and measured else None
    summaries = {}
    for key, chosen in (("required", [r for r in rows if r["required"]]), ("all", rows)):
        errors = [abs(r["peer_error_pct"]) for r in chosen if r["peer_error_pct"] is not None]
        summaries[key] = {
            "cells": len(errors),
            "median_abs_error_pct": statistics.median(errors),
            "worst_abs_error_pct": max(errors),
        }
    return {"tool": data["tool"], "command": data["command"], "call": data["call"], **summaries}


def markdown(decode: dict, kernels: dict, datasets: list[dict], studies: dict, command: str) -> str:
    """``docs/validation.md``: the comparison, its sources, the simulated studies
    (``suite.latency.studies``) and the command that regenerates it."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    by_name = {d["name"]: d for d in datasets}

    def cells(data: dict, **keys) -> list[dict]:
        return [r for r in data["cells"] if all(r[k] == v for k, v in keys.items())]

    env.globals |= {
        "dataset": by_name.__getitem__,
        "cells": cells,
        "cell": lambda data, **keys: cells(data, **keys)[0],
        "device": load_device,
    }
    return env.from_string(TEMPLATE.read_text()).render(
        decode=decode,
        kernels=kernels,
        datasets=datasets,
        studies=studies,
        overall=overall(decode, datasets),
        command=command,
    )
