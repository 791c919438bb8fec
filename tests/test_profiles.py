"""The shipped interconnect profiles: plausible against each other and against the measurements they
cite, and ``spdbench profile`` shows what they model.

The checks are functions of profiles so that they can be run against any profile file."""

from __future__ import annotations

import json

import pytest

from suite.latency.interconnect import (
    FUSED_SYNC,
    LAUNCHES,
    TRAFFIC,
    Profile,
    ProfileError,
    available_profiles,
    load_profile,
)

REFERENCE = "h100-nvswitch"
SLOWER = ["a100-nvlink", "pcie-nop2p", "ib-2node"]  # lower-bandwidth interconnects than NVSwitch on H100
SIZES = sorted({m * 2**k for k in range(31) for m in (1, 3)})  # 1 B .. 3 GiB, between and on table rows
SPLIT_LIMIT = 1.5  # reduce-scatter + all-gather under a CUDA graph: at most this many all-reduces
KB, MB = 2**10, 2**20


def cheaper_points(slower: Profile, reference: Profile) -> list[tuple]:
    """Shared (collective, launch, N, bytes) where ``slower`` costs less than ``reference``."""
    return [
        (coll, launch, n, size)
        for launch in LAUNCHES
        for n in set(slower.ns(launch)) & set(reference.ns(launch))
        for coll in set(slower.collectives()) & set(reference.collectives())
        for size in SIZES
        if slower.seconds(coll, n, size, launch) < reference.seconds(coll, n, size, launch)
    ]


def below_floors(profile: Profile) -> list[tuple]:
    """(launch, N, modelled us, floor us) where the smallest all-reduce costs less than a measured floor."""
    return [
        (launch, n, 1e6 * profile.seconds("all_reduce", n, 1, launch), 1e6 * floor)
        for launch, by_n in profile.floors.items()
        for n, floor in by_n.items()
        if profile.seconds("all_reduce", n, 1, launch) < floor
    ]


def split_ratios(profile: Profile) -> list[tuple]:
    """(N, bytes, ratio) where reduce-scatter + all-gather under a CUDA graph exceed SPLIT_LIMIT all-reduces."""
    out = []
    for n in profile.ns("cuda_graph"):
        for size in SIZES:
            split = sum(profile.seconds(c, n, size, "cuda_graph") for c in ("reduce_scatter", "all_gather"))
            ratio = split / profile.seconds("all_reduce", n, size, "cuda_graph")
            if ratio > SPLIT_LIMIT:
                out.append((n, size, ratio))
    return out


def test_lower_bandwidth_interconnects_never_cost_less_than_nvswitch():
    reference = load_profile(REFERENCE)
    for name in SLOWER:
        assert cheaper_points(load_profile(name), reference) == [], name


@pytest.mark.parametrize("name", available_profiles())
def test_no_modelled_time_is_below_a_measured_floor(name):
    profile = load_profile(name)
    assert profile.floors, "shipped profiles cite their measured floors"
    assert below_floors(profile) == []


@pytest.mark.parametrize("name", available_profiles())
def test_reduce_scatter_plus_all_gather_cost_at_most_one_and_a_half_all_reduces_under_a_graph(name):
    assert split_ratios(load_profile(name)) == []


@pytest.mark.parametrize("name", available_profiles())
def test_every_launch_mode_has_its_method_and_every_collective_its_table(name):
    profile = load_profile(name)
    assert profile.launches() == list(LAUNCHES) and set(profile.method) == set(LAUNCHES)
    assert all(len(text) > 100 for text in profile.method.values())
    assert len(profile.sms_source) > 50 and 1 <= profile.sms <= 32
    for coll in ("all_reduce", "reduce_scatter", "all_gather"):  # no collective borrows the all-reduce table
        for launch in LAUNCHES:
            assert sorted(profile.tables[coll][launch]) == profile.ns(launch), (coll, launch)


@pytest.mark.parametrize("name", available_profiles())
def test_costs_grow_with_size_and_eager_launches_cost_more(name):
    profile = load_profile(name)
    for coll in profile.collectives():
        for n in profile.ns("eager"):
            eager = [profile.seconds(coll, n, size, "eager") for size in SIZES]
            graph = [profile.seconds(coll, n, size, "cuda_graph") for size in SIZES]
            assert eager == sorted(eager) and graph == sorted(graph), (coll, n)
            assert all(g < e for g, e in zip(graph, eager)), (coll, n)


def test_reduce_scatter_and_all_gather_take_their_own_latency():
    """Half the all-reduce's ring steps: under a CUDA graph a split costs one all-reduce and one kernel more."""
    for name in available_profiles():
        profile = load_profile(name)
        for n in profile.ns("cuda_graph"):
            ar, rs, ag = (
                profile.seconds(c, n, 1, "cuda_graph") for c in ("all_reduce", "reduce_scatter", "all_gather")
            )
            assert rs == ag < ar and rs + ag == pytest.approx(ar + 1.25e-6, abs=1e-9), (name, n)


# ---------------------------------------------------------------- against the published measurements
# (interconnects.md; the profiles' sources)


@pytest.mark.parametrize(
    "name, collective, launch, n, points, tolerance",
    [
        # 8x H100, nccl-tests, NCCL 2.24.3: the bandwidth-bound samples (the profile's eager is PyTorch's launch)
        (
            "h100-nvswitch",
            "all_reduce",
            "eager",
            8,
            [(16 * MB, 125.9), (64 * MB, 328.6), (256 * MB, 1112), (1024 * MB, 4011)],
            0.06,
        ),
        # 4x H100 eager reduce-scatter and all-gather
        (
            "h100-nvswitch",
            "reduce_scatter",
            "eager",
            4,
            [(8 * KB, 21.7), (MB, 25.8), (16 * MB, 62.6), (256 * MB, 663)],
            0.10,
        ),
        ("h100-nvswitch", "all_gather", "eager", 4, [(MB, 27.9), (16 * MB, 67.3), (256 * MB, 659)], 0.10),
        # Azure ND A100 v4, nccl-tests, from 1 MB
        (
            "a100-nvlink",
            "all_reduce",
            "eager",
            8,
            [(MB, 51), (4 * MB, 103), (16 * MB, 269), (64 * MB, 705), (256 * MB, 2197), (1024 * MB, 8238)],
            0.12,
        ),
        # 2 nodes x 8 H100 through PyTorch
        ("ib-2node", "all_reduce", "eager", 16, [(MB, 88), (10 * MB, 157), (100 * MB, 647)], 0.001),
        # TokenWeave's artifact: the multimem all-reduce, CUDA-event timed
        (
            "h100-nvswitch-multimem",
            "all_reduce",
            "cuda_graph",
            8,
            [
                (2**i * MB, us)
                for i, us in enumerate([16.51, 20.00, 28.42, 43.78, 75.14, 135.74, 257.25, 500.96, 985.98, 1956.93])
            ],
            0.001,
        ),
    ],
)
def test_profiles_reproduce_the_measurements_they_cite(name, collective, launch, n, points, tolerance):
    profile = load_profile(name)
    for size, us in points:
        assert 1e6 * profile.seconds(collective, n, size, launch) == pytest.approx(us, rel=tolerance), (size, us)


def test_the_multimem_kernels_cost_less_than_nccl_on_the_same_machine():
    """TokenWeave's artifact times NCCL and the multimem all-reduce on the same 8 H100s."""
    nccl_us = [35.65, 55.52, 67.04, 94.50, 137.22, 219.46, 348.06, 646.24, 1230.88, 2405.18]
    multimem = load_profile("h100-nvswitch-multimem")
    for i, us in enumerate(nccl_us):
        for coll in ("all_reduce", FUSED_SYNC):
            assert 1e6 * multimem.seconds(coll, 8, 2**i * MB, "cuda_graph") < us


@pytest.mark.parametrize("n", [2, 4])
def test_multimem_at_fewer_gpus_follows_the_stated_nvls_model(n):
    """N = 2 and 4 from the N = 8 samples: per-GPU traffic B (1 + 1/N), so the time above the 1 MiB latency is
    N = 8's times (1 + 1/N) / (9/8); the latency is L + 1 MiB (1 + 1/N) / W with L and W from two N = 8 samples."""
    w = 9 / 8 * 512 * MB / 1956.93e-6
    latency = 16.51e-6 - 9 / 8 * MB / w
    multimem = load_profile("h100-nvswitch-multimem")

    def t(gpus, size):
        return multimem.seconds("all_reduce", gpus, size, "cuda_graph")

    assert t(n, MB) == pytest.approx(latency + MB * (1 + 1 / n) / w, rel=0.001)
    for size in (2 * MB, 16 * MB, 512 * MB):
        assert t(n, size) - t(n, MB) == pytest.approx((t(8, size) - t(8, MB)) * (1 + 1 / n) / (9 / 8), rel=0.002)
    assert t(n, 64 * KB) == t(n, MB)


# ---------------------------------------------------------------- spdbench profile


def test_profile_command_lists_every_modelled_point(capsys):
    from suite.cli import main

    assert main(["profile", "h100-nvswitch", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    profile = load_profile("h100-nvswitch")
    assert {(p["collective"], p["launch"], p["n"]) for p in points} == {
        (c, launch, n) for c in TRAFFIC if c != FUSED_SYNC for launch in LAUNCHES for n in (2, 4, 8)
    }  # no fused kernel on this interconnect: no fused_sync to price
    assert {p["bytes"] for p in points} == {4**k for k in range(5, 16)}  # 1 KiB .. 1 GiB
    for p in points:
        assert set(p) == {"collective", "launch", "n", "bytes", "us"}
        assert p["us"] == pytest.approx(1e6 * profile.seconds(p["collective"], p["n"], p["bytes"], p["launch"]))
    with pytest.raises(ProfileError, match="no fused_sync kernel"):
        profile.seconds(FUSED_SYNC, 8, 16 * KB)
    assert load_profile("h100-nvswitch-multimem").collectives() == list(TRAFFIC)


@pytest.mark.parametrize("name", available_profiles())
def test_profile_command_prints_the_method_and_table(name, capsys):
    from suite.cli import main

    assert main(["profile", name]) == 0
    out = capsys.readouterr().out
    profile = load_profile(name)
    assert profile.name in out and f"SMs a collective holds: {profile.sms}" in out
    assert all(text.split()[0] in out for text in profile.method.values())
    assert all(coll in out for coll in profile.collectives()) and "1G" in out
    assert ("fused_sync" in out) == profile.has_fused_sync


def test_profile_command_rejects_an_unknown_profile(capsys):
    from suite.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["profile", "no-such-link"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no-such-link" in err and "h100-nvswitch" in err and err.count("\n") == 1
