"""Projection: the cost model, the projecting communicator's waits, projected cells of every strategy,
commbench (gloo) and validate-projection (N gloo ranks vs their projection)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import yaml

from suite.latency.bench import expand, run
from suite.latency.interconnect import RING_FACTOR, Profile, ProfileError, available_profiles, load_profile
from suite.latency.projection import ProjectingCommunicator, heaviest_rank, projected_runner
from suite.model.sharding import BlockShard, default_layout
from suite.parallel.strategy import available
from tests.helpers import source

MS = 1e-3
TOLERANCE_S = 5 * MS  # a sleep on a busy 2-core machine overshoots by less than this


def flat_profile(latency_us: float, busbw_gbps: float = math.inf, ns=(2, 4)) -> Profile:
    """Every collective costs ``latency_us`` (plus the bandwidth term when busbw is finite)."""
    rows = [[1, latency_us, busbw_gbps]]
    return Profile.from_dict({"name": "flat", "sources": ["test"], "method": "constant",
                              "tables": {"all_reduce": {"eager": {n: rows for n in ns}}}})


# ---------------------------------------------------------------- profiles and the cost model

@pytest.mark.parametrize("name", available_profiles())
def test_shipped_profiles_state_their_source_and_cover_both_launch_modes(name):
    p = load_profile(name)
    assert p.sources and len(p.method) > 100
    for n in (2, 4, 8):
        eager, graph = (p.seconds("all_reduce", n, 8192, launch) for launch in ("eager", "cuda_graph"))
        assert 1e-6 < graph < eager < 100e-6  # a CUDA graph moves the small-message floor down
        small, large = p.seconds("all_reduce", n, 2**20), p.seconds("all_reduce", n, 2**28)
        assert large > 10 * small  # bandwidth-bound at 256 MiB


def test_required_profiles_are_shipped():
    assert {"h100-nvswitch", "a100-nvlink", "pcie-nop2p", "ib-2node"} <= set(available_profiles())


def test_cost_is_latency_plus_ring_traffic_over_bus_bandwidth():
    p = Profile.from_dict({"name": "t", "sources": ["s"], "method": "m", "tables": {"all_reduce": {"eager": {
        2: [[1024, 10, 100], [1048576, 20, 200]], 4: [[1024, 30, 100], [1048576, 40, 200]]}}}})
    for n, lat, bw in ((2, 10e-6, 100e9), (4, 30e-6, 100e9)):
        for coll in RING_FACTOR:
            assert p.seconds(coll, n, 1024) == pytest.approx(lat + RING_FACTOR[coll](n) * 1024 / bw)
    assert RING_FACTOR["all_reduce"](4) == 2 * RING_FACTOR["reduce_scatter"](4) == 1.5
    # halfway in log(size): latency and inverse bandwidth interpolated
    assert p.seconds("all_reduce", 2, 32768) == pytest.approx(15e-6 + 32768 * (1 / 100e9 + 1 / 200e9) / 2)
    # beyond the last row the last row holds; N = 3 lies between the N = 2 and N = 4 tables
    assert p.seconds("all_reduce", 2, 2**30) == pytest.approx(20e-6 + 2**30 / 200e9)
    n2, n4 = p.seconds("all_reduce", 2, 1024), p.seconds("all_reduce", 4, 1024)
    assert n2 < p.seconds("all_reduce", 3, 1024) < n4
    assert p.seconds("all_reduce", 1, 2**20) == 0.0


def test_samples_are_reproduced_exactly():
    samples = [[1024, 50], [4096, 48], [65536, 80], [1048576, 900]]  # 4096 faster than 1024: noise
    p = Profile.from_dict({"name": "m", "sources": ["s"], "method": "m", "tables": {
        "reduce_scatter": {"eager": {2: {"samples_us": samples}}},
        "all_reduce": {"eager": {2: [[1, 5, 1]]}}}})
    got = [p.seconds("reduce_scatter", 2, b) * 1e6 for b, _ in samples]
    assert got == pytest.approx([48, 48, 80, 900])  # the slow outlier drops to the running minimum
    assert p.seconds("all_gather", 2, 1000) == pytest.approx(5e-6 + 0.5 * 1000 / 1e9)  # falls back to all_reduce


def test_profile_errors_name_the_problem(tmp_path):
    p = flat_profile(10)
    with pytest.raises(ProfileError, match="covers N = 2, 4 .*not N = 8"):
        p.seconds("all_reduce", 8, 1024)
    with pytest.raises(ProfileError, match="no cuda_graph tables"):
        p.seconds("all_reduce", 2, 1024, "cuda_graph")
    with pytest.raises(ProfileError, match="h100-nvswitch"):
        load_profile("no-such-interconnect")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "tables": {"all_reduce": {"eager": {2: [[1, 2, 3]]}}}}))
    with pytest.raises(ProfileError, match="missing sources, method"):
        load_profile(bad)
    bad.write_text(yaml.safe_dump({"name": "bad", "sources": "x", "method": "y",
                                   "tables": {"all_reduce": {"eager": {2: [[1, 2]]}}}}))
    with pytest.raises(ProfileError, match=r"all_reduce.eager.2: expected rows"):
        load_profile(bad)


# ---------------------------------------------------------------- the projecting communicator

def test_projected_results_keep_shapes_and_carry_the_flag():
    comm = ProjectingCommunicator(rank=1, world=4, profile=flat_profile(1))
    x = torch.arange(24.0).view(8, 3)
    assert not comm.carries_data and comm.all_reduce(x) is x
    assert torch.equal(comm.reduce_scatter(x), x[2:4])
    assert comm.all_gather(x[:2]).shape == (8, 3)
    assert comm.all_reduce(x, async_op=True).wait() is x
    single = ProjectingCommunicator(world=1, profile=flat_profile(1e6))
    start = time.perf_counter()
    assert single.all_reduce(x) is x and time.perf_counter() - start < 0.1  # one rank: nothing to model


def _elapsed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _compute(seconds: float) -> None:
    """Host compute for about ``seconds`` (small matmuls)."""
    a, end = torch.randn(64, 64), time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def test_sync_waits_match_the_model():
    profile = flat_profile(2000, busbw_gbps=1.0)  # 2 ms + 2(N-1)/N * B / 1 GB/s
    comm = ProjectingCommunicator(rank=0, world=2, profile=profile)
    comm.stats.enabled = True
    for rows in (1, 2048):  # 4 KiB and 8 MiB float32 buffers: 2.004 ms and 10.4 ms
        x = torch.zeros(rows, 1024)
        want = profile.seconds("all_reduce", 2, x.numel() * 4)
        over = min(_elapsed(lambda: comm.all_reduce(x)) - want for _ in range(3))
        assert 0 <= over < TOLERANCE_S
    assert comm.stats.calls == 6 and comm.modelled_s == pytest.approx(3 * (2.004096e-3 + 10.388608e-3), rel=1e-6)


def test_async_waits_overlap_compute_and_queue_on_one_link():
    comm = ProjectingCommunicator(rank=0, world=2, profile=flat_profile(30000))  # 30 ms per collective
    x = torch.zeros(4, 8)
    comm.stats.enabled = True

    def overlapped() -> tuple[float, float, float]:
        comm.stats.reset()
        start = time.perf_counter()
        pending = comm.all_reduce(x, async_op=True)
        _compute(0.02)  # runs while the collective is in flight
        computed = time.perf_counter() - start
        pending.wait()
        return time.perf_counter() - start, computed, comm.stats.seconds
    runs = [overlapped() for _ in range(3)]
    assert all(took >= 0.03 for took, _, _ in runs)
    took, computed, blocked = min(runs, key=lambda r: r[0] - max(0.03, r[1]))  # the least disturbed (shared CPU)
    assert took - max(0.03, computed) < TOLERANCE_S  # the longer of the two, not their sum
    assert blocked < max(0.0, 0.03 - computed) + TOLERANCE_S  # blocked only for the rest of the collective

    def queued():
        first, second = comm.all_reduce(x, async_op=True), comm.all_reduce(x, async_op=True)
        first.wait()
        second.wait()
    times = [_elapsed(queued) for _ in range(3)]
    assert min(times) >= 0.06 and min(times) < 0.06 + TOLERANCE_S  # one link: the second starts when the first ends


def test_heaviest_rank_has_most_heads_then_kv_heads_then_ffn():
    config = source("random:tiny-uneven").config  # 9 heads, 3 KV heads
    assert heaviest_rank(config, 2) == 0 and heaviest_rank(config, 4) == 0
    reversed_layout = [list(reversed(layer)) for layer in default_layout(config, 4)]
    assert heaviest_rank(config, 4, reversed_layout) == 3
    # equal query heads: the rank whose heads span two KV groups reads more KV heads
    layout = [[BlockShard((0, 1), (0, 10), 3), BlockShard((2, 3), (10, 20), 3), BlockShard((4, 5), (20, 30), 3)]]
    assert heaviest_rank(config, 3, layout) == 1
    layout = [[BlockShard((0,), (0, 10), 3), BlockShard((3,), (10, 21), 3)]]
    assert heaviest_rank(config, 2, layout) == 1


# ---------------------------------------------------------------- projected cells of every strategy

STRATEGY_OPTIONS = {"spd": {"blocks": "all"}, "tokenweave": {"split_min_tokens": "0"},
                    "ladder": {"layers": "all"}}
COST_US = 20000  # every collective costs 20 ms: more than the tiny model's compute, even on a busy CPU


def _collectives_per_step(name: str, profile: Profile) -> tuple[int, int]:
    """(prefill, decode step) collective counts of a strategy, counted by a projecting communicator."""
    runner = projected_runner("random:tiny-uneven", name, STRATEGY_OPTIONS.get(name), 2, profile)
    runner.comm.stats.enabled = True
    runner.generate([[5, 6, 7, 8, 9, 10, 11, 12]] * 2, 1)
    prefill = runner.comm.stats.calls
    runner.generate([[5, 6, 7, 8, 9, 10, 11, 12]] * 2, 3)
    return prefill, (runner.comm.stats.calls - 2 * prefill) // 2


@pytest.fixture(scope="module")
def projected_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("projected")
    profile_path = folder / "flat.yaml"
    profile_path.write_text(yaml.safe_dump({"name": "flat-3ms", "sources": ["test"], "method": "3 ms per collective",
                                            "tables": {"all_reduce": {"eager": {2: [[1, COST_US, "inf"]]}}}}))
    strategies = [{"name": n, "options": STRATEGY_OPTIONS.get(n, {})} for n in available()]
    spd = [{"name": "spd", "options": STRATEGY_OPTIONS["spd"]}] if "spd" in available() else []
    cells = expand({"model": "random:tiny-uneven", "tp": 2, "prompt_len": 8, "new_tokens": 3, "repetitions": 2,
                    "warmup": 1, "mode": "projected", "interconnect": str(profile_path),
                    "matrices": [{"strategies": strategies, "batch": 2},
                                 {"strategies": spd, "batch": 1}]})  # a second cell on SPD's own shard
    all_rows = run(cells, folder).rows()
    assert len(all_rows) == len(cells) and all(r["status"] == "ok" for r in all_rows), all_rows
    rows = {r["strategy"]: r for r in all_rows if r["batch"] == 2}
    counts = {n: _collectives_per_step(n, flat_profile(0)) for n in available()}
    return rows, counts


def test_a_projected_cell_runs_for_every_strategy(projected_rows):
    rows, _ = projected_rows
    assert set(rows) == set(available())
    assert {"baseline", "ladder", "nocomm", "seqpar", "spd", "tokenweave"} <= set(rows)  # all of them exist now
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert row["provenance"] == "projected" and row["interconnect"].endswith("flat.yaml")
        assert row["telemetry_status"].startswith("n/a") and row["energy_j"] is None


def test_projected_times_include_every_modelled_collective(projected_rows):
    rows, counts = projected_rows
    cost = COST_US * 1e-6 * 1e3  # ms
    for name, row in rows.items():
        prefill, step = counts[name]
        assert (step == 0) == (name == "nocomm"), name
        # one link: a step lasts at least as long as its collectives, overlapped or not
        assert row["prefill_ms_median"] >= prefill * cost
        assert row["decode_ms_per_token_median"] >= step * cost
    # baseline = nocomm + its collectives (compute timings on a shared CPU are noisy: half of them)
    extra = rows["baseline"]["decode_ms_per_token_median"] - rows["nocomm"]["decode_ms_per_token_median"]
    assert extra > 0.5 * counts["baseline"][1] * cost
    assert rows["baseline"]["comm_fraction"] > 0.3 and rows["nocomm"]["comm_fraction"] is None


# ---------------------------------------------------------------- commbench and validate-projection (gloo)

@pytest.fixture(scope="module")
def measured_profile(tmp_path_factory):
    from suite.cli import main

    out = tmp_path_factory.mktemp("commbench") / "gloo.yaml"
    assert main(["commbench", "--tp", "2", "--sizes", "1K", "256K", "--iters", "3", "--repeats", "1",
                 "--warmup", "1", "--name", "gloo-test", "--out", str(out)]) == 0
    return out


def test_commbench_writes_a_profile_that_reproduces_its_measurements(measured_profile, capsys):
    data = yaml.safe_load(measured_profile.read_text())
    profile = load_profile(measured_profile)
    assert profile.name == "gloo-test" and "commbench" in profile.sources[0]
    for coll in RING_FACTOR:
        samples = data["tables"][coll]["eager"][2]["samples_us"]
        assert [b for b, _ in samples] == [1024, 262144]
        small, large = (profile.seconds(coll, 2, b) * 1e6 for b, _ in samples)
        assert small == pytest.approx(min(us for _, us in samples))
        assert large == pytest.approx(samples[1][1])


def test_validate_projection_reports_the_error_per_cell(measured_profile, capsys):
    from suite.cli import main

    assert main(["validate-projection", "--model", "random:tiny", "--tp", "2", "--strategy", "baseline,nocomm",
                 "--interconnect", str(measured_profile), "--prompt-len", "16", "--new-tokens", "4",
                 "--repetitions", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["strategy"] for r in results] == ["baseline", "nocomm"]
    for r in results:
        for phase, key in (("prefill", "prefill_ms_median"), ("decode", "decode_ms_per_token_median")):
            m, p = r[f"{key}_measured"], r[f"{key}_projected"]
            assert m > 0 and p > 0 and r[f"{phase}_error_pct"] == pytest.approx(100 * (p / m - 1))


def test_validate_projection_rejects_bad_input(capsys):
    from suite.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate-projection", "--tp", "2", "--interconnect", "no-such-profile", "--model", "random:tiny"])
    assert exc.value.code == 2 and "no-such-profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate-projection", "--tp", "1", "--interconnect", "h100-nvswitch", "--model", "random:tiny"])


def test_accuracy_code_refuses_a_projecting_communicator():
    from suite.accuracy.lm_eval_model import _RankScorer

    comm = ProjectingCommunicator(rank=0, world=2, profile=flat_profile(1))
    with pytest.raises(ValueError, match="projecting communicator"):
        _RankScorer(comm, torch.device("cpu"), "random:tiny", "baseline", {}, "float32")


# ---------------------------------------------------------------- GPU: the spin-kernel link

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_waits_match_the_model_overlap_and_follow_the_launch_mode():
    dev = torch.device("cuda", 0)
    profile = flat_profile(500)  # 0.5 ms per collective when eager
    profile.tables["all_reduce"]["cuda_graph"] = {2: [(1, 100e-6, 0.0)]}  # 0.1 ms under a CUDA graph
    comm = ProjectingCommunicator(rank=0, world=2, profile=profile, device=dev, sms=4)
    x, a = torch.zeros(1024, device=dev), torch.randn(2048, 2048, device=dev)

    def timed(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * MS

    timed(lambda: comm.all_reduce(x))
    assert timed(lambda: [comm.all_reduce(x) for _ in range(10)]) == pytest.approx(5e-3, rel=0.1)
    timed(lambda: a @ a)  # cuBLAS warm-up
    matmuls = max(1, round(2e-3 / timed(lambda: a @ a)))
    compute = timed(lambda: [a @ a for _ in range(matmuls)])  # about as long as the link below

    def overlapped():
        pending = [comm.all_reduce(x, async_op=True) for _ in range(4)]  # 2 ms queued on the link
        for _ in range(matmuls):
            a @ a
        for p in pending:
            p.wait()
    both = timed(overlapped)
    assert 0.95 * max(2e-3, compute) <= both < 0.8 * (2e-3 + compute)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            comm.all_reduce(x)
    assert timed(graph.replay) == pytest.approx(1e-3, rel=0.15)
    # a projected decode in a CUDA graph pays the graph-mode cost, its eager prefill the eager one
    runner = projected_runner("random:tiny", "baseline", None, 2, profile, device="cuda")
    gen = runner.generate([[1, 2, 3, 4]], 4, cuda_graph=True)
    assert gen.prefill_s >= 4 * 0.5e-3 and all(4 * 0.1e-3 <= s < 4 * 0.5e-3 for s in gen.decode_s)

