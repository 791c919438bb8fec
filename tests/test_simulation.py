"""Simulated latency: the kernel cost model and the virtual clock against times worked out by hand,
collectives (N = 1, SPD, ladder, TokenWeave's side stream), memory, the bench rows, devbench and the
validation against published measurements.

Expected times are written out from the toy profiles' numbers (or published measurements), never
taken from the code under test."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from suite.cli import main
from suite.latency import devbench
from suite.latency.bench import expand, run
from suite.latency.device import DeviceProfile, DeviceProfileError, available_devices, load_device
from suite.latency.interconnect import Profile
from suite.latency.simulation import CostMode, SimulatedCommunicator, Timeline, kernel_checks, simulate_cells
from suite.latency.simulation.attention import lower_right_share
from suite.latency.simulation.validation import load_published
from suite.model.sharding import build_weightless_rank_model
from suite.model.sources import resolve
from suite.parallel.strategy import available, bound_strategy
from suite.results import LatencyScenario

REPO = Path(__file__).resolve().parents[1]
US = 1e-6

# A toy GPU: 100 SMs, 1000 GB/s, GEMMs at 100 TFLOP/s, attention at 50, floors 2 / 2 / 0.5 us,
# no launch cost (so times add up by hand), 1 TB of memory.
TOY_DEVICE = {
    "name": "toy",
    "sources": ["test"],
    "method": "round numbers",
    "sms": 100,
    "memory_gb": 1000,
    "bandwidth_gbps": 1000,
    "floor_us": {"gemm": 2.0, "attention": 2.0, "elementwise": 0.5},
    "launch_us": {"eager": 0.0, "graph_node": 0.0, "graph_replay": 0.0},
    "gemm_tflops": [[1, 100]],
    "fp32_fraction": 0.5,
    "attention_tflops": {"causal": [[1, 50]], "full": [[1, 50]]},
}


def toy_device(**changes) -> DeviceProfile:
    return DeviceProfile.from_dict(TOY_DEVICE | changes)


def flat_link(latency_us: float, sms: int = 0, ns=(2, 4, 8)) -> Profile:
    """Every collective costs ``latency_us``, eager or under a CUDA graph."""
    rows = {n: [[1, latency_us, math.inf]] for n in ns}
    return Profile.from_dict(
        {
            "name": "flat",
            "sources": ["test"],
            "method": "constant",
            "sms": sms,
            "sms_source": "test",
            "tables": {"all_reduce": {"eager": rows, "cuda_graph": rows}},
        }
    )


def meta(*shape, dtype=torch.float16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------- device profiles


@pytest.mark.parametrize("name", ["a100-sxm-80gb", "h100-sxm", "h200"])
def test_shipped_device_profiles_state_their_sources(name):
    assert name in available_devices()
    device = load_device(name)
    assert device.sources and len(device.method) > 200 and device.sms > 100 and device.memory_bytes >= 80e9
    # a GEMV is bandwidth-bound, a large GEMM compute-bound; CUDA graphs cost less per kernel than eager launches
    gemv, gemm = (
        device.kernel_seconds("gemm", 2 * 8192**2, 2 * 8192**2),
        device.kernel_seconds("gemm", 2 * 4096 * 8192**2, 2 * (2 * 4096 * 8192 + 8192**2), rows=4096),
    )
    assert gemv == pytest.approx(device.floor_s["gemm"] + 2 * 8192**2 / device.bandwidth)
    assert gemm > 10 * gemv
    assert device.launch_s["graph_node"] < device.launch_s["eager"]


def test_device_profile_errors_are_one_line():
    with pytest.raises(DeviceProfileError, match="h100-sxm"):
        load_device("no-such-gpu")
    with pytest.raises(DeviceProfileError, match="missing sources, method"):
        DeviceProfile.from_dict({k: v for k, v in TOY_DEVICE.items() if k not in ("sources", "method")})
    with pytest.raises(DeviceProfileError, match="floor_us must give"):
        toy_device(floor_us={"gemm": 1})
    with pytest.raises(DeviceProfileError, match="sizes must increase"):
        toy_device(gemm_tflops=[[512, 600], [256, 500]])


def test_gemm_table_interpolates_in_log_rows_and_holds_beyond_the_ends():
    device = toy_device(gemm_tflops=[[100, 100], [10000, 300]])
    assert device.flops_per_s("gemm", rows=1000) == pytest.approx(200e12)  # halfway in log(M)
    assert device.flops_per_s("gemm", rows=10) == pytest.approx(100e12)
    assert device.flops_per_s("gemm", rows=10**6) == pytest.approx(300e12)
    assert device.flops_per_s("gemm", rows=1000, float32=True) == pytest.approx(100e12)


# ---------------------------------------------------------------- the cost of ops, by hand


def run_ops(fn, device=None, kernels="eager", graph=False, link=None):
    """``fn(cost)`` under a cost mode on a fresh clock; returns (clock, result)."""
    device = device or toy_device()
    clock = Timeline(device, link.sms if link else 0)
    cost = CostMode(clock, kernels)
    with torch.no_grad(), cost.active():
        if graph:
            with clock.graph_replay():
                out = fn(cost)
        else:
            out = fn(cost)
        clock.end()
    return clock, out


def test_gemm_only_toy_by_hand():
    # x [1024, 2048] @ w [2048, 4096] (fp16): 2 * 1024 * 2048 * 4096 FLOPs at 100 TFLOP/s = 171.80 us,
    # bytes (1024*2048 + 2048*4096 + 1024*4096) * 2 = 29.36 MB at 1000 GB/s = 29.36 us: compute-bound.
    # Then y [1024, 4096] @ v [4096, 16] : 2*1024*4096*16 = 134.2 MFLOP -> 1.34 us; bytes (1024*4096 + 4096*16
    # + 1024*16) * 2 = 8.55 MB -> 8.55 us: bandwidth-bound. Each GEMM adds its 2 us floor.
    first = 2 * 1024 * 2048 * 4096 / 100e12 + 2 * US
    second = (1024 * 4096 + 4096 * 16 + 1024 * 16) * 2 / 1000e9 + 2 * US
    clock, out = run_ops(lambda c: (meta(1024, 2048) @ meta(2048, 4096)) @ meta(4096, 16))
    assert out.shape == (1024, 16) and out.device.type == "meta"
    assert clock.kernels == 2 and clock.end() == pytest.approx(first + second)
    # eager launches: the host spends 4 us per kernel; the second is issued while the first runs
    clock, _ = run_ops(
        lambda c: (meta(1024, 2048) @ meta(2048, 4096)) @ meta(4096, 16),
        device=toy_device(launch_us={"eager": 4.0, "graph_node": 0.5, "graph_replay": 10.0}),
    )
    assert clock.end() == pytest.approx(4 * US + first + second)
    # one CUDA-graph replay: 10 us on the host, then 0.5 us per node on the device
    clock, _ = run_ops(
        lambda c: (meta(1024, 2048) @ meta(2048, 4096)) @ meta(4096, 16),
        graph=True,
        device=toy_device(launch_us={"eager": 4.0, "graph_node": 0.5, "graph_replay": 10.0}),
    )
    assert clock.end() == pytest.approx(10 * US + first + second + 2 * 0.5 * US)


def test_views_cost_nothing_and_elementwise_ops_cost_their_bytes():
    def ops(cost):
        x = meta(512, 1024)
        y = x.view(1024, 512).t().reshape(512, 1024)  # views only
        return (y + 1).float()  # read 1 MiB, write 1 MiB; read 1 MiB, write 2 MiB

    clock, out = run_ops(ops)
    assert out.dtype == torch.float32 and clock.kernels == 2
    assert clock.end() == pytest.approx(2 * 0.5 * US + (2 + 3) * 2**20 / 1000e9)
    # torch.compile: one kernel reads x once and writes only what outlives the run
    clock, _ = run_ops(ops, kernels="compiled")
    assert clock.kernels == 1 and clock.end() == pytest.approx(0.5 * US + (1 + 2) * 2**20 / 1000e9)


def test_gather_and_scatter_move_only_what_they_index():
    table, cache, source = meta(50000, 1024), meta(8, 4096, 128), meta(8, 2, 128)
    rows, slots = torch.zeros(4, dtype=torch.long, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")

    def ops(cost):
        cache.index_copy_(1, slots, source)  # writes 8 x 2 x 128 values (4 KiB) and reads them and the index
        return table[rows]  # gathers 4 rows of 2 KiB

    clock, _ = run_ops(ops)
    assert clock.kernels == 2
    assert clock.end() == pytest.approx(2 * 0.5 * US + (2 * (4096 + 2 * 8) + 2 * 4 * 2048) / 1000e9)


@pytest.mark.parametrize(
    "q_len, k_len, share",
    [
        (4, 4, 10 / 16),  # 1 + 2 + 3 + 4 of 16 pairs
        (2, 4, (3 + 4) / 8),  # the last query sees every key
        (1, 4, 1.0),  # decode
    ],
)
def test_lower_right_causal_share_by_hand(q_len, k_len, share):
    assert lower_right_share(q_len, k_len) == pytest.approx(share)


def test_attention_is_one_fused_kernel_with_causal_flops():
    # 2 rows x 8 heads x 1024 tokens x 128: 4 * 2 * 8 * 1024^2 * 128 FLOPs, of which (1024 + 1) / 2048 are kept,
    # at 50 TFLOP/s; bytes: q, k, v and the output, 2 * 8 * 1024 * 128 * 2 bytes each, at 1000 GB/s
    flops = 4 * 2 * 8 * 1024**2 * 128 * 1025 / 2048
    nbytes = 4 * 2 * 8 * 1024 * 128 * 2
    q = meta(2, 8, 1024, 128)
    clock, out = run_ops(lambda c: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert out.shape == q.shape and clock.kernels == 1
    assert clock.end() == pytest.approx(2 * US + max(flops / 50e12, nbytes / 1000e9))


def test_merged_gemms_keep_the_activation_run_open():
    # SwiGLU as the model issues it: gate GEMM, SiLU, up GEMM, product (x [64, 1024], W [1024, 4096], fp16)
    def ops(cost):
        x = meta(64, 1024)
        return F.silu(x @ meta(1024, 4096)) * (x @ meta(1024, 4096))

    gemm = (64 * 1024 + 1024 * 4096 + 64 * 4096) * 2 / 1000e9 + 2 * US  # bandwidth-bound, each
    clock, _ = run_ops(ops)  # eager: two GEMMs, SiLU and the product apart (reads 1 and 2, writes 1 each)
    assert clock.kernels == 4
    assert clock.end() == pytest.approx(2 * gemm + 2 * 0.5 * US + (2 + 3) * 64 * 4096 * 2 / 1000e9)
    # compiled: one GEMM over both weights (x read once), one kernel reads both halves and writes one
    clock, _ = run_ops(ops, kernels="compiled")
    merged = (64 * 1024 + 2 * 1024 * 4096 + 2 * 64 * 4096) * 2 / 1000e9 + 2 * US
    assert clock.kernels == 2
    assert clock.end() == pytest.approx(merged + 0.5 * US + 3 * 64 * 4096 * 2 / 1000e9)


@pytest.mark.parametrize(
    "kernels, kernels_issued, keys, kv_copy, mask",
    [
        ("eager", 1, 1000, False, True),  # the whole static cache, a mask, GQA in the kernel
        ("compiled", 1, 600, False, False),  # the filled part, no mask
        ("vllm", 1, 600, False, False),
        ("gpt-fast", 2, 1000, True, True),  # 1000 rounded up to 8 is 1000; K/V copied to the query heads first
    ],
)
def test_decode_attention_as_each_regime_runs_it(kernels, kernels_issued, keys, kv_copy, mask):
    # one decode token, 2 rows x 8 query heads, 2 KV heads, head dim 128; the model passes the whole cache of
    # 1000 slots; 600 are filled
    q, k, allowed = meta(2, 8, 1, 128), meta(2, 2, 1000, 128), meta(1, 1000, dtype=torch.bool)

    def ops(cost):
        cost.start_step("decode", filled=600, cache_len=1000)
        return F.scaled_dot_product_attention(q, k, k, attn_mask=allowed, enable_gqa=True)

    clock, out = run_ops(ops, kernels=kernels)
    assert out.shape == q.shape and clock.kernels == kernels_issued
    shared_kv = 2 * 2 * 2 * keys * 128 * 2  # K and V of 2 rows x 2 heads
    copy = (shared_kv + 4 * shared_kv) / 1000e9 + 0.5 * US if kv_copy else 0.0
    nbytes = 2 * 2 * 8 * 128 * 2 + (4 * shared_kv if kv_copy else shared_kv) + (keys if mask else 0)
    flops = 4 * 2 * 8 * keys * 128
    assert clock.end() == pytest.approx(copy + 2 * US + max(flops / 50e12, nbytes / 1000e9))


def test_static_cache_rounds_up_and_regimes_are_data():
    from suite.latency.kernel_regime import KernelRegimeError, available_regimes, load_regime

    assert {"eager", "compiled", "gpt-fast", "vllm"} <= set(available_regimes())
    for name in available_regimes():
        regime = load_regime(name)
        assert regime.sources and regime.method
    assert load_regime("gpt-fast").static_cache_len(1029) == 1032
    assert load_regime("gpt-fast").launches == ("cuda_graph",)
    with pytest.raises(KernelRegimeError, match="kernels 'fast'"):
        load_regime("fast")


def test_a_simulated_cell_runs_under_each_regime_its_launches_allow():
    from suite.latency.simulation.cells import simulate_cell

    cell = dict(
        model="random:tiny",
        strategy="tokenweave",
        tp=2,
        batch=2,
        prompt_len=16,
        new_tokens=4,
        dtype="bfloat16",
        device="cuda",
        mode="simulated",
        device_profile="h100-sxm",
        interconnect="h100-nvswitch-multimem",
    )
    eager, error = simulate_cell(LatencyScenario(**cell, kernels="eager"))
    compiled, _ = simulate_cell(LatencyScenario(**cell, kernels="compiled"))
    assert error is None and compiled["prefill_ms_median"] < eager["prefill_ms_median"]  # fewer, fused kernels
    values, error = simulate_cell(LatencyScenario(**cell, kernels="gpt-fast"))
    assert (
        values is None and error == "kernels=gpt-fast runs its decode with cuda_graph launches, not decode_mode=eager"
    )
    values, error = simulate_cell(LatencyScenario(**cell, kernels="gpt-fast", decode_mode="cuda_graph"))
    assert error is None and values["decode_ms_per_token_median"] > 0


def test_reading_a_value_back_waits_for_the_device():
    def ops(cost):
        x = meta(1024, 1024)
        x @ x  # 2 * 1024^3 FLOPs -> 21.47 us + 2 us
        host_before = cost.clock.host
        bool(torch.zeros(1).any())  # a host tensor's value: the host waits for everything issued
        return host_before, cost.clock.host

    clock, (before, after) = run_ops(ops)
    # the GEMM, then the host tensor's two tiny kernels (zeros, any) of 0.5 us each
    assert before == 0 and after == pytest.approx(2 * 1024**3 / 100e12 + 2 * US + 2 * 0.5 * US)


# ---------------------------------------------------------------- the clock: streams, the link, SMs


def test_compute_during_a_collective_runs_at_the_remaining_share_of_sms():
    clock = Timeline(toy_device(), collective_sms=50)  # half of the 100 SMs
    end = clock.collective(20 * US)  # the link is busy 0 .. 20 us
    assert end == pytest.approx(20 * US)
    # 30 us of work from 0: 20 us at half speed does 10 us of it, the remaining 20 us run at full speed
    assert clock.kernel(30 * US) == pytest.approx(40 * US)
    clock.reset()
    assert clock.kernel(30 * US) == pytest.approx(30 * US)  # nothing in flight


def test_collectives_queue_on_one_link_and_wait_for_their_stream():
    clock = Timeline(toy_device(), 0)
    clock.kernel(10 * US)
    first = clock.collective(5 * US)  # waits for the kernel before it: 10 .. 15
    with clock.side_stream():  # the side stream first waits for compute (10 us)
        second = clock.collective(5 * US)  # queues behind the first on the link: 15 .. 20
    assert (first, second) == (pytest.approx(15 * US), pytest.approx(20 * US))
    assert clock.kernel(1 * US) == pytest.approx(11 * US)  # compute did not wait for either
    clock.wait(second)
    assert clock.kernel(1 * US) == pytest.approx(21 * US)
    assert clock.communication() == pytest.approx(10 * US)


def test_kernels_of_two_streams_share_the_device():
    clock = Timeline(toy_device(), 0)
    with clock.side_stream():
        assert clock.kernel(10 * US) == pytest.approx(10 * US)  # 0 .. 10 on the side stream
    # compute is free at 0, but the device is busy with the side stream's kernel until 10
    assert clock.kernel(5 * US) == pytest.approx(15 * US)
    clock.collective(10 * US)  # 15 .. 25, issued after compute's kernel
    with clock.side_stream():  # waits for compute (15): runs during the collective at full share (sms = 0)
        assert clock.kernel(4 * US) == pytest.approx(19 * US)
    assert clock.kernel(2 * US) == pytest.approx(21 * US)


def test_a_tensor_made_on_the_side_stream_is_ready_when_its_collective_ends():
    link = flat_link(50)
    clock, (start, end) = run_ops(lambda cost: _side_sync(cost, link), link=link)
    assert start == pytest.approx(0.5 * US + 2 * 2**20 / 1000e9)  # the partial's kernel
    assert end == pytest.approx(start + 50 * US + 0.5 * US + 3 * 2**20 / 1000e9)  # then the sum reads both


def _side_sync(cost, link):
    comm = SimulatedCommunicator(rank=0, world=2, profile=link, cost=cost)
    partial = meta(512, 1024) * 2  # 1 MiB read, 1 MiB written
    ready = cost.clock.free["compute"]
    with comm.side_stream(partial.device):
        synced = comm.all_reduce(partial)
    synced + meta(512, 1024)  # on the compute stream: waits for the all-reduce's result
    return ready, cost.clock.free["compute"]


@pytest.mark.parametrize(
    "fused_table, kernels, links, link_us",
    [
        ({"fused_sync": {"eager": {2: [[1, 25, math.inf]]}}}, 0, 1, 25),  # one op: TokenWeave's multimem kernel
        ({}, 1, 2, 2 * 40),  # no fused kernel: the reduce-scatter, the residual add (no norm asked) and the all-gather
    ],
)
def test_fused_sync_is_one_communication_op_where_the_interconnect_has_it(fused_table, kernels, links, link_us):
    link = Profile.from_dict(
        {
            "name": "link",
            "sources": ["test"],
            "method": "constant",
            "sms": 0,
            "sms_source": "test",
            "tables": {"all_reduce": {"eager": {2: [[1, 40, math.inf]]}}} | fused_table,
        }
    )

    def ops(cost):
        comm = SimulatedCommunicator(rank=1, world=2, profile=link, cost=cost)
        residual, gathered = comm.fused_sync(meta(8, 64), meta(4, 64), norm=None)
        return residual.shape, gathered.shape

    clock, shapes = run_ops(ops, link=link)
    assert shapes == ((4, 64), (8, 64)) and clock.kernels == kernels and len(clock.links) == links
    assert clock.communication() == pytest.approx(link_us * US)


# ---------------------------------------------------------------- strategies on toys


def toy_layers(n: int):
    """Layers whose attention and MLP are one GEMM each: [2048, 1024] @ [1024, 1024] (fp16), no norms."""

    class NoNorm:
        def __call__(self, h):
            return h

        def add_forward(self, x, delta):  # the residual add, then the identity
            h = x + delta
            return h, h

    class Layer:
        def __init__(self):
            self.w = meta(1024, 1024)
            self.input_layernorm = self.post_attention_layernorm = NoNorm()

        def self_attn(self, u, ctx):
            return u @ self.w

        def mlp(self, u):
            return u @ self.w

        def attn(self, h, ctx):
            return self.self_attn(h, ctx)

        def ffn(self, h):
            return self.mlp(h)

    return [Layer() for _ in range(n)]


# A module: 2 * 2048 * 1024^2 FLOPs at 100 TFLOP/s + 2 us floor (compute-bound: 10 MiB move in 10.5 us);
# a residual add reads 8 MiB and writes 4 MiB: 0.5 us + 12 MiB / 1000 GB/s.
MODULE = 2 * 2048 * 1024**2 / 100e12 + 2 * US
ADD = 0.5 * US + 12 * 2**20 / 1e12


def run_schedule(run_layers, layers: int, link: Profile):
    clock = Timeline(toy_device(), link.sms)
    cost = CostMode(clock)
    comm = SimulatedCommunicator(rank=0, world=2, profile=link, cost=cost)
    with torch.no_grad(), cost.active():
        run_layers(toy_layers(layers), meta(2048, 1024), comm, None)
        return clock.end(), clock


def test_ladder_saves_exactly_the_communication_it_hides():
    m, a, c = MODULE, ADD, 20 * US
    assert a < c < m
    link = flat_link(20)
    baseline, _ = run_schedule(bound("baseline").run_layers, 2, link)
    assert baseline == pytest.approx(4 * (m + c + a))  # 4 modules, each synced before the next
    ladder, clock = run_schedule(bound("ladder", {"layers": "all"}).run_layers, 2, link)
    # Worked out by hand: every all-reduce but the last is waited for after the next module (m > c): hidden;
    # the last one overlaps only the add of the one before it (a < c), so hidden = 3c + a.
    hidden = 3 * c + a
    assert ladder == pytest.approx(4 * m + 3 * a + c)
    assert baseline - ladder == pytest.approx(hidden)
    assert clock.communication() - clock.exposed_communication() == pytest.approx(hidden)


def test_overlap_costs_the_sms_a_collective_takes():
    # the same ladder with collectives holding 25 of the 100 SMs: while one is in flight compute runs at 3/4
    # speed; every collective here overlaps compute for its whole 20 us, which then does 15 us of work
    link = flat_link(20, sms=25)
    free, _ = run_schedule(bound("ladder", {"layers": "all"}).run_layers, 2, flat_link(20))
    slowed, _ = run_schedule(bound("ladder", {"layers": "all"}).run_layers, 2, link)
    assert slowed - free == pytest.approx(3 * 5 * US)  # three fully overlapped collectives, 5 us lost each


def test_spd_on_k_blocks_saves_exactly_k_all_reduces():
    # SPD block: h + AR(y + ffn(h + y)): one all-reduce fewer than baseline and one residual add more.
    # Every collective is synchronous here: no overlap.
    from spd.strategy import run_blocks

    c = 7 * US
    link = flat_link(7)
    baseline, base_clock = run_schedule(lambda *a: run_blocks(*a, drop=set()), 4, link)
    for drop in ({3}, {1, 2, 3}, {0, 1, 2, 3}):
        spd, clock = run_schedule(lambda *a: run_blocks(*a, drop=drop), 4, link)
        k = len(drop)
        assert base_clock.communication() - clock.communication() == pytest.approx(k * c)
        assert baseline - spd == pytest.approx(k * (c - ADD))


def bound(name: str, options: dict | None = None):
    from suite.parallel.strategy import make_strategy

    return make_strategy(name, options)


# ---------------------------------------------------------------- cells


def cell(strategy="baseline", options=None, tp=2, **kw) -> LatencyScenario:
    settings = dict(
        model="random:tiny",
        strategy=strategy,
        strategy_options=options or {},
        tp=tp,
        batch=2,
        prompt_len=16,
        new_tokens=4,
        mode="simulated",
        interconnect="h100-nvswitch",
        device_profile="h100-sxm",
        decode_mode="cuda_graph",
        repetitions=1,
        warmup=0,
    )
    return LatencyScenario(**settings | kw)


def test_one_rank_has_no_communication_and_equals_nocomm():
    (_, base, err1), (_, bound, err2), (_, weave, err3) = simulate_cells(
        [cell(tp=1), cell("nocomm", tp=1), cell("tokenweave", {"split_min_tokens": 0}, tp=1)]
    )
    assert err1 is None and err2 is None and err3 is None
    assert base["comm_fraction"] == 0.0
    for key in ("prefill_ms_median", "decode_ms_per_token_median", "tokens_per_s"):
        assert base[key] == bound[key]
        assert base[key] == weave[key]  # no sync to overlap: tokenweave does not split, it runs baseline's schedule


def test_cells_of_every_strategy_give_complete_rows(tmp_path):
    strategies = [
        "baseline",
        {"name": "spd", "options": {"blocks": "all"}},
        "ladder",
        "seqpar",
        "nocomm",
        {"name": "tokenweave", "options": {"split_min_tokens": 0}},
    ]  # split the prefill
    cells = expand(
        {
            "model": "random:tiny-uneven",
            "strategies": strategies,
            "tp": [2, 4],
            "batch": 3,
            "prompt_len": 16,
            "new_tokens": 4,
            "mode": "simulated",
            "device_profile": "h100-sxm",
            "interconnect": "h100-nvswitch",
            "decode_mode": "cuda_graph",
            "repetitions": 1,
            "warmup": 0,
        }
    )
    rows = run(cells, tmp_path).rows()
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for r in rows:
        assert r["provenance"] == "simulated" and r["device_profile"] == "h100-sxm"
        assert r["interconnect"] == "h100-nvswitch"
        assert r["prefill_ms_median"] > 0 and r["decode_ms_per_token_median"] > 0
        assert r["tokens_per_s"] == pytest.approx(3 * 4 / (r["e2e_ms_median"] / 1e3))
        assert r["e2e_ms_median"] == pytest.approx(r["prefill_ms_median"] + 3 * r["decode_ms_per_token_median"])
        assert 0 <= r["comm_fraction"] < 1 and r["comm_fraction_status"].startswith("simulated")
        assert r["telemetry_status"].startswith("n/a") and r["energy_j"] is None
    by = {(r["strategy"], r["tp"]): r for r in rows}
    assert by[("nocomm", 4)]["comm_fraction"] == 0 < by[("baseline", 4)]["comm_fraction"]
    assert run(cells, tmp_path).rows() == rows  # resumed: nothing runs again


def test_every_strategy_simulates_compiled_on_every_device_profile():
    """Compiled kernels (fused runs, merged GEMMs) cost less than eager's for every strategy on every GPU profile."""
    strategies = {name: {} for name in available()} | {
        name: {"blocks": "all"} for name in ("spd", "spd+ladder", "spd+tokenweave")
    }
    cells = [
        cell(name, options, tp=2, device_profile=device, kernels=kernels)
        for device in available_devices()
        for name, options in strategies.items()
        for kernels in ("eager", "compiled")
    ]
    results = list(simulate_cells(cells))
    assert all(error is None for _, _, error in results), [error for _, _, error in results if error]
    for (eager, eager_values, _), (compiled, compiled_values, _) in zip(results[::2], results[1::2]):
        assert (eager.kernels, compiled.kernels) == ("eager", "compiled") and eager.strategy == compiled.strategy
        assert compiled_values["e2e_ms_median"] < eager_values["e2e_ms_median"], (eager.strategy, eager.device_profile)


def test_a_cell_that_does_not_fit_is_a_failed_row_saying_what_it_needs(tmp_path):
    profile = tmp_path / "small.yaml"
    profile.write_text(yaml.safe_dump(TOY_DEVICE | {"name": "small", "memory_gb": 1e-5}))
    ((_, values, error),) = simulate_cells([cell(device_profile=str(profile), interconnect="h100-nvswitch")])
    assert values is None and "does not fit" in error and "needs" in error and "small has 0 GB" in error


def test_unknown_profiles_are_usage_errors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": "random:tiny", "mode": "simulated", "device_profile": "tpu-v9", "interconnect": "h100-nvswitch"}
        )
    )
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--config", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "tpu-v9" in err
    assert not (tmp_path / "out" / "bench.jsonl").exists()


def test_a_strategy_that_builds_its_own_model_cannot_be_simulated():
    from suite.errors import SpdbenchError
    from suite.latency.simulation.cells import check_expressible
    from suite.parallel.strategy import Strategy

    class Custom(Strategy):
        name = "custom"

        def load_model(self, *args):
            raise NotImplementedError

    with pytest.raises(SpdbenchError, match="builds its own rank model"):
        check_expressible(Custom())


def test_token_splitting_prefill_simulates_with_both_halves_causal(monkeypatch):
    """1024 tokens split in two: the first half attends causally to itself, the second lower-right
    causally to all 1024 keys (SDPA's causal bias): each is costed with the share of query/key pairs its
    mask keeps, counted here on the masks themselves."""
    from suite.latency.simulation import attention

    costed, share = [], attention.lower_right_share

    def recorded(q_len, k_len):
        costed.append((q_len, k_len, share(q_len, k_len)))
        return costed[-1][2]

    monkeypatch.setattr(attention, "lower_right_share", recorded)
    cell = LatencyScenario(
        model="random:llama3-70b",
        strategy="tokenweave",
        tp=8,
        batch=1,
        prompt_len=1024,
        new_tokens=4,
        dtype="float16",
        decode_mode="cuda_graph",
        mode="simulated",
        device_profile="h100-sxm",
        interconnect="h100-nvswitch",
    )
    assert bound_strategy("tokenweave", {}, resolve(cell.model), 8).split_point(1024, 8) == 512
    ((_, values, error),) = simulate_cells([cell])
    assert error is None and values["prefill_ms_median"] > 0
    first_half = torch.ones(512, 512).tril().mean().item()
    second_half = torch.ones(512, 1024).tril(diagonal=512).mean().item()  # query i sees keys 0 .. 512 + i
    halves = {(q, k): s for q, k, s in costed if q == 512}
    assert halves.keys() == {(512, 512), (512, 1024)}
    assert halves[512, 512] == pytest.approx(first_half) and halves[512, 1024] == pytest.approx(second_half)


def test_tokenweave_prefill_stays_near_the_no_communication_model_on_multimem():
    """TokenWeave reports prefills close to, sometimes just below, the model without communication
    (Llama-3.3-70B, 8x H100, multimem); its smallest split (1K tokens) is where the simulation is furthest."""
    scenario = dict(model="random:llama3.3-70b", batch=1, prompt_len=1024, new_tokens=1, dtype="bfloat16")
    system = dict(device_profile="h100-sxm", interconnect="h100-nvswitch-multimem")
    cells = [
        cell(name, tp=tp, decode_mode="eager", kernels="compiled", **scenario, **system)
        for tp in (4, 8)
        for name in ("tokenweave", "nocomm")
    ]
    prefill = [values["prefill_ms_median"] for _, values, _ in simulate_cells(cells)]
    for weave, bound in zip(prefill[::2], prefill[1::2]):
        assert 0.9 <= weave / bound <= 1.2, (weave, bound)


def test_worker_processes_run_after_this_process_used_its_openmp_pool():
    """A worker forked from a process whose OpenMP pool has run would hang in its first parallel op."""
    script = (
        "import torch\n"
        "from suite.latency.simulation import simulate_cells\n"
        "from suite.results import LatencyScenario\n"
        "if __name__ == '__main__':\n"
        "    torch.ones(1 << 22).mul_(2)\n"
        "    cells = [LatencyScenario(model='random:llama3-70b', strategy='baseline', tp=8, batch=b, prompt_len=128,\n"
        "             new_tokens=4, dtype='float16', mode='simulated', device_profile='h100-sxm',\n"
        "             interconnect='h100-nvswitch') for b in (1, 4)]\n"
        "    print([error for _, _, error in simulate_cells(cells, workers=2)])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[None, None]"


def test_the_grid_orders_nocomm_ladder_baseline_on_every_cell():
    cells = [
        c
        for c in expand(yaml.safe_load((REPO / "configs" / "simulated-llama3-70b.yaml").read_text()))
        if c.strategy in ("baseline", "ladder", "nocomm")
    ]
    assert {(c.tp, c.batch) for c in cells} == {(t, b) for t in (2, 4, 8) for b in (1, 4, 16, 64)}
    results = {}
    for unit in ([c for c in cells if c.tp == tp] for tp in (2, 4, 8)):
        for c, values, error in simulate_cells(unit):
            results[(c.strategy, c.tp, c.batch)] = values or error
    compared = 0
    for tp in (2, 4, 8):
        for batch in (1, 4, 16, 64):
            got = [results[(s, tp, batch)] for s in ("nocomm", "ladder", "baseline")]
            if not all(isinstance(v, dict) for v in got):
                assert all(isinstance(v, str) and "does not fit" in v for v in got), got
                continue
            bound, ladder, baseline = got
            for key in ("prefill_ms_median", "decode_ms_per_token_median", "e2e_ms_median"):
                assert bound[key] <= ladder[key] <= baseline[key], (tp, batch, key)
            compared += 1
    assert compared >= 9


def test_weightless_shard_has_the_real_shapes_and_no_data():
    source = resolve("random:tiny-uneven")
    model = build_weightless_rank_model(source.config, 4, 0, torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.layers[0].self_attn.q_proj.weight.shape == (3 * 16, 144)  # rank 0 of 4 holds 3 of 9 heads
    strategy = bound_strategy("spd", {"blocks": "all"}, source, 4)
    assert strategy.layout(source.config, 4)[0][0].q_heads == (0, 1, 2)


# ---------------------------------------------------------------- devbench


def test_devbench_profile_recovers_a_straight_line_and_loads():
    # GEMV times on an exact line: 4 us + bytes / 2000 GB/s
    points = [[b, 4e-6 + b / 2000e9] for b in (32e6, 96e6, 176e6)]
    measured = {
        "gpu": "NVIDIA Test GPU",
        "sms": 120,
        "memory_bytes": 96e9,
        "gemm_tflops": [[512, 600], [4096, 700]],
        "gemv_points": points,
        "attention_tflops": {"causal": [[512, 200]], "full": [[512, 300]]},
        "elementwise_floor_s": 1.5e-6,
        "eager_launch_s": 5e-6,
        "graph_node_s": 0.4e-6,
        "graph_replay_s": 12e-6,
    }
    data = devbench.profile(measured, when="2026-01-01")
    assert data["name"] == "measured-nvidia-test-gpu" and data["bandwidth_gbps"] == pytest.approx(2000)
    assert data["floor_us"] == {"gemm": pytest.approx(4.0), "attention": pytest.approx(4.0), "elementwise": 1.5}
    assert data["launch_us"] == {"eager": 5.0, "graph_node": 0.4, "graph_replay": 12.0}
    loaded = DeviceProfile.from_dict(data)
    assert loaded.sms == 120 and loaded.flops_per_s("gemm", rows=4096) == pytest.approx(700e12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_devbench_refuses_without_a_gpu_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "suite.cli", "devbench", "--out", str(tmp_path / "p.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no CUDA GPU" in result.stderr
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "profile.txt"], "give a .yaml file name"),
        (["--device-index", "-1"], "device_index -1 is invalid"),
    ],
)
def test_devbench_bad_arguments_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["devbench", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err


# ---------------------------------------------------------------- validation


def test_published_tables_carry_their_sources():
    from suite.latency.simulation.validation import DATASETS

    for name in DATASETS:
        table = load_published(name)
        assert table["sources"] and table["left_out"] and table["measure"] and len(table["cells"]) >= 10
        assert {"preset", "tp", "prompt_len", "measured", "required"} <= set(table["cells"][0])
    table = load_published("gpt-fast-tp")
    assert "gpt-fast" in table["sources"][0] and len(table["cells"]) == 16
    required = [(c["preset"], c["tp"]) for c in table["cells"] if c["required"]]
    assert required == [("llama2-7b", n) for n in (1, 2, 4, 8)] + [("llama2-70b", n) for n in (1, 2, 4, 8)]
    with pytest.raises(Exception, match="gpt-fast-tp"):
        load_published("no-such-table")


def test_gemm_model_against_vidur_times():
    rows = kernel_checks.gemms(load_published("vidur-gemm"))
    assert {r["device_profile"] for r in rows} == {"h100-sxm", "a100-sxm-80gb"}
    for r in rows:
        assert abs(r["error_pct"]) < (30 if r["m"] == 128 else 12), r  # the ridge (M = 128) is the roofline's worst


def test_gemm_model_holds_on_every_profiled_layer_gemm():
    """Vidur's GEMMs of five models at TP 1-8 (none of them the points the profiles came from)."""
    rows = kernel_checks.gemms(load_published("vidur-gemm-checks"))
    assert len(rows) > 700
    for group in kernel_checks.summary(rows, ("device_profile", "model")):
        assert group["median_abs_error_pct"] < 10, group


def test_kernel_checks_price_decode_attention_and_all_reduce_by_hand():
    decode = next(r for r in kernel_checks.attention(load_published("vidur-attention")) if r["batch"] == 64)
    # 32 query / 4 KV heads of 128 over 1473 keys, fp16: bandwidth-bound (8 FLOPs per byte)
    nbytes = 2 * 64 * 128 * (2 * 32 + 2 * 4 * 1473)
    assert decode["modelled_ms"] == pytest.approx(1e3 * (5.2e-6 + nbytes / 1700e9))
    assert decode["error_pct"] == pytest.approx(100 * (decode["modelled_ms"] / 0.16 - 1))
    row = next(r for r in kernel_checks.all_reduces(load_published("vidur-all-reduce")) if r["n"] == 8)
    assert row["interconnect"] == "a100-nvlink" and row["median_bytes"] == 34816  # of 2 KiB + 8 KiB x (1 .. 7)
    assert row["modelled_ms"] == pytest.approx(33.7e-3, rel=0.05)  # the profile's 8-GPU floor, 1 us of bandwidth


def test_vidur_cells_are_the_data_folders_medians():
    data = os.environ.get("SPDBENCH_DATA")
    if not data:
        pytest.skip("SPDBENCH_DATA is not set")
    import pandas as pd

    raw = pd.read_csv(Path(data) / "published" / "vidur-network-h100_dgx_all_reduce.csv")
    raw = raw[(raw.num_workers == 4) & (raw.devices_per_node == 4) & raw["size"].between(1 << 20, (4 << 20) - 1)]
    cell = next(
        c
        for c in load_published("vidur-all-reduce")["cells"]
        if c["interconnect"] == "h100-nvswitch" and c["n"] == 4 and c["bytes_from"] == 1 << 20
    )
    assert cell["median_us"] == pytest.approx(1e3 * raw["time_stats.all_reduce.median"].median(), abs=0.05)
    raw = pd.read_csv(Path(data) / "published" / "vidur-compute-a100-Meta-Llama-3-8B_mlp.csv")
    raw = raw[(raw.num_tensor_parallel_workers == 4) & (raw.num_tokens == 1024)]
    cell = next(
        c
        for c in load_published("vidur-gemm-checks")["cells"]
        if c["model"] == "Meta-Llama-3-8B" and c["tp"] == 4 and c["op"] == "mlp_up_proj"
    )
    assert (cell["k"], cell["n"]) == (4096, 2 * 14336 // 4)
    assert dict(cell["times_ms"])[1024] == pytest.approx(raw["time_stats.mlp_up_proj.median"].median(), abs=1e-4)


def test_validation_page_is_what_the_command_writes():
    """docs/validation.md is what the command it names writes: after a profile change, rerun it."""
    from suite.latency import studies
    from suite.latency.simulation import validation

    doc = (REPO / "docs" / "validation.md").read_text()
    command = doc.splitlines()[0].split("`")[1]
    assert command == "spdbench validate-simulation --write docs/validation.md"
    decode = validation.validate_decode(load_published("gpt-fast-tp"))
    datasets = [validation.validate_dataset(load_published(name)) for name in validation.DATASETS]
    # the studies: TokenWeave's prefill at 1K tokens only (the others in full)
    cells = {name: studies.study_cells(name) for name in studies.SUMMARIES}
    cells["tokenweave-prefill"] = [c for c in cells["tokenweave-prefill"] if c.prompt_len == 1024]
    page = validation.markdown(decode, kernel_checks.checks(), datasets, studies.studies(cells), command)
    studies_head = "## PCIe without peer-to-peer"
    assert page.split(studies_head)[0] == doc.split(studies_head)[0]  # everything up to the studies
    study_rows = [line for line in page.split(studies_head)[1].splitlines() if line.startswith("| ")]
    # a header and a row per cell: 2 decode modes; 2 regimes x N = 4, 8; 2 regimes x 4 strategies
    assert len(study_rows) == (1 + 2) + (1 + 4) + (1 + 8) and all(row in doc.splitlines() for row in study_rows)
    assert decode["meets_bar"] == (
        decode["required"]["median_abs_error_pct"] <= 15 and decode["required"]["worst_abs_error_pct"] <= 35
    )


def test_a_cell_simulates_the_same_after_other_cells():
    """A simulator keeps what it learns across cells (op shapes, the context kernels it recorded): a cell
    after another of the same shape replays them and must take the same time as on its own."""
    import suite.latency.simulation.cells as cells_module

    cell = LatencyScenario(
        model="random:llama3-70b", strategy="spd", strategy_options={"blocks": "last:40"}, tp=8, batch=1,
        prompt_len=1024, new_tokens=2, dtype="float16", device="cuda", decode_mode="cuda_graph",
        kernels="compiled", mode="simulated", device_profile="h100-sxm", interconnect="h100-nvswitch",
    )  # fmt: skip
    cells_module._simulator.cache_clear()
    alone = list(simulate_cells([cell], workers=1))[0][1]
    cells_module._simulator.cache_clear()
    before = dataclasses.replace(cell, strategy="baseline", strategy_options={})
    after = list(simulate_cells([before, cell], workers=1))[1][1]
    assert after["prefill_ms_median"] == alone["prefill_ms_median"]
    assert after["decode_ms_per_token_median"] == alone["decode_ms_per_token_median"]
