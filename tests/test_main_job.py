"""``spdbench run``: the main job runs end to end, a second run adds no rows, its output is clean, every
row names its own command; the simulated step asks for the cells the question is about."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from suite.cli import build_parser
from suite.cli.main_job import LARGE_TP, STRATEGIES, steps_of
from suite.latency.bench import check_settings, load_config
from suite.results import ResultStore
from tests.helpers import require_data

REPO = Path(__file__).resolve().parents[1]
# A reduced main job: a tiny random model, N = 1 and 2, two documents of one task, no simulation.
REDUCED = [
    "--model",
    "random:tiny",
    "--tp",
    "1",
    "2",
    "--tasks",
    "piqa",
    "--limit",
    "2",
    "--samples",
    "1",
    "--seq-len",
    "16",
    "--simulate",
    "none",
    "--large-model",
    "none",
]


def run_job(out: Path) -> subprocess.CompletedProcess:
    """The command as a user runs it: its own process, ranks and all, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "suite.cli", "run", *REDUCED, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def rows_per_file(out: Path) -> dict[str, list[dict]]:
    return {p.name: ResultStore(p).all_rows() for p in sorted(out.glob("*.jsonl"))}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    require_data()
    out = tmp_path_factory.mktemp("run")
    first = run_job(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    after_first = rows_per_file(out)
    second = run_job(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, first, after_first, second


def test_second_run_adds_no_rows(two_runs):
    out, _, after_first, second = two_runs
    assert set(after_first) == {"accuracy.jsonl", "bench.jsonl", "perplexity.jsonl", "spd.jsonl"}
    # 8 strategies' latency cells (the composites too) at the largest N (2); at N=2 (the N with communication)
    # 6 usable strategies x (acc, acc_norm) of piqa and their perplexity; 2 blocks' sensitivity at
    # N=2, its stability at two budgets, and the zero-shot perplexity sweep at 0/25/50/75/100% of the blocks
    assert {name: len(rows) for name, rows in after_first.items()} == {
        "bench.jsonl": 8,
        "accuracy.jsonl": 12,
        "perplexity.jsonl": 6,
        "spd.jsonl": 9,
    }
    assert (
        sorted(r["kind"] for r in after_first["spd.jsonl"])
        == ["spd_ppl"] * 5 + ["spd_sensitivity"] * 2 + ["spd_stability"] * 2
    )
    assert sorted(r["budget_pct"] for r in after_first["spd.jsonl"] if r["kind"] == "spd_ppl") == [0, 25, 50, 75, 100]
    assert rows_per_file(out) == after_first
    assert "8 of 8 cells already finished" in second.stderr


def test_every_row_names_the_step_that_wrote_it(two_runs):
    out, _, after_first, _ = two_runs
    commands = {name: {r["command"] for r in rows} for name, rows in after_first.items()}
    assert commands["bench.jsonl"] == {f"spdbench bench --config {out}/measured.yaml --out {out}"}
    assert commands["spd.jsonl"] == {
        f"spdbench spd sensitivity --model random:tiny --tp 2 --samples 1 --seq-len 16 "
        f"--out {out}/spd/sensitivity-tp2.json --results {out}/spd.jsonl",
        f"spdbench spd sweep --model random:tiny --tp 2 --sensitivity {out}/spd/sensitivity-tp2.json --metric ppl "
        f"--variants zs --budgets 0,25,50,75,100 --eval-samples 16 --eval-seq-len 128 --out {out}/spd/sweep-tp2 "
        f"--results {out}/spd.jsonl",
    }
    assert commands["perplexity.jsonl"] == {
        f"spdbench spd ppl --model random:tiny --tp 2 --strategy baseline --strategy spd:plan={out}/spd/plan-tp2.json "
        f"--strategy spd+ladder:plan={out}/spd/plan-tp2.json --strategy spd+tokenweave:plan={out}/spd/plan-tp2.json "
        f"--strategy ladder --strategy tokenweave --samples 16 --seq-len 128 --out {out}/perplexity.jsonl"
    }
    # one launch scored the 6 strategies; each row names the single-strategy command that reproduces it
    plan = f"{out}/spd/plan-tp2.json"
    assert commands["accuracy.jsonl"] == {
        f"spdbench eval --model random:tiny --tp 2 --strategy {name}{options} --tasks piqa --limit 2 "
        f"--dtype float32 --device cpu --out {out}/accuracy.jsonl"
        for name, options in [
            ("baseline", ""),
            ("spd", f" --strategy-opt plan={plan}"),
            ("spd+ladder", f" --strategy-opt plan={plan}"),
            ("spd+tokenweave", f" --strategy-opt plan={plan}"),
            ("ladder", ""),
            ("tokenweave", ""),
        ]
    }
    identities = {json.dumps(r["model_identity"], sort_keys=True) for rows in after_first.values() for r in rows}
    assert {json.loads(i)["variant"] for i in identities} == {"random weights, real shape"}


def test_output_holds_no_warnings_and_names_every_step(two_runs):
    _, first, _, second = two_runs
    for run in (first, second):
        text = run.stdout + run.stderr
        assert "warning" not in text.lower() and "warn(" not in text, text[-3000:]
        assert [line.split("]")[0] for line in run.stdout.splitlines() if line.startswith("[")] == [
            f"[{i}/7" for i in range(1, 8) for _ in range(2)
        ]  # each step: its command, then its time
        assert "seconds per step: 1 spd sensitivity " in run.stdout
    assert "note: ladder changes the model" in first.stdout
    assert "nocomm is a latency bound" not in first.stdout  # a bound is timed, never scored


def test_report_of_the_job_has_the_caveated_cpu_check(two_runs):
    out, _, _, _ = two_runs
    html = (out / "report.html").read_text()
    assert "Not a comparison: ranks share the CPU&#39;s cores; this does not rank strategies." in html
    assert "No simulated latency rows in the results. To fill: <code>spdbench run</code>" in html
    assert "tiny (random weights, real shape): seeded random tensors (no trained weights)" in html


def _spec(text: str) -> tuple[str, tuple[str, ...]]:
    """``NAME:K=V,...`` -> (NAME, ("K=V", ...))."""
    name, _, options = text.partition(":")
    return name, tuple(o for o in options.split(",") if o)


def test_simulated_step_asks_for_the_same_strategies_and_plans(tmp_path):
    args = build_parser().parse_args(["run", "--out", str(tmp_path)])
    steps = steps_of(args)
    simulated = next(s for s in steps if s[0] == "bench" and s[2].endswith("simulated.yaml"))
    matrix = yaml.safe_load(Path(simulated[2]).read_text())
    assert (matrix["mode"], matrix["device_profile"], matrix["interconnect"]) == (
        "simulated",
        "h100-sxm",
        "h100-nvswitch",
    )
    cells = load_config(simulated[2])
    assert all(check_settings(c) is None for c in cells)  # valid cells of the bench matrix
    plans = [s[s.index("--out") + 1] for s in steps if s[:2] == ["spd", "plan"]]
    assert plans == [f"{tmp_path}/spd/plan-tp2.json", f"{tmp_path}/spd/plan-tp4.json"]
    evals = [s for s in steps if s[0] == "eval"]
    assert [s[s.index("--tp") + 1] for s in evals] == ["2", "4"]  # one launch per N
    evals = {(s[s.index("--tp") + 1], *_spec(s[i + 1])) for s in evals for i, w in enumerate(s) if w == "--strategy"}
    small = [c for c in cells if c.model == "smollm2-135m"]
    assert {(c.tp, c.strategy) for c in small} == {(n, s) for n in (1, 2, 4) for s in STRATEGIES}
    for c in small:  # every usable strategy's accuracy is measured with the options it is simulated with (N > 1)
        # seqpar computes what tokenweave does; nocomm is no model; the exact baseline's accuracy does not
        # depend on N: it runs at the first N > 1 only
        if c.strategy not in ("seqpar", "nocomm") and c.tp > 1 and (c.strategy != "baseline" or c.tp == 2):
            options = tuple(f"{k}={v}" for k, v in c.strategy_options.items())
            assert (str(c.tp), c.strategy, options) in evals
    for name in ("spd", "spd+ladder", "spd+tokenweave"):  # the composites run the same plans
        assert {(c.tp, c.strategy_options.get("plan")) for c in small if c.strategy == name} == {
            (1, None),
            (2, plans[0]),
            (4, plans[1]),
        }  # at N = 1 SPD is the baseline: blocks=all
    large = [c for c in cells if c.model == "random:llama3-70b"]
    assert sorted({c.tp for c in large}) == LARGE_TP
    # SPD on the same share (50%) of Llama-3-70B's 80 blocks
    assert {(c.strategy, c.strategy_options.get("blocks")) for c in large if c.strategy.startswith("spd")} == {
        ("spd", "last:40"),
        ("spd+ladder", "last:40"),
        ("spd+tokenweave", "last:40"),
    }
    assert {(c.batch, c.prompt_len, c.new_tokens, c.decode_mode) for c in cells} == {
        (1, 1024, 512, "cuda_graph"),
        (16, 1024, 512, "cuda_graph"),
    }
