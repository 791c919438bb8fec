"""The lm-eval model on N real gloo ranks against lm-eval's own Hugging Face model, same weights, same local data."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # absent where only the GPU tests run

from suite.accuracy.lm_eval_model import SpdbenchLM, _RankScorer
from suite.accuracy.tasks import TaskDataError, converted, data_dir, task_configs
from suite.model.sources import embedded_gguf, gguf_to_safetensors
from suite.parallel.strategy import available

pytestmark = pytest.mark.skipif(data_dir() is None, reason="needs the offline data folder (SPDBENCH_DATA)")

# A few documents per task; wikitext document 29 is a short article (270 tokens) that the
# 64-token context cuts into several rolling windows. Multiple-choice contexts are truncated too.
SAMPLES = {"piqa": [0, 1, 2, 3], "arc_easy": [0, 1, 2, 3], "hellaswag": [0, 1], "wikitext": [29]}
MAX_LENGTH = 64
# generate_until: greedy, cut at the stop string (prompts of different lengths share a batch)
GENERATE = [
    SimpleNamespace(args=(prompt, {"until": ["\n\n", "."], "max_gen_toks": 6}))
    for prompt in ("The capital of France is", "Question: What do bees make?\nAnswer:")
]


def _evaluate(lm) -> tuple[dict, dict]:
    """Metrics per task, and the per-request log-likelihoods in document order."""
    tasks, manager = task_configs(list(SAMPLES), data_dir())
    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, samples=SAMPLES, log_samples=True, verbosity="ERROR"
    )
    metrics = {
        task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, float)}
        for task, values in out["results"].items()
    }
    lls = {
        task: [_loglikelihood(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
        for task, samples in out["samples"].items()
    }
    return metrics, lls


def _loglikelihood(response) -> float:
    """(logprob, is_greedy) for a choice, a bare logprob for a rolling window sum."""
    return float(response[0] if isinstance(response, (list, tuple)) else response)


def _ours(tp: int, strategy: str = "baseline") -> tuple[dict, dict, list]:
    lm = SpdbenchLM(model="smollm2-135m", tp=tp, strategy=strategy, max_length=MAX_LENGTH, batch_size=16)
    calls, call = [], lm.pool.call
    lm.pool.call = lambda method, *args: calls.append((method, args)) or call(method, *args)
    try:
        return (*_evaluate(lm), calls, lm.generate_until(GENERATE))
    finally:
        lm.close()


@pytest.fixture(scope="module")
def runs():
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(
        pretrained=str(gguf_to_safetensors(embedded_gguf())),
        device="cpu",
        dtype="float32",
        batch_size=16,
        max_length=MAX_LENGTH,
    )
    results = {"hf": (*_evaluate(hf), None, hf.generate_until(GENERATE)), 1: _ours(1), 4: _ours(4)}
    if "tokenweave" in available():
        results["tokenweave"] = _ours(4, "tokenweave")
    return results


@pytest.mark.parametrize("tp", [1, 4])
def test_scores_equal_lm_eval_huggingface_model(runs, tp):
    hf_metrics, hf_lls, _, hf_texts = runs["hf"]
    metrics, lls, _, texts = runs[tp]
    for task in ("piqa", "arc_easy", "hellaswag"):
        for metric in ("acc", "acc_norm"):
            assert metrics[task][metric] == pytest.approx(hf_metrics[task][metric], abs=0.002), (task, metric)
    assert metrics["wikitext"]["word_perplexity"] == pytest.approx(hf_metrics["wikitext"]["word_perplexity"], rel=0.005)
    for task in SAMPLES:  # stronger than the metrics: every request's log-likelihood
        assert lls[task] == pytest.approx(hf_lls[task], abs=2e-3), task
    assert texts == hf_texts and all(texts)


def test_rolling_windows_respect_max_length(runs):
    _, _, calls, _ = runs[1]
    scored = [item for method, args in calls if method == "score" for item in args[0]]
    assert max(len(tokens) - 1 for tokens, _ in scored) == MAX_LENGTH  # inputs fill, never exceed, the context
    windows = [n for tokens, n in scored if n > 8]  # perplexity windows predict many tokens; choices a few
    assert len(windows) >= 270 // MAX_LENGTH


def test_tokenweave_equals_baseline(runs):
    if "tokenweave" not in runs:
        pytest.skip("the tokenweave strategy is not installed")
    _, baseline_lls, _, texts = runs[4]
    metrics, lls, _, tokenweave_texts = runs["tokenweave"]
    assert tokenweave_texts == texts
    assert metrics == runs[4][0]
    for task in SAMPLES:
        assert lls[task] == pytest.approx(baseline_lls[task], abs=2e-3), task


def test_projecting_communicator_is_refused():
    with pytest.raises(ValueError, match="projecting communicator"):
        _RankScorer(SimpleNamespace(carries_data=False, rank=0, world=1), torch.device("cpu"), "random:tiny", "float32")


# --- the command line -----------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from suite.cli import main

    return main(["eval", *argv])


def test_eval_command_writes_accuracy_rows(tmp_path):
    out = tmp_path / "results.jsonl"
    assert (
        _cli(
            [
                "--model",
                "random:tiny",
                "--tp",
                "2",
                "--tasks",
                "piqa,boolq",
                "--limit",
                "2",
                "--limit",
                "boolq=1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["task"], r["metric"]) for r in rows} == {("piqa", "acc"), ("piqa", "acc_norm"), ("boolq", "acc")}
    for row in rows:
        assert row["kind"] == "accuracy" and row["status"] == "ok" and row["provenance"] == "measured"
        assert (
            row["tp"] == 2
            and row["strategy"] == "baseline"
            and row["usable_model"]
            and row["limit"] == (1 if row["task"] == "boolq" else 2)
        )
        assert 0.0 <= row["value"] <= 1.0 and row["command"].startswith("spdbench eval")
    assert len({r["cell_id"] for r in rows}) == len(rows)


def test_several_strategies_on_one_launch_score_as_each_alone(tmp_path):
    """ladder then baseline on one launch of 2 gloo ranks: the rows equal those of each strategy's own
    launch, and each row's command is that launch."""
    common = ["--model", "random:tiny", "--tp", "2", "--tasks", "piqa", "--limit", "2"]
    together, alone = tmp_path / "together.jsonl", tmp_path / "alone.jsonl"
    assert _cli([*common, "--strategy", "ladder:layers=last:1", "--strategy", "baseline", "--out", str(together)]) == 0
    rows = [json.loads(line) for line in together.read_text().splitlines()]
    commands = {r["command"] for r in rows}
    assert len(rows) == 4 and len(commands) == 2
    for command in commands:  # each row's own command, run alone into another file
        argv = shlex.split(command)[2:]
        assert _cli([*argv[: argv.index("--out")], "--out", str(alone)]) == 0
    by_cell = {r["cell_id"]: r for r in map(json.loads, alone.read_text().splitlines())}
    assert sorted(by_cell) == sorted(r["cell_id"] for r in rows)
    for row in rows:
        assert row["value"] == by_cell[row["cell_id"]]["value"] and row["stderr"] == by_cell[row["cell_id"]]["stderr"]
    assert {(r["strategy"], json.dumps(r["strategy_options"])) for r in rows} == {
        ("ladder", '{"layers": "last:1"}'),
        ("baseline", "{}"),
    }
    assert _cli([*common, "--strategy", "baseline", "--strategy", "ladder:layers=last:1", "--out", str(together)]) == 0
    assert len(together.read_text().splitlines()) == 4  # resumed: nothing left to run, no row added


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--tasks", "piqa", "--strategy", "baseline", "--strategy", "ladder", "--strategy-opt", "layers=last:1"],
            "strategy_opt and spd_plan apply to a single --strategy",
        ),
        (["--tasks", "piqa", "--strategy", "nope"], "unknown strategy 'nope'"),
        (["--tasks", "piqa,nope"], "unknown task 'nope'"),
        (["--tasks", "piqa", "--data-dir", "/nonexistent/data"], "data_dir /nonexistent/data: no such data folder"),
        (["--tasks", "piqa", "--limit", "0"], "limit 0 is invalid"),
        (["--tasks", "piqa", "--limit", "boolq=3"], "limit boolq=3: task 'boolq' is not in tasks"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument(tmp_path, capsys, argv, message):
    out = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as exit_:
        _cli(["--model", "random:tiny", *argv, "--out", str(out)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_malformed_data_file_is_named_and_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "a", "sol1": "b", "sol2": "c"}\n{"goal": oops}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(TaskDataError, match=r"piqa/valid\.jsonl:2 is not a JSON row"):
        converted("piqa", tmp_path)
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "a", "sol1": "b", "sol2": "c"}\n' * 2)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(TaskDataError, match=r"valid-labels\.lst: expected 2 labels"):
        converted("piqa", tmp_path)
    assert not list((tmp_path / "cache").rglob("*.jsonl*"))


def test_local_documents_have_the_hub_fields():
    docs = {
        t: json.loads(converted(t, data_dir()).read_text().splitlines()[0])
        for t in ("hellaswag", "arc_challenge", "winogrande", "boolq", "lambada_openai")
    }
    assert docs["hellaswag"]["activity_label"] == "Roof shingle removal" and docs["hellaswag"]["label"] == "3"
    assert len(docs["hellaswag"]["endings"]) == 4
    assert set(docs["arc_challenge"]["choices"]) == {"text", "label"} and isinstance(
        docs["arc_challenge"]["question"], str
    )
    assert docs["winogrande"]["answer"] in ("1", "2") and "_" in docs["winogrande"]["sentence"]
    assert docs["boolq"]["label"] in (0, 1)
    assert converted("wikitext", data_dir()).read_text().count("\n") == 62  # articles of the test split


def test_include_dir_gives_lm_eval_cli_its_own_tasks_on_local_data():
    from lm_eval.tasks._yaml_loader import load_yaml

    from suite.accuracy.tasks import include_dir

    config = load_yaml(include_dir(data_dir()) / "arc_challenge.yaml", resolve_func=False)
    assert config["task"] == "arc_challenge" and config["dataset_path"] == "json"
    assert config["doc_to_choice"] == "{{choices.text}}"  # lm-eval's own prompt, through its include chain
    (data_file,) = config["dataset_kwargs"]["data_files"].values()
    assert data_file == str(converted("arc_challenge", data_dir()))
