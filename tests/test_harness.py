"""The harness against the single-process Hugging Face model: exact TP, KV cache, failures, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from suite.errors import RankError
from suite.parallel.launch import launch
from tests.helpers import hf_greedy, source

NEW_TOKENS = 32
TEXTS = [
    "The capital of France is",
    "Tensor parallelism splits every layer of a transformer across",
    "Once upon a time",
]
TINY_PROMPTS = [[5, 17, 42, 99, 3, 8, 200, 31, 7], [64, 12, 250], [1, 2, 3, 4, 5]]
MODELS = {"smollm2-135m": None, "random:tiny-uneven": TINY_PROMPTS, "random:tiny-mqa": TINY_PROMPTS}


def prompts_for(model: str) -> list[list[int]]:
    return MODELS[model] or [source(model).tokenizer().encode(t) for t in TEXTS]


def _exactness_job(comm, device, jobs):
    """Baseline generation for each model; for the first one also a full recompute of the result."""
    from suite.parallel.runner import load_runner

    out = {}
    for model, prompts in jobs:
        runner = load_runner(comm, device, model, "baseline")
        gen = runner.generate(prompts, NEW_TOKENS, keep_logits=True)
        full = runner.logits([p + g[:-1] for p, g in zip(prompts, gen.tokens)]).float()
        out[model] = (gen.tokens, gen.prefill_logits, gen.step_logits, full)
    return out


@pytest.fixture(scope="module", params=[1, 2, 3, 4, 8])
def tp_run(request):
    tp = request.param
    jobs = [(m, prompts_for(m)) for m in MODELS if tp <= source(m).config.num_attention_heads]
    return tp, launch(_exactness_job, tp, jobs)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("model", list(MODELS))
def test_baseline_equals_hugging_face(tp_run, model):
    tp, results = tp_run
    if model not in results:
        pytest.skip(f"{model} has fewer heads than tp={tp}")
    tokens, prefill_logits, _, _ = results[model]
    for b, prompt in enumerate(prompts_for(model)):
        ref_tokens, ref_logits = hf_greedy(model, prompt, NEW_TOKENS)
        assert tokens[b] == ref_tokens, f"tp={tp} prompt {b}: greedy tokens differ from Hugging Face"
        assert _close(prefill_logits[b], ref_logits), f"tp={tp} prompt {b}: logits differ"


def test_kv_cache_decode_equals_full_recompute(tp_run):
    tp, results = tp_run
    for model, (tokens, prefill_logits, step_logits, full) in results.items():
        for b, prompt in enumerate(prompts_for(model)):
            # left padding: row b's last prompt token sits at column width-1 of the recompute batch
            width = full.shape[1] - (NEW_TOKENS - 1)
            assert _close(prefill_logits[b], full[b, width - 1])
            for i, logits in enumerate(step_logits):
                assert _close(logits[b], full[b, width + i]), f"{model} tp={tp} step {i}"


def _failing_job(comm, device, fail_rank):
    from suite.parallel.runner import load_runner

    runner = load_runner(comm, device, "random:tiny", "baseline")
    layers = runner.model.layers
    if comm.rank == fail_rank:  # raise inside the second block's attention, after one all-reduce

        def boom(*args):
            raise RuntimeError("injected failure")

        layers[1].self_attn.forward = boom
    return runner.generate([[1, 2, 3]], 4).tokens


@pytest.mark.parametrize("tp,fail_rank", [(2, 1), (4, 2)])
def test_failing_rank_ends_the_run_and_is_named(tp, fail_rank):
    start = time.monotonic()
    with pytest.raises(RankError, match=f"rank {fail_rank} failed: RuntimeError: injected failure"):
        launch(_failing_job, tp, fail_rank, timeout_s=600)
    assert time.monotonic() - start < 60


def _dying_job(comm, device):
    import os

    if comm.rank == 1:
        os._exit(3)
    import torch.distributed as dist

    dist.barrier()


def test_rank_that_dies_without_a_word_is_named():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed: process exited with code 3"):
        launch(_dying_job, 2, timeout_s=600)
    assert time.monotonic() - start < 60


def spdbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "suite.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_on_two_ranks():
    run = spdbench(
        "generate",
        "--model",
        "random:tiny-uneven",
        "--tp",
        "2",
        "--prompt",
        "hello",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert {"token_ids", "text", "prefill_ms", "decode_ms_per_token", "tp", "strategy", "model"} <= set(result)
    assert [len(t) for t in result["token_ids"]] == [5, 5] and result["tp"] == 2
    ref, _ = hf_greedy("random:tiny-uneven", list(b"hello"), 5)
    assert result["token_ids"][0] == ref


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "nonsense"], "unknown model"),
        (["--model", "random:llama9-1b"], "unknown preset"),
        (["--strategy", "nope"], "unknown strategy"),
        (["--tp", "0"], "tp 0 is invalid"),
        (["--tp", "16", "--model", "random:tiny"], "tp 16 is invalid"),
        (["--strategy-opt", "novalue"], "KEY=VALUE"),
        (["--strategy-opt", "x=1"], "no option 'x'"),
        (["--max-new-tokens", "0"], "max_new_tokens 0 is invalid"),
        (["--dtype", "float8"], "--dtype"),
        (["--device", "cuda"], "cuda"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    from suite.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "x", "--model", "random:tiny", *args])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], stderr
