"""``spdbench devbench``: measure a device profile on the GPU at hand (as ``commbench`` does for links).

Every figure a device profile holds is timed with CUDA events on this GPU, in well under a minute:

- GEMM FLOP/s by M: bfloat16 matmuls of Vidur's Llama-2-7B ``mlp_up_proj`` shape (K = 4096, N = 22016)
  at M = 512, 1024, 4096 (compute-bound);
- the GEMM floor and the bandwidth of bandwidth-bound kernels: a straight line through M = 1 GEMVs
  over weights of 256, 512 and 768 MiB (its slope is the bandwidth, its intercept the floor), each
  several times a GPU's L2 cache (50 MB on an H100), so every call reads its weights from memory;
- attention FLOP/s: ``F.scaled_dot_product_attention`` forward, 32 heads of 128, 16k tokens per call,
  by sequence length, causal and full;
- the elementwise floor: back-to-back tiny adds issued while the stream is held (device time only);
- launch: host time to issue a tiny op (eager), the extra device time per node of a CUDA graph of tiny
  adds, and the host time to launch a replay;
- SM count and memory from the device properties.
"""

from __future__ import annotations

import datetime
import statistics
import time
from pathlib import Path

import yaml

from suite.errors import SpdbenchError
from suite.latency.device import DeviceProfile

GEMM_SHAPE = (4096, 22016)  # K, N
GEMM_ROWS = (512, 1024, 4096)
GEMV_WIDTHS = (32768, 65536, 98304)  # N of the M = 1 GEMVs (K = 4096): 256, 512, 768 MiB of bfloat16 weights
ATTENTION_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
ATTENTION_TOKENS, HEADS, HEAD_DIM = 16384, 32, 128
TINY = 1024  # elements of the tiny elementwise kernel
NODES = 1000  # tiny kernels per timed batch


class DevbenchError(SpdbenchError):
    """No GPU to measure, or a bad argument."""


def _elapsed_s(fn, iters: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the seconds per call of ``fn`` over ``iters`` back-to-back calls."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y = intercept + slope * x."""
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def measure(device_index: int = 0) -> dict:
    """Every figure of a device profile, measured on CUDA device ``device_index``."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise DevbenchError("no CUDA GPU is visible: devbench measures the GPU it runs on")
    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    props = torch.cuda.get_device_properties(device)
    bf16 = dict(dtype=torch.bfloat16, device=device)
    k, n = GEMM_SHAPE
    out = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "gemm_tflops": [],
        "gemv_points": [],
        "attention_tflops": {"causal": [], "full": []},
    }
    with torch.inference_mode():
        for m in GEMM_ROWS:
            a, b = torch.randn(m, k, **bf16), torch.randn(k, n, **bf16)
            out["gemm_tflops"].append([m, 2 * m * k * n / _elapsed_s(lambda: a @ b, 20) / 1e12])
        for width in GEMV_WIDTHS:
            x, w = torch.randn(1, k, **bf16), torch.randn(k, width, **bf16)
            out["gemv_points"].append([2 * (k * width + k + width), _elapsed_s(lambda: x @ w, 50)])
        for length in ATTENTION_LENGTHS:
            q = torch.randn(ATTENTION_TOKENS // length, HEADS, length, HEAD_DIM, **bf16)
            for causal, key in ((True, "causal"), (False, "full")):
                seconds = _elapsed_s(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=causal), 5)
                flops = 4 * ATTENTION_TOKENS * length * HEADS * HEAD_DIM * (0.5 if causal else 1.0)
                out["attention_tflops"][key].append([length, flops / seconds / 1e12])
        x = torch.zeros(TINY, device=device)

        def adds():
            for _ in range(NODES):
                x.add_(1)

        torch.cuda._sleep(50_000_000)  # hold the stream: the adds queue, and their device time is measured alone
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        issued = time.perf_counter()
        start.record()
        adds()
        end.record()
        out["eager_launch_s"] = (time.perf_counter() - issued) / NODES
        end.synchronize()
        out["elementwise_floor_s"] = start.elapsed_time(end) / 1e3 / NODES
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            adds()
        out["graph_node_s"] = max(0.0, _elapsed_s(graph.replay, 3) / NODES - out["elementwise_floor_s"])
        single = torch.cuda.CUDAGraph()
        with torch.cuda.graph(single, capture_error_mode="thread_local"):
            x.add_(1)
        torch.cuda.synchronize()
        issued = time.perf_counter()
        for _ in range(100):
            single.replay()
        out["graph_replay_s"] = (time.perf_counter() - issued) / 100
        torch.cuda.synchronize()
    return out


def profile(measured: dict, name: str | None = None, when: str | None = None) -> dict:
    """The device profile (YAML mapping) of ``devbench`` measurements."""
    floor, seconds_per_byte = _line(measured["gemv_points"])
    when = when or datetime.date.today().isoformat()
    data = {
        "name": name or f"measured-{measured['gpu'].lower().replace(' ', '-')}",
        "description": f"{measured['gpu']}, measured by spdbench devbench on {when}",
        "sources": [f"spdbench devbench on {measured['gpu']} ({when})"],
        "method": (
            f"GEMM TFLOP/s: bfloat16 matmuls of K = {GEMM_SHAPE[0]}, N = {GEMM_SHAPE[1]} at M = "
            f"{', '.join(map(str, GEMM_ROWS))}; bandwidth and GEMM floor: a least-squares line through M = 1 "
            f"GEMVs of N = {', '.join(map(str, GEMV_WIDTHS))}; attention: SDPA forward, {HEADS} heads of "
            f"{HEAD_DIM}, {ATTENTION_TOKENS} tokens per call; elementwise floor: {NODES} queued tiny adds, "
            f"device time; launch: host time per eager op and per replay, extra device time per graph "
            f"node. Times are medians of CUDA-event-timed loops. The attention floor is the GEMM floor "
            f"and fp32_fraction is the H100's datasheet ratio (not measured)."
        ),
        "sms": measured["sms"],
        "memory_gb": round(measured["memory_bytes"] / 1e9, 1),
        "bandwidth_gbps": round(1 / seconds_per_byte / 1e9, 1),
        "floor_us": {
            "gemm": round(max(floor, 0.0) * 1e6, 2),
            "attention": round(max(floor, 0.0) * 1e6, 2),
            "elementwise": round(measured["elementwise_floor_s"] * 1e6, 2),
        },
        "launch_us": {
            "eager": round(measured["eager_launch_s"] * 1e6, 2),
            "graph_node": round(measured["graph_node_s"] * 1e6, 2),
            "graph_replay": round(measured["graph_replay_s"] * 1e6, 2),
        },
        "gemm_tflops": [[m, round(t, 1)] for m, t in measured["gemm_tflops"]],
        "fp32_fraction": 0.0677,
        "attention_tflops": {k: [[n, round(t, 1)] for n, t in v] for k, v in measured["attention_tflops"].items()},
    }
    DeviceProfile.from_dict(data)  # the file it writes loads
    return data


def write(data: dict, out: str | None) -> Path:
    path = Path(out or f"{data['name']}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=110))
    return path
