"""The report's comparison of each composite with its parts at the same plan.

Every row here is invented test input; every expectation is worked out by hand in the comments."""

from __future__ import annotations

import re

import pytest

from reports import frames, render
from suite.results import LatencyScenario, Row


def _latency(
    strategy: str,
    options: dict,
    prefill: float,
    decode: float,
    e2e: float,
    link: str = "h100-nvswitch",
    provenance: str = "simulated",
    spread: float = 0.0,
) -> dict:
    cell = LatencyScenario(
        model="random:llama3-70b",
        strategy=strategy,
        strategy_options=options,
        tp=2,
        batch=1,
        prompt_len=1024,
        new_tokens=512,
        dtype="float16",
        device="cuda",
        decode_mode="cuda_graph",
        mode=provenance,
        interconnect=link,
        device_profile="h100-sxm",
    )
    values = {
        "prefill_ms_median": prefill,
        "prefill_ms_p10": prefill - spread,
        "prefill_ms_p90": prefill + spread,
        "decode_ms_per_token_median": decode,
        "decode_ms_per_token_p10": decode,
        "decode_ms_per_token_p90": decode,
        "e2e_ms_median": e2e,
    }
    return Row(scenario=cell, provenance=provenance, values=values, command="c").to_json()


ALL, LAST, SPLIT = {"blocks": "all"}, {"blocks": "last:1"}, {"split_min_tokens": 0}


def rows() -> list[dict]:
    nvswitch = [
        _latency("baseline", {}, 100, 1.0, 200),
        _latency("spd", ALL, 90, 0.8, 180),
        _latency("spd", LAST, 95, 0.9, 195),
        _latency("ladder", {}, 80, 0.9, 170),
        _latency("tokenweave", {}, 10, 0.1, 20),  # not the part of spd+tokenweave split_min_tokens=0
        _latency("tokenweave", SPLIT, 88, 1.0, 200),
        _latency("spd+ladder", ALL, 85, 0.7, 175),  # vs ladder: prefill 85/80, e2e 175/170
        _latency("spd+ladder", LAST, 94, 0.85, 190),  # vs ladder: prefill 94/80, e2e 190/170
        _latency("spd+tokenweave", ALL | SPLIT, 88, 0.81, 179.2),
    ]  # vs spd all: decode 0.81/0.8
    pcie = [
        _latency("spd", ALL, 90, 0.8, 180, "pcie-nop2p"),
        _latency("ladder", {}, 80, 0.9, 170, "pcie-nop2p"),
        _latency("spd+ladder", ALL, 70, 0.7, 150, "pcie-nop2p"),
    ]  # faster than both parts in every step
    measured = [
        _latency("spd", ALL, 90, 0.8, 180, "nvlink", "measured", spread=2),
        _latency("ladder", {}, 80, 0.9, 170, "nvlink", "measured", spread=2),
        _latency("spd+ladder", ALL, 81, 0.7, 160, "nvlink", "measured", spread=2),
    ]  # 79-83 vs 78-82
    return nvswitch + pcie + measured


@pytest.fixture(scope="module")
def page() -> str:
    return render.render(frames.Results(rows=rows()))


def section(page: str) -> str:
    return page.split('<h2 id="composition">')[1].split("<h2")[0]


def systems(page: str) -> dict[str, str]:
    parts = re.split(r"<h3>(.*?)</h3>", section(page))[1:]
    return {title: body for title, body in zip(parts[::2], parts[1::2])}


def table(body: str) -> list[list[str]]:
    return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in body.split("<tbody>")[1].split("<tr>")[1:]]


def test_each_slower_comparison_is_listed_with_its_figures(page):
    found = systems(page)
    nvswitch = next(body for title, body in found.items() if "h100-sxm + h100-nvswitch" in title)
    # 3 composite rows x 2 parts x 3 steps = 18 comparisons; slower in 2 + 2 + 1
    assert "slower in 5 of 18 comparisons" in nvswitch
    listed = {(r[1], r[2], r[3], r[5]): (r[4], r[6], r[7]) for r in table(nvswitch)}
    assert listed == {
        ("spd+ladder", "blocks=all", "prefill", "ladder"): ("85.00", "80.00", "+6.25%"),  # 85 / 80 = 1.0625
        ("spd+ladder", "blocks=all", "end to end", "ladder"): ("175.00", "170.00", "+2.94%"),  # 175 / 170 = 1.0294
        ("spd+ladder", "blocks=last:1", "prefill", "ladder"): ("94.00", "80.00", "+17.50%"),  # 94 / 80 = 1.175
        ("spd+ladder", "blocks=last:1", "end to end", "ladder"): ("190.00", "170.00", "+11.76%"),  # 190/170
        # its parts: spd blocks=all and tokenweave split_min_tokens=0 (equal prefill 88: not slower)
        ("spd+tokenweave", "blocks=all, split_min_tokens=0", "decode step", "spd (blocks=all)"): (
            "0.81",
            "0.80",
            "+1.25%",
        ),
    }
    assert all(r[0] == "N=2" for r in table(nvswitch))  # batch and the rest are the same for all: in the title


def test_a_system_where_composites_are_never_slower_says_so(page):
    found = systems(page)
    pcie = next(body for title, body in found.items() if "pcie-nop2p" in title)
    assert "Slower in none of 6 comparisons" in pcie  # 1 composite x 2 parts x 3 steps


def test_measured_differences_inside_the_spread_are_marked_as_noise(page):
    found = systems(page)
    measured = next(body for title, body in found.items() if "measured on GPUs" in title)
    # prefill 81 (79-83) against ladder's 80 (78-82): slower by 1.25%, the spreads overlap
    assert [r[7] for r in table(measured)] == ["+1.25% (within the p10-p90 spread)"]


def test_no_composites_no_section():
    page = render.render(frames.Results(rows=[r for r in rows() if "+" not in r["strategy"]]))
    assert 'id="composition"' not in page and 'href="#composition"' not in page
