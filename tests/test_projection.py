"""Projection: the cost model, the projecting communicator's waits, projected cells of every strategy,
commbench (gloo) and validate-projection (N gloo ranks vs their projection)."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import yaml

from suite.latency.bench import expand, run
from suite.latency.interconnect import FUSED_SYNC, RING_FACTOR, Profile, ProfileError, available_profiles, load_profile
from suite.latency.projection import ProjectingCommunicator, heaviest_rank, projected_runner
from suite.model.llama import RMSNorm
from suite.model.sharding import BlockShard, default_layout
from suite.parallel.comm import Communicator, Pending
from suite.parallel.runner import load_runner
from suite.parallel.strategy import available
from tests.helpers import source

MS = 1e-3
TOLERANCE_S = 5 * MS  # a sleep on a busy 2-core machine overshoots by less than this


SMS = {"sms": 4, "sms_source": "test"}


def flat_profile(latency_us: float, busbw_gbps: float = math.inf, ns=(2, 4), fused: bool = False) -> Profile:
    """Every collective costs ``latency_us`` (plus the bandwidth term when busbw is finite); ``fused``:
    the interconnect has TokenWeave's fused kernel at the same cost."""
    rows = [[1, latency_us, busbw_gbps]]
    tables = {"all_reduce": {"eager": {n: rows for n in ns}}}
    return Profile.from_dict(
        {
            "name": "flat",
            "sources": ["test"],
            "method": "constant",
            **SMS,
            "tables": tables | ({FUSED_SYNC: tables["all_reduce"]} if fused else {}),
        }
    )


# ---------------------------------------------------------------- profiles and the cost model


@pytest.mark.parametrize("name", available_profiles())
def test_shipped_profiles_state_their_source_and_cover_both_launch_modes(name):
    p = load_profile(name)
    assert p.sources and all(len(p.method[launch]) > 100 for launch in ("eager", "cuda_graph"))
    assert set(p.ns("eager")) == set(p.ns("cuda_graph")) >= ({8} if "multimem" in name else {2, 4, 8})
    for n in p.ns("eager"):
        eager, graph = (p.seconds("all_reduce", n, 8192, launch) for launch in ("eager", "cuda_graph"))
        assert 1e-6 < graph < eager < 100e-6  # a CUDA graph moves the small-message floor down
        small, large = p.seconds("all_reduce", n, 2**20), p.seconds("all_reduce", n, 2**28)
        assert large > 10 * small  # bandwidth-bound at 256 MiB


def test_required_profiles_are_shipped():
    assert {"h100-nvswitch", "a100-nvlink", "pcie-nop2p", "ib-2node"} <= set(available_profiles())


def test_cost_is_latency_plus_ring_traffic_over_bus_bandwidth():
    p = Profile.from_dict(
        {
            "name": "t",
            "sources": ["s"],
            "method": "m",
            **SMS,
            "tables": {
                "all_reduce": {
                    "eager": {2: [[1024, 10, 100], [1048576, 20, 200]], 4: [[1024, 30, 100], [1048576, 40, 200]]}
                }
            },
        }
    )
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
    p = Profile.from_dict(
        {
            "name": "m",
            "sources": ["s"],
            "method": "m",
            **SMS,
            "tables": {
                "reduce_scatter": {"eager": {2: {"samples_us": samples}}},
                "all_reduce": {"eager": {2: [[1, 5, 1]]}},
            },
        }
    )
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
    bad.write_text(
        yaml.safe_dump(
            {"name": "bad", "sources": "x", "method": "y", **SMS, "tables": {"all_reduce": {"eager": {2: [[1, 2]]}}}}
        )
    )
    with pytest.raises(ProfileError, match=r"all_reduce.eager.2: expected rows"):
        load_profile(bad)
    bad.write_text(
        yaml.safe_dump(
            {"name": "bad", "sources": "x", "method": "y", "tables": {"all_reduce": {"eager": {2: [[1, 2, 3]]}}}}
        )
    )
    with pytest.raises(ProfileError, match="missing sms, sms_source"):
        load_profile(bad)
    bad.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "sources": "x",
                "method": {"eager": "y"},
                **SMS,
                "tables": {"all_reduce": {"cuda_graph": {2: [[1, 2, 3]]}}},
            }
        )
    )
    with pytest.raises(ProfileError, match="method must describe every launch mode"):
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


def test_fused_sync_is_one_modelled_collective_with_the_split_sync_shapes():
    profile = Profile.from_dict(
        {
            "name": "fused",
            "sources": ["test"],
            "method": "test",
            **SMS,
            "tables": {
                "all_reduce": {"eager": {4: [[1, 1000, math.inf]]}},
                FUSED_SYNC: {"eager": {4: [[1, 3000, math.inf]]}},
            },
        }
    )
    comm = ProjectingCommunicator(rank=1, world=4, profile=profile)
    partial, residual = torch.zeros(8, 3), torch.zeros(2, 3)
    start = time.perf_counter()
    out_residual, gathered = comm.fused_sync(partial, residual, torch.nn.RMSNorm(3))
    assert time.perf_counter() - start >= 3e-3 and comm.modelled_s == pytest.approx(3e-3)
    assert comm.counts == {FUSED_SYNC: 1} and out_residual.shape == (2, 3) and gathered.shape == (8, 3)
    comm.counts.clear()
    comm.reduce_scatter(partial), comm.all_gather(residual)  # what the split sync issues instead
    assert comm.counts == {"reduce_scatter": 1, "all_gather": 1} and comm.sms == 4  # sms: the profile's
    without = ProjectingCommunicator(rank=1, world=4, profile=flat_profile(1000))  # no fused kernel: its parts
    out_residual, gathered = without.fused_sync(partial, residual, RMSNorm(3, 1e-6))
    assert without.counts == {"reduce_scatter": 1, "all_gather": 1} and without.modelled_s == pytest.approx(2e-3)
    assert out_residual.shape == (2, 3) and gathered.shape == (8, 3)


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


def test_the_projected_rank_is_the_heaviest_under_an_spd_plans_head_grouping(tmp_path):
    """Head grouping moves the fifth query head of every block to rank 1: the projection runs rank 1."""
    from safetensors.torch import save_file

    from spd.plan_file import Plan

    config = source("random:tiny-uneven").config  # 9 heads: 5 + 4 on 2 ranks by default
    grouped = [{"q_heads": [5, 6, 7, 8], "ffn": [0, 100]}, {"q_heads": [0, 1, 2, 3, 4], "ffn": [100, 200]}]
    save_file({}, tmp_path / "weights.safetensors")  # no distilled tensor: the original weights serve
    plan = Plan(
        "random:tiny-uneven",
        2,
        {b: {"mode": "hg+b2b", "sensitivity": 0.0, "layout": grouped} for b in range(config.num_hidden_layers)},
        weights="weights.safetensors",
    )
    path = plan.save(tmp_path / "plan.json")
    profile = flat_profile(0)
    baseline = projected_runner("random:tiny-uneven", "baseline", None, 2, profile)
    spd = projected_runner("random:tiny-uneven", "spd", {"plan": str(path)}, 2, profile)
    assert baseline.comm.rank == 0 and spd.comm.rank == 1
    assert all(layer.self_attn.n_q == 5 for layer in spd.model.layers)


# ---------------------------------------------------------------- collectives per step, counted by kind


@dataclass
class _Recorder(Communicator):
    """Counts the collectives a strategy issues, by kind; results keep the shapes (values are meaningless)."""

    calls: Counter = field(default_factory=Counter)

    def _issue(self, kind, out, async_op):
        self.calls[kind] += 1
        return Pending(out) if async_op else out

    def all_reduce(self, x, async_op=False):
        return self._issue("all_reduce", x, async_op)

    def reduce_scatter(self, x, async_op=False):
        return self._issue("reduce_scatter", x[: x.shape[0] // self.world], async_op)

    def all_gather(self, x, async_op=False):
        return self._issue("all_gather", x.repeat(self.world, 1), async_op)

    def fused_sync(self, partial, residual, norm=None):
        return residual, self._issue(FUSED_SYNC, residual.repeat(self.world, 1), False)


L = source("random:tiny-uneven").config.num_hidden_layers  # 3 blocks: 2L = 6 modules
SPLIT = {"split_min_tokens": "0", "split_multiple": "4"}  # 16 prefill tokens split 8 + 8; a 2-token step does not
UNFUSED = {"fused": "false"}  # the sync's reduce-scatter and all-gather as separate collectives
COUNTS = [  # (strategy, options, prefill, decode step): every module synced once per token half
    ("baseline", {}, {"all_reduce": 2 * L}, {"all_reduce": 2 * L}),
    ("spd", {"blocks": "last:1"}, {"all_reduce": 2 * L - 1}, {"all_reduce": 2 * L - 1}),
    ("spd", {"blocks": "all"}, {"all_reduce": L}, {"all_reduce": L}),
    ("ladder", {"layers": "all"}, {"all_reduce": 2 * L}, {"all_reduce": 2 * L}),
    ("seqpar", {}, {FUSED_SYNC: 2 * L}, {FUSED_SYNC: 2 * L}),  # by default TokenWeave's fused kernel
    ("seqpar", UNFUSED, {"reduce_scatter": 2 * L, "all_gather": 2 * L}, {"reduce_scatter": 2 * L, "all_gather": 2 * L}),
    ("tokenweave", {}, {FUSED_SYNC: 2 * L}, {FUSED_SYNC: 2 * L}),  # 16 tokens < 1024: no split
    ("tokenweave", SPLIT, {FUSED_SYNC: 4 * L}, {FUSED_SYNC: 2 * L}),
    (
        "tokenweave",
        SPLIT | UNFUSED,
        {"reduce_scatter": 4 * L, "all_gather": 4 * L},
        {"reduce_scatter": 2 * L, "all_gather": 2 * L},
    ),
    # composites: the 2L - 1 syncs SPD on one block leaves, on ladder's or TokenWeave's schedule
    ("spd+ladder", {"blocks": "last:1"}, {"all_reduce": 2 * L - 1}, {"all_reduce": 2 * L - 1}),
    (
        "spd+tokenweave",
        {"blocks": "last:1"} | UNFUSED,
        {"reduce_scatter": 2 * L - 1, "all_gather": 2 * L - 1},
        {"reduce_scatter": 2 * L - 1, "all_gather": 2 * L - 1},
    ),
    (
        "spd+tokenweave",
        {"blocks": "all"} | SPLIT | UNFUSED,
        {"reduce_scatter": 2 * L, "all_gather": 2 * L},
        {"reduce_scatter": L, "all_gather": L},
    ),
    ("spd+tokenweave", {"blocks": "last:1"} | SPLIT, {FUSED_SYNC: 2 * (2 * L - 1)}, {FUSED_SYNC: 2 * L - 1}),
    ("nocomm", {}, {}, {}),
]


def _per_step(run) -> tuple[dict, dict]:
    """(prefill, one decode step) collectives by kind: ``run(new_tokens)`` returns the counter after a generation."""
    prefill = run(1)
    three = run(3)  # prefill + 2 decode steps
    return dict(prefill), {k: (three[k] - prefill[k]) // 2 for k in three if three[k] > prefill[k]}


@pytest.mark.parametrize("name, options, prefill, decode", COUNTS, ids=[f"{c[0]}-{c[1]}" for c in COUNTS])
def test_collectives_per_step_by_kind(name, options, prefill, decode):
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12]] * 2

    def recorded(new_tokens):
        comm = _Recorder(rank=0, world=2)
        load_runner(comm, torch.device("cpu"), "random:tiny-uneven", name, options).generate(prompts, new_tokens)
        return comm.calls

    def projected(new_tokens):
        runner = projected_runner("random:tiny-uneven", name, options, 2, flat_profile(0, fused=True))
        runner.generate(prompts, new_tokens)
        return runner.comm.counts

    assert _per_step(recorded) == (prefill, decode)
    assert _per_step(projected) == (prefill, decode)  # the projecting communicator models each of them


# ---------------------------------------------------------------- TokenWeave's fused sync against the all-reduce


def test_fused_tokenweave_decode_costs_no_more_per_sync_point_than_baseline_on_h100_multimem():
    """Llama-3-70B (hidden 8192, bfloat16) at N = 8 under CUDA graphs: a decode step's fused sync of the
    token-sharded stream (tokens padded to a multiple of N) against baseline's all-reduce."""
    profile, n, row_bytes = load_profile("h100-nvswitch-multimem"), 8, 8192 * 2
    for batch in (1, 4, 16, 64):
        all_reduce = profile.seconds("all_reduce", n, batch * row_bytes, "cuda_graph")
        fused = profile.seconds(FUSED_SYNC, n, -(-batch // n) * n * row_bytes, "cuda_graph")
        assert fused <= all_reduce, batch


def test_projected_fused_tokenweave_pays_one_fused_sync_per_sync_point():
    """A projected decode at N = 8 on the multimem profile (eager here: CPU): modelled time per sync point."""
    profile, prompts = load_profile("h100-nvswitch-multimem"), [[5, 6, 7, 8, 9, 10, 11, 12]] * 3
    hidden = source("random:tiny-uneven").config.hidden_size
    per_sync = {}
    for name, options in (("baseline", {}), ("tokenweave", {})):
        runner = projected_runner("random:tiny-uneven", name, options, 8, profile)
        runner.generate(prompts, 1)
        before, syncs = runner.comm.modelled_s, sum(runner.comm.counts.values())
        runner.generate(prompts, 2)  # prefill + one decode step
        step_s = runner.comm.modelled_s - 2 * before
        per_sync[name] = step_s / (sum(runner.comm.counts.values()) - 2 * syncs)
    rows = len(prompts)
    assert per_sync["baseline"] == pytest.approx(profile.seconds("all_reduce", 8, rows * hidden * 4))
    assert per_sync["tokenweave"] == pytest.approx(profile.seconds(FUSED_SYNC, 8, 8 * hidden * 4))  # 3 rows -> 8
    assert per_sync["tokenweave"] <= per_sync["baseline"]


# ---------------------------------------------------------------- projected cells of every strategy

STRATEGY_OPTIONS = {
    "spd": {"blocks": "all"},
    "tokenweave": {"split_min_tokens": "0"},
    "ladder": {"layers": "all"},
    "spd+ladder": {"blocks": "all"},
    "spd+tokenweave": {"blocks": "all", "split_min_tokens": "0"},
}
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
    profile_path.write_text(
        yaml.safe_dump(
            {
                "name": "flat-3ms",
                "sources": ["test"],
                "method": "3 ms per collective",
                **SMS,
                "tables": {"all_reduce": {"eager": {2: [[1, COST_US, "inf"]]}}},
            }
        )
    )
    strategies = [{"name": n, "options": STRATEGY_OPTIONS.get(n, {})} for n in available()]
    spd = [{"name": "spd", "options": STRATEGY_OPTIONS["spd"]}] if "spd" in available() else []
    cells = expand(
        {
            "model": "random:tiny-uneven",
            "tp": 2,
            "prompt_len": 8,
            "new_tokens": 3,
            "repetitions": 2,
            "warmup": 1,
            "mode": "projected",
            "interconnect": str(profile_path),
            "matrices": [{"strategies": strategies, "batch": 2}, {"strategies": spd, "batch": 1}],
        }
    )  # a second cell on SPD's own shard
    all_rows = run(cells, folder).rows()
    assert len(all_rows) == len(cells) and all(r["status"] == "ok" for r in all_rows), all_rows
    rows = {r["strategy"]: r for r in all_rows if r["batch"] == 2}
    counts = {n: _collectives_per_step(n, flat_profile(0)) for n in available()}
    return rows, counts


def test_a_projected_cell_runs_for_every_strategy(projected_rows):
    rows, _ = projected_rows
    assert set(rows) == set(available())
    assert {"baseline", "ladder", "nocomm", "seqpar", "spd", "tokenweave", "spd+ladder", "spd+tokenweave"} <= set(rows)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert row["provenance"] == "projected" and row["interconnect"].endswith("flat.yaml")
        assert row["comm_fraction_status"] == (
            "n/a: the strategy issued no collective"
            if name == "nocomm"
            else "modelled: host time blocked on the projection's modelled collectives"
        )
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
    assert (
        main(
            [
                "commbench",
                "--tp",
                "2",
                "--sizes",
                "1K",
                "256K",
                "--iters",
                "3",
                "--repeats",
                "1",
                "--warmup",
                "1",
                "--name",
                "gloo-test",
                "--out",
                str(out),
            ]
        )
        == 0
    )
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


def test_validate_projection_reports_measured_and_projected_figures_per_cell(measured_profile, capsys):
    """Each strategy's cell, measured and projected. No bound on their agreement: on a shared CPU the
    projected decode of this tiny model has been 5x off its measurement (the cross-check is the GPU's)."""
    from suite.cli import main

    assert (
        main(
            [
                "validate-projection",
                "--model",
                "random:tiny",
                "--tp",
                "2",
                "--strategy",
                "baseline,nocomm",
                "--interconnect",
                str(measured_profile),
                "--prompt-len",
                "16",
                "--new-tokens",
                "4",
                "--repetitions",
                "2",
                "--json",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["strategy"] for r in results] == ["baseline", "nocomm"]
    for r in results:
        for phase, key in (("prefill", "prefill_ms_median"), ("decode", "decode_ms_per_token_median")):
            m, p = r[f"{key}_measured"], r[f"{key}_projected"]
            assert m > 0 and p > 0
            assert r[f"{phase}_error_pct"] == pytest.approx(100 * (p - m) / m)  # signed: projected above measured


def test_validate_projection_rejects_bad_input(capsys):
    from suite.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["validate-projection", "--tp", "2", "--interconnect", "no-such-profile", "--model", "random:tiny"])
    assert exc.value.code == 2 and "no-such-profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate-projection", "--tp", "1", "--interconnect", "h100-nvswitch", "--model", "random:tiny"])


def test_the_communication_share_says_how_it_is_obtained():
    from suite.latency.measure import comm_share_status

    real, modelled = Communicator(rank=0, world=2), ProjectingCommunicator(rank=0, world=2, profile=flat_profile(1))
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert comm_share_status(real, cpu, False) == "measured: host time blocked on collectives"
    assert comm_share_status(real, gpu, False).startswith("measured: time the waiting stream stood still")
    assert "CUDA events" in comm_share_status(modelled, gpu, False)
    for comm in (real, modelled):  # never the host's enqueue time, never a partial figure
        assert comm_share_status(comm, gpu, True).startswith("n/a: decode is replayed from a CUDA graph")
    assert comm_share_status(Communicator(), cpu, False) == "n/a: one rank communicates nothing"


def test_accuracy_code_refuses_a_projecting_communicator():
    from suite.accuracy.lm_eval_model import _RankScorer

    comm = ProjectingCommunicator(rank=0, world=2, profile=flat_profile(1))
    with pytest.raises(ValueError, match="projecting communicator"):
        _RankScorer(comm, torch.device("cpu"), "random:tiny", "float32")


# ---------------------------------------------------------------- GPU: the SM-holding link


def _cuda_timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * MS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_waits_match_the_model_overlap_and_follow_the_launch_mode():
    dev = torch.device("cuda", 0)
    profile = flat_profile(500)  # 0.5 ms per collective when eager
    profile.tables["all_reduce"]["cuda_graph"] = {2: [(1, 100e-6, 0.0)]}  # 0.1 ms under a CUDA graph
    comm = ProjectingCommunicator(rank=0, world=2, profile=profile, device=dev, sms=4)
    x, a = torch.zeros(1024, device=dev), torch.randn(2048, 2048, device=dev)
    timed = _cuda_timed
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_modelled_collective_takes_its_sms_from_compute():
    dev = torch.device("cuda", 0)
    available = torch.cuda.get_device_properties(dev).multi_processor_count
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    _cuda_timed(lambda: a @ a)  # cuBLAS warm-up
    matmuls = max(1, round(2e-3 / _cuda_timed(lambda: a @ a)))
    alone = _cuda_timed(lambda: [a @ a for _ in range(matmuls)])  # about 2 ms on the whole GPU

    def beside(sms: int) -> float:
        """The matmuls' time while a 10 ms modelled collective holds ``sms`` SMs."""
        comm = ProjectingCommunicator(rank=0, world=2, profile=flat_profile(10_000), device=dev, sms=sms)
        pending = comm.all_reduce(torch.zeros(1, device=dev), async_op=True)
        took = _cuda_timed(lambda: [a @ a for _ in range(matmuls)])
        pending.wait()
        torch.cuda.synchronize()
        return took

    assert beside(available - 8) > 4 * alone  # 8 SMs left: the matmuls crawl until the collective ends
    # One SM held: work in many short blocks (flash attention, not cuBLAS's persistent GEMMs, which
    # lose a whole wave to one held SM) loses about that SM's share plus a partial wave.
    q = torch.randn(8, 32, 4096, 128, device=dev, dtype=torch.float16)

    def attention():
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    alone = _cuda_timed(attention)
    comm = ProjectingCommunicator(rank=0, world=2, profile=flat_profile(1e6 * 20 * alone), device=dev, sms=1)
    pending = comm.all_reduce(torch.zeros(1, device=dev), async_op=True)
    held = _cuda_timed(attention)
    pending.wait()
    assert held < alone * (1 + 1 / (available - 1)) * 1.1
    with pytest.raises(ProfileError, match=f"has {available} SMs"):
        ProjectingCommunicator(rank=0, world=2, profile=flat_profile(1), device=dev, sms=available)


def _overlapping_kernels(prof, collective: str) -> list[tuple[str, str]]:
    """(collective kernel, other kernel) pairs where the other kernel ran entirely inside the collective."""
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    comm = [k for k in kernels if collective in k[0]]
    return [(c[0], k[0]) for c in comm for k in kernels if collective not in k[0] and c[1] < k[1] and k[2] < c[2]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tokenweave_overlaps_one_halfs_modelled_sync_with_the_other_halfs_compute():
    """On the device timeline (CUPTI, through torch.profiler): while the link holds its SMs for one half's
    sync, a kernel of the other half's compute runs."""
    runner = projected_runner(
        "random:smollm2-135m", "tokenweave", {"split_min_tokens": "0"}, 2, flat_profile(200, ns=(2,)), device="cuda"
    )
    prompt = [list(range(1, 2049))]
    runner.logits(prompt)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.logits(prompt)
        torch.cuda.synchronize()
    assert _overlapping_kernels(prof, "hold_sms")


def _tokenweave_timeline_job(comm, device):
    from suite.parallel.runner import load_runner

    runner = load_runner(comm, device, "random:smollm2-135m", "tokenweave", {"split_min_tokens": "0"})
    prompt = [list(range(1, 4097))]
    runner.logits(prompt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.logits(prompt)
        torch.cuda.synchronize()
    return _overlapping_kernels(prof, "nccl")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tokenweave_overlaps_one_halfs_nccl_sync_with_the_other_halfs_compute():
    """Two ranks on NCCL: a compute kernel runs inside an NCCL kernel of the other half's sync."""
    from suite.parallel.launch import launch

    assert launch(_tokenweave_timeline_job, 2, device="cuda", backend="nccl")
