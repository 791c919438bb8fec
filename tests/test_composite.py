"""Composed strategies on real gloo ranks: ``spd+tokenweave`` equals ``spd`` (greedy tokens and logits,
N = 1, 2, 4); ``spd+ladder`` equals a single-process reference of the composed equations written
from them (random:tiny and smollm2-135m, N = 2, 4); the single strategies are the special cases."""

from __future__ import annotations

import pytest
import torch

from suite.parallel.launch import launch
from suite.parallel.strategy import make_strategy
from tests.helpers import hf_model
from tests.test_spd import _rms, megatron_split, reference_partials

NEW_TOKENS = 6
# split_multiple=2 cuts the prefill inside a row and every decode step between rows
TOKENWEAVE = {"split_min_tokens": "0", "split_multiple": "2"}
# per model: SPD blocks (dropped and kept blocks side by side), prompts of different lengths (padded) for
# generation, and prompts of one length for the logits the reference computes
CASES = {
    "random:tiny": (
        "1",
        [[5, 17, 99, 3, 42, 7, 250], [1, 2, 3, 4], [9, 8, 7, 6, 5]],
        [[5, 17, 99, 3, 42, 7, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]],
    ),
    "smollm2-135m": (
        "2,3,7,20,28,29",
        [[504, 3575, 282, 4649, 314], [19556, 28, 253, 1534], [12, 200, 3000]],
        [[504, 3575, 282, 4649, 314, 1077, 29], [19556, 28, 253, 1534, 33, 1010, 88]],
    ),
}


def _job(comm, device, model, blocks, prompts, equal):
    """Rank 0's generations and logits of spd and its composites (one rank model: zero-shot blocks)."""
    from suite.parallel.runner import Runner, load_runner
    from suite.parallel.strategy import bound_strategy
    from tests.helpers import source

    rank_model = load_runner(comm, device, model, "baseline").model
    spd = {"blocks": blocks}
    configs = {
        "spd": ("spd", spd),
        "spd+tokenweave": ("spd+tokenweave", spd | TOKENWEAVE),
        "spd+ladder": ("spd+ladder", spd),
    }
    if model == "random:tiny":  # the separate collectives and the empty ladder set on the small model only
        configs |= {
            "spd+tokenweave unfused": ("spd+tokenweave", spd | TOKENWEAVE | {"fused": "false"}),
            "spd+ladder no ladder": ("spd+ladder", spd | {"layers": ""}),
        }
    out = {}
    for key, (name, options) in configs.items():
        runner = Runner(rank_model, bound_strategy(name, options, source(model), comm.world), comm)
        gen = runner.generate(prompts, NEW_TOKENS) if "ladder" not in key else None
        # numpy pickles by value (torch tensors would travel as shared memory of an exiting process)
        out[key] = (
            (gen.tokens, gen.prefill_logits.float().numpy()) if gen else None,
            runner.logits(equal).float().numpy(),
        )
    return out


RUNS = [(m, tp) for m in CASES for tp in (1, 2, 4) if m == "smollm2-135m" or tp > 1]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{m}-tp{tp}" for m, tp in RUNS])
def composite_run(request):
    model, tp = request.param
    blocks, prompts, equal = CASES[model]
    out = launch(_job, tp, model, blocks, prompts, equal)
    return (
        model,
        tp,
        {
            k: (*((gen[0], torch.from_numpy(gen[1])) if gen else (None, None)), torch.from_numpy(logits))
            for k, (gen, logits) in out.items()
        },
    )


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@torch.no_grad()
def composed_reference(model: str, prompts, tp: int, drop: set[int]) -> torch.Tensor:
    """Logits of SPD on ``drop`` with ladder's deferral on every module, from the equations: the stack is
    modules u_1..u_M (an SPD block one: sum_i Y_i + Z_i(X + Y_i); others two: sum_i Y_i, then sum_i Z_i),
    and x_k = x_{k-1} + u_k(x_{k-2}), x_{-1} = x_0 (the first two modules both read the embeddings)."""
    hf = hf_model(model)
    c, state = hf.config, hf.state_dict()
    ids = torch.tensor(prompts)
    x = state["model.embed_tokens.weight"][ids]
    cos, sin = hf.model.rotary_emb(x, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
    heads, ffns = megatron_split(c, tp)
    modules = []
    for layer in range(c.num_hidden_layers):
        attention, mlp = reference_partials(state.__getitem__, c, layer, cos, sin, heads, ffns)
        if layer in drop:
            modules.append(lambda x, a=attention, m=mlp: sum(y + m(x + y, i) for i, y in enumerate(a(x))))
        else:
            modules.append(lambda x, a=attention: sum(a(x)))
            modules.append(lambda x, m=mlp: sum(m(x, i) for i in range(tp)))
    before, now = x, x
    for u in modules:
        before, now = now, now + u(before)
    return _rms(now, state["model.norm.weight"], c.rms_norm_eps) @ state["lm_head.weight"].T


def _drop(model: str) -> set[int]:
    return {int(b) for b in CASES[model][0].split(",")}


def test_reference_without_spd_is_ladder_on_hugging_face_modules():
    """With no SPD block the composed reference is ladder on every layer: the ladder tests' reference,
    written on Hugging Face's own modules."""
    from tests.test_baselines import ladder_reference

    prompt = CASES["smollm2-135m"][2][0]
    layers = hf_model("smollm2-135m").config.num_hidden_layers
    ref = ladder_reference(tuple(prompt), frozenset(range(layers)))
    assert _close(composed_reference("smollm2-135m", [prompt], 2, set())[0], ref)


@pytest.mark.parametrize("key", ["spd+tokenweave", "spd+tokenweave unfused"])
def test_spd_tokenweave_equals_spd(composite_run, key):
    model, tp, out = composite_run
    if key not in out:
        pytest.skip(f"{key} runs on random:tiny")
    tokens, prefill, logits = out[key]
    spd_tokens, spd_prefill, spd_logits = out["spd"]
    assert tokens == spd_tokens, f"{key} {model} tp={tp}: greedy tokens differ from spd"
    assert _close(prefill, spd_prefill) and _close(logits, spd_logits), f"{key} {model} tp={tp}"


def test_spd_ladder_equals_the_composed_reference(composite_run):
    model, tp, out = composite_run
    if tp == 1:
        pytest.skip("the reference is checked at N = 2, 4")
    ours = out["spd+ladder"][2]
    assert not _close(ours, out["spd"][2]), "ladder's deferral must change the SPD model"
    assert _close(ours, composed_reference(model, CASES[model][2], tp, _drop(model))), f"{model} tp={tp}"


def test_spd_ladder_without_ladder_layers_is_spd(composite_run):
    model, tp, out = composite_run
    if "spd+ladder no ladder" not in out:
        pytest.skip("runs on random:tiny")
    assert torch.equal(out["spd+ladder no ladder"][2], out["spd"][2])  # the very same all-reduce schedule


def test_composites_take_both_parts_options():
    composite = make_strategy("spd+tokenweave", {"plan": "", "blocks": "all", "split_offset": "32", "fused": "false"})
    assert (composite.blocks, composite.split_offset, composite.fused) == ("all", 32, False)
    assert not composite.exact and composite.changes_model  # SPD's model
    assert make_strategy("spd+ladder", {"blocks": "last:2"}).layers == "all"
