"""The ``compiled`` kernel mode against the single-process Hugging Face model: merged GEMMs, Inductor regions and
attention over the filled cache give Hugging Face's greedy tokens for every exact strategy at N = 1, 2, 4, and
the strategies that change the model give what they give in eager mode.

Compiling is slow on a small CPU: one launch per N, one small model, every strategy on the same compiled ranks.
"""

from __future__ import annotations

import pytest
import torch

from suite.cli import main
from suite.latency.bench import check_settings, expand
from suite.parallel.launch import launch
from suite.parallel.runner import KV_BOUND_MIN, decode_kv_len
from tests.helpers import hf_greedy

MODEL = "random:tiny"  # GQA: 4 query heads on 2 KV heads
PROMPTS = [[5, 17, 42, 99, 3, 8, 200, 31, 7], [64, 12, 250], [1, 2, 3, 4, 5]]  # left padding: masked attention
NEW_TOKENS = 24  # the cache of 33 slots is read through decode bounds 16, 32 and 33
# split_multiple=2 cuts the prefill inside a row and every decode step (3 tokens -> 2 + 1) between rows
EXACT = {"baseline": {}, "seqpar": {}, "tokenweave": {"split_min_tokens": "0", "split_multiple": "2"}}
UNEVEN, UNEVEN_TP = "random:tiny-uneven", 2  # 9 heads on 2 ranks: 5 + 4, each rank reading KV groups unevenly
OTHERS = {  # the strategies that change the model: compiled runs them as eager does (checked at N = UNEVEN_TP)
    "spd": {"blocks": "last:1"},
    "ladder": {},
    "nocomm": {},
    "spd+ladder": {"blocks": "last:1"},
    "spd+tokenweave": {"blocks": "last:1", "split_min_tokens": "0", "split_multiple": "2"},
}
# float32 with Inductor's reordered reductions: logits within 1e-4 of the largest logit, as eager's tests
TOLERANCE = 1e-4


def _job(comm, device):
    from suite.model.sources import resolve
    from suite.parallel.runner import Runner, load_runner
    from suite.parallel.strategy import bound_strategy, make_strategy

    eager = load_runner(comm, device, MODEL, "baseline").generate(PROMPTS, NEW_TOKENS, keep_logits=True)
    model = load_runner(comm, device, MODEL, "baseline", kernels="compiled").model
    out = {"eager": (eager.tokens, eager.prefill_logits, eager.step_logits)}
    for name, options in EXACT.items():
        gen = Runner(model, make_strategy(name, options), comm).generate(PROMPTS, NEW_TOKENS, keep_logits=True)
        out[name] = gen.tokens, gen.prefill_logits, gen.step_logits
    if comm.world == UNEVEN_TP:
        gen = load_runner(comm, device, UNEVEN, "baseline", kernels="compiled").generate(PROMPTS, NEW_TOKENS)
        out["uneven"] = gen.tokens, gen.prefill_logits
        eager_model = load_runner(comm, device, MODEL, "baseline").model
        for name, options in OTHERS.items():
            strategy = bound_strategy(name, options, resolve(MODEL), comm.world)
            for kernels, rank_model in (("eager", eager_model), ("compiled", model)):
                gen = Runner(rank_model, strategy, comm).generate(PROMPTS, 4, keep_logits=True)
                out[name, kernels] = gen.tokens, gen.prefill_logits, gen.step_logits
    return out


@pytest.fixture(scope="module", params=[1, 2, 4])
def tp_run(request):
    return request.param, launch(_job, request.param)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return (ours - ref).abs().max().item() <= TOLERANCE * ref.abs().max().item()


@pytest.mark.parametrize("name", list(EXACT))
def test_compiled_equals_hugging_face(tp_run, name):
    tp, out = tp_run
    tokens, prefill, steps = out[name]
    for b, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = hf_greedy(MODEL, prompt, NEW_TOKENS)
        assert tokens[b] == ref_tokens, f"{name} tp={tp} prompt {b}: greedy tokens differ from Hugging Face"
        assert _close(prefill[b], ref_logits), f"{name} tp={tp} prompt {b}: prefill logits differ"
    _, _, eager_steps = out["eager"]
    for i, (ours, ref) in enumerate(zip(steps, eager_steps)):  # decode over the bound, eager over the whole cache
        assert _close(ours, ref), f"{name} tp={tp} decode step {i}"


@pytest.mark.parametrize("name", list(OTHERS))
def test_strategies_that_change_the_model_run_compiled_as_eager(tp_run, name):
    tp, out = tp_run
    if tp != UNEVEN_TP:
        pytest.skip(f"checked at tp={UNEVEN_TP}")
    (eager_tokens, eager_prefill, eager_steps), (tokens, prefill, steps) = out[name, "eager"], out[name, "compiled"]
    assert tokens == eager_tokens, f"{name}: compiled greedy tokens differ from eager"
    assert all(_close(ours, ref) for ours, ref in zip(prefill, eager_prefill)), f"{name}: prefill logits"
    assert all(_close(ours, ref) for ours, ref in zip(steps, eager_steps)), f"{name}: decode logits"


def test_uneven_heads_compiled_equal_hugging_face(tp_run):
    tp, out = tp_run
    if tp != UNEVEN_TP:
        pytest.skip(f"uneven heads are checked at tp={UNEVEN_TP}")
    tokens, prefill = out["uneven"]
    for b, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = hf_greedy(UNEVEN, prompt, NEW_TOKENS)
        assert tokens[b] == ref_tokens and _close(prefill[b], ref_logits), f"prompt {b}"


def test_decode_reads_a_power_of_two_bound_of_the_filled_cache():
    assert [decode_kv_len(f, 40, "compiled") for f in (1, 16, 17, 32, 33, 40)] == [16, 16, 32, 32, 40, 40]
    assert decode_kv_len(3, 4096, "compiled") == KV_BOUND_MIN
    assert decode_kv_len(1000, 4096, "compiled") == 1024
    assert decode_kv_len(5, 4096, "eager") == 4096  # eager attends over the whole cache, as before


def test_merged_projections_compute_the_same_and_keep_the_weights():
    from suite.model.llama import MLP, Attention

    torch.manual_seed(0)
    config = type("C", (), {"hidden_size": 32, "num_attention_heads": 4, "head_dim": 8})()
    attn, mlp = Attention(config, [0, 0, 1, 1], 2).eval(), MLP(32, 48).eval()
    x, cos, sin = torch.randn(6, 32), torch.randn(6, 8), torch.randn(6, 8)
    before = [t.clone() for t in attn._project(x, cos, sin)], mlp(x).clone()
    weights = {k: v.clone() for k, v in (attn.state_dict() | mlp.state_dict()).items()}
    attn.merge_projections()
    mlp.merge_projections()
    assert attn.qkv_proj.weight.shape == (4 * 8 + 2 * 2 * 8, 32) and mlp.gate_up_proj.weight.shape == (96, 32)
    assert attn.q_proj.weight.data_ptr() == attn.qkv_proj.weight.data_ptr()  # views: the values exist once
    for name, value in weights.items():
        assert torch.equal((attn.state_dict() | mlp.state_dict())[name], value), name
    for ours, ref in zip(attn._project(x, cos, sin), before[0]):
        assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(mlp(x), before[1], atol=1e-6)


def test_kernels_is_a_matrix_axis_with_a_device_default():
    cells = expand({"model": "random:tiny", "device": ["cpu", "cuda"]})
    assert [(c.device, c.kernels) for c in cells] == [("cpu", "eager"), ("cuda", "compiled")]
    both = expand({"model": "random:tiny", "kernels": ["eager", "compiled"]})
    assert [c.kernels for c in both] == ["eager", "compiled"] and both[0].cell_id != both[1].cell_id
    (bad,) = expand({"model": "random:tiny", "kernels": "fused"})
    assert check_settings(bad) == "kernels='fused': choose one of eager, compiled"
    simulated = expand(
        {"model": "random:tiny", "kernels": "vllm", "mode": "simulated", "interconnect": "x", "device_profile": "y"}
    )
    assert check_settings(simulated[0]) is None  # regimes of the simulation are the simulation's to check


def test_cli_rejects_an_unknown_kernel_mode(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", "--kernels", "fused"])
    assert exc.value.code == 2 and "--kernels" in capsys.readouterr().err


def test_compiled_mode_makes_each_residual_add_and_its_norm_one_region():
    from suite.parallel.comm import Communicator
    from suite.parallel.runner import load_runner

    def compiled(f) -> bool:
        return hasattr(f, "_torchdynamo_orig_callable")

    eager = load_runner(Communicator(), torch.device("cpu"), MODEL, "baseline").model
    model = load_runner(Communicator(), torch.device("cpu"), MODEL, "baseline", kernels="compiled").model
    for ours, plain in zip(model.layers, eager.layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            assert compiled(getattr(ours, name).add_forward) and not compiled(getattr(plain, name).add_forward)
