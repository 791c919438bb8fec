"""``spdbench atlas``: a small simulated atlas, its best-method cells checked against its rows by hand."""

from __future__ import annotations

import html as html_lib
import json
import re

import yaml

from reports import atlas
from suite import cli

PHASES = {
    "e2e": "e2e_ms_median",
    "prefill": "prefill_ms_median",
    "decode": "decode_ms_per_token_median",
    "e2e_exact": "e2e_ms_median",
}


def test_small_atlas_names_the_fastest_usable_method_per_cell(tmp_path):
    assert (
        cli.main(
            [
                "atlas",
                "--out",
                str(tmp_path),
                "--models",
                "random:tiny",
                "--systems",
                "h100-nvswitch",
                "a100-pcie-nop2p",
                "--tp",
                "2",
                "--batch",
                "1",
                "--strategies",
                "baseline",
                "ladder",
                "tokenweave",
                "nocomm",
                "--set",
                "prompt_len=64",
                "--set",
                "new_tokens=8",
            ]
        )
        == 0
    )
    matrix = yaml.safe_load((tmp_path / "atlas.yaml").read_text())
    assert (matrix["prompt_len"], matrix["new_tokens"], matrix["mode"]) == (64, 8, "simulated")  # passed through
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    page = (tmp_path / "atlas.html").read_text()
    table = page.split("<h2>Every cell</h2>")[1]
    cells = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]:
        tds = [html_lib.unescape(t) for t in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
        model, batch, system, tp, *rest = tds
        cells[system] = rest
    assert set(cells) == {"h100-sxm + h100-nvswitch", "a100-sxm-80gb + pcie-nop2p"}
    for system, shown in cells.items():
        mine = [r for r in rows if f"{r['device_profile']} + {r['interconnect']}" == system]
        base = next(r for r in mine if r["strategy"] == "baseline")
        expected = []
        for phase, column in PHASES.items():
            # by hand: the largest t_baseline / t among the usable methods (nocomm is not one; of the exact ones,
            # tokenweave alone), else the baseline
            speedups = {
                r["strategy"]: base[column] / r[column]
                for r in mine
                if r["strategy"] in (("tokenweave",) if phase == "e2e_exact" else ("ladder", "tokenweave"))
            }
            name = max(speedups, key=speedups.get)
            expected += [name, f"{speedups[name]:.2f}x"] if speedups[name] > 1 else ["baseline", "1.00x"]
        assert shown == expected, system
    assert "nocomm" not in table
    assert page.count("data:image/png;base64,") == 1  # one heatmap: one model, one batch


def test_atlas_matrix_covers_the_systems_and_passes_bench_keys_through():
    m = atlas.matrix(
        {"random:llama3-70b": 80},
        ["h100-nvswitch", "h100-ib-2node"],
        None,
        [1, 16],
        ["baseline", "spd", "spd+ladder"],
        {"kernels": "compiled"},
    )
    assert m["kernels"] == "compiled" and m["batch"] == [1, 16]
    assert [(s["interconnect"], s["tp"]) for s in m["matrices"]] == [("h100-nvswitch", [2, 4, 8]), ("ib-2node", [16])]
    multimem = atlas.matrix({"random:llama3-8b": 32}, ["h100-multimem"], None, [1], ["baseline"], {})
    assert multimem["matrices"][0]["tp"] == [2, 4, 8]  # its profile models NVLS at N = 2, 4 and 8
    assert m["matrices"][0]["strategies"] == [
        "baseline",
        {"name": "spd", "options": {"blocks": "last:40"}},
        {"name": "spd+ladder", "options": {"blocks": "last:40"}},
    ]


def test_bad_system_is_one_line_and_exit_2(capsys):
    try:
        code = cli.main(["atlas", "--systems", "h100-nvlink-typo"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert "system 'h100-nvlink-typo' is unknown" in capsys.readouterr().err
