"""TP=1 prefill of smollm2-135m: the rank-local model against Hugging Face's own forward.

    pytest tests/bench/test_prefill_vs_hf.py --benchmark-only --benchmark-group-by=group
Both compute full logits for the same batch (4 prompts x 128 tokens) in float32 on the CPU.
"""

import pytest
import torch

from suite.comm import Communicator
from suite.generate import load_runner
from tests.helpers import hf_model

BATCH, LENGTH = 4, 128


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (BATCH, LENGTH), generator=gen)


@pytest.mark.parametrize("impl", ["spdbench", "huggingface"])
def test_prefill(benchmark, prompts, impl):
    if impl == "spdbench":
        runner = load_runner(Communicator(), torch.device("cpu"), "smollm2-135m", "baseline")
        batch = prompts.tolist()
        run = lambda: runner.logits(batch)  # noqa: E731
    else:
        hf = hf_model("smollm2-135m")
        run = lambda: hf(prompts).logits  # noqa: E731
    benchmark.group = "prefill smollm2-135m tp=1"
    benchmark.extra_info.update(batch=BATCH, prompt_len=LENGTH, impl=impl)
    with torch.inference_mode():
        benchmark.pedantic(run, rounds=10, warmup_rounds=2)
