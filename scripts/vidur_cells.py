"""Write the per-kernel check cells of docs/validation.md from Vidur's profiling files.

    SPDBENCH_DATA=<data folder> python scripts/vidur_cells.py

Reads the copies of microsoft/vidur's files in ``$SPDBENCH_DATA/published/`` (see that folder's README)
and writes ``suite/latency/published/vidur-gemm-checks.yaml`` (every GEMM of the profiled layer at the
shipped token counts, the points a device profile was derived from marked) and ``vidur-all-reduce.yaml``
(the median kernel time per size range). Rerun it only if those files change; the cells it writes are
what the validation reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import yaml

OUT = Path(__file__).parents[1] / "suite" / "latency" / "published"
VIDUR = "microsoft/vidur @7d47513"
MLP_FILES = {  # file in the data folder -> (device profile, Vidur's path)
    "vidur-compute-h100-Llama-2-70b-hf_mlp.csv": ("h100-sxm", "h100/meta-llama/Llama-2-70b-hf"),
    "vidur-compute-h100-Llama-2-7b-hf_mlp.csv": ("h100-sxm", "h100/meta-llama/Llama-2-7b-hf"),
    "vidur-compute-a100-Llama-2-70b-hf_mlp.csv": ("a100-sxm-80gb", "a100/meta-llama/Llama-2-70b-hf"),
    "vidur-compute-a100-Meta-Llama-3-70B_mlp.csv": ("a100-sxm-80gb", "a100/meta-llama/Meta-Llama-3-70B"),
    "vidur-compute-a100-Meta-Llama-3-8B_mlp.csv": ("a100-sxm-80gb", "a100/meta-llama/Meta-Llama-3-8B"),
}
TOKENS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
NETWORK_FILES = {
    "vidur-network-a100_dgx_all_reduce.csv": ("a100-nvlink", "a100_dgx"),
    "vidur-network-h100_dgx_all_reduce.csv": ("h100-nvswitch", "h100_dgx"),
}
SIZE_RANGES = [
    (8 << 10, 64 << 10),
    (64 << 10, 256 << 10),
    (256 << 10, 1 << 20),
    (1 << 20, 4 << 20),
    (4 << 20, 16 << 20),
]
SIZE_RANGES += [(16 << 20, 64 << 20)]


def gemm_shapes(row) -> dict[str, tuple[int, int]]:
    """(K, N) of each GEMM of the layer on one of ``num_tensor_parallel_workers`` ranks."""
    tp, hidden = int(row.num_tensor_parallel_workers), int(row.n_embd)
    head_dim = hidden // int(row.n_head)
    q, kv = int(row.n_head) // tp, max(int(row.n_kv_head) // tp, 1)
    inner = int(row.n_expanded_embd) // tp
    return {
        "attn_pre_proj": (hidden, (q + 2 * kv) * head_dim),
        "attn_post_proj": (q * head_dim, hidden),
        "mlp_up_proj": (hidden, 2 * inner),
        "mlp_down_proj": (inner, hidden),
    }


def profile_points() -> dict[tuple, list[int]]:
    """The token counts each device profile's GEMM table was derived from, by (device, K, N)."""
    table = yaml.safe_load((OUT / "vidur-gemm.yaml").read_text())
    k, n = table["shape"]["k"], table["shape"]["n"]
    return {(c["device_profile"], k, n): c["profile_from"] for c in table["cells"]}


def gemm_cells(data: Path) -> list[dict]:
    points = profile_points()
    cells = []
    for name, (device, path) in MLP_FILES.items():
        table = pd.read_csv(data / name)
        table = table[table.num_tokens.isin(TOKENS)]
        for tp, rows in table.groupby("num_tensor_parallel_workers"):
            shapes = gemm_shapes(rows.iloc[0])
            for op, (k, n) in shapes.items():
                column = rows.groupby("num_tokens")[f"time_stats.{op}.median"].median()  # repeated rows: their median
                times = [[int(m), round(float(t), 4)] for m, t in column.items()]
                cell = {"device_profile": device, "model": path.split("/")[-1], "tp": int(tp), "op": op, "k": k, "n": n}
                if (device, k, n) in points:
                    cell["profile_from"] = points[device, k, n]
                cells.append(cell | {"times_ms": times})
    return cells


def all_reduce_cells(data: Path) -> list[dict]:
    cells = []
    for name, (interconnect, _) in NETWORK_FILES.items():
        table = pd.read_csv(data / name)
        table = table[table.devices_per_node == table.num_workers]  # one node
        for n, rows in table.groupby("num_workers"):
            for lo, hi in SIZE_RANGES:
                sizes = rows[(rows["size"] >= lo) & (rows["size"] < hi)]
                median_us = 1e3 * sizes["time_stats.all_reduce.median"].median()
                cells.append({"interconnect": interconnect, "n": int(n), "bytes_from": lo, "bytes_to": hi,
                              "sizes": len(sizes), "median_bytes": int(sizes["size"].median()),
                              "median_us": round(float(median_us), 1)})  # fmt: skip
    return cells


def write(name: str, head: dict, cells: list[dict]) -> None:
    text = yaml.safe_dump(head, sort_keys=False, width=110) + "cells:\n"
    text += "".join(
        f"  - {yaml.safe_dump(c, default_flow_style=True, sort_keys=False, width=10**6).strip()}\n" for c in cells
    )
    (OUT / name).write_text(text)


def main() -> None:
    data = Path(os.environ.get("SPDBENCH_DATA", "data")) / "published"
    mlp_paths = ", ".join(path for _, path in MLP_FILES.values())
    write(
        "vidur-gemm-checks.yaml",
        {
            "name": "vidur-gemm-checks",
            "title": "Vidur's GEMM times of the profiled LLaMA layer (fp16, TP 1-8, one GPU, no collectives)",
            "sources": [
                f"{VIDUR} data/profiling/compute/{{{mlp_paths}}}/mlp.csv: the median kernel time (ms, torch profiler)"
                " of attn_pre_proj (fused QKV), attn_post_proj, mlp_up_proj (fused gate+up) and mlp_down_proj, with"
                " the weights sharded for num_tensor_parallel_workers; written by scripts/vidur_cells.py"
            ],
        },
        gemm_cells(data),
    )
    net_paths = ", ".join(path for _, path in NETWORK_FILES.values())
    write(
        "vidur-all-reduce.yaml",
        {
            "name": "vidur-all-reduce",
            "title": "Vidur's NCCL all-reduce kernel times on one DGX-A100 and one DGX-H100 node, N = 2, 4, 8",
            "sources": [
                f"{VIDUR} data/profiling/network/{{{net_paths}}}/all_reduce.csv: torch.distributed.all_reduce of"
                " an fp16 buffer, the NCCL kernel's time from a Kineto trace (launch excluded, waiting for peers"
                " included), rank 0; median_us = the median of the per-size medians in [bytes_from, bytes_to)"
                " (small sizes are bimodal), median_bytes the median size there; written by scripts/vidur_cells.py"
            ],
        },
        all_reduce_cells(data),
    )


if __name__ == "__main__":
    main()
