"""SPD: the strategy against an independent single-process reference, plans, sensitivity, B2B, HG.

Multi-rank checks run real gloo processes, one launch per N (module-scoped), and the tests
assert on the collected results.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from spd import headgroup
from spd.data import calibration_windows
from spd.distill import DistillSettings, distill_to
from spd.plan import make_plan, restrict
from spd.plan_file import Plan, PlanError, load_plan
from spd.ppl import ppl_job
from spd.ranks import BlockStream
from spd.sensitivity import analyse, progressive_nll
from suite.model.sharding import build_rank_model, default_layout
from suite.parallel.launch import launch
from suite.parallel.runner import Runner
from suite.parallel.strategy import bound_strategy, make_strategy
from tests.helpers import data_dir, hf_model, require_data, source

MODEL = "random:tiny-uneven"  # 9 heads, 3 KV heads, FFN 200: uneven splits at N = 2, 3, 4
PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 11, 64, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process work on one thread: the CI machine's two cores are shared with the spawned ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- an independent single-process reference of the equations in methods.md -----------------


def _split(n: int, parts: int) -> list[range]:
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [range(s, s + z) for s, z in zip(starts, sizes)]


def _rms(x, g, eps):
    return g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_partials(w, config, layer: int, cos, sin, heads, ffns):
    """Block ``layer``'s per-rank partial outputs, weights ``w(name)``, ``heads``/``ffns`` per rank:
    ``attention(x)`` -> [Y_i] (causal, on ``x`` [batch, tokens, hidden]) and ``mlp(h, i)`` -> Z_i."""
    hd, n_q, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    rms = functools.partial(_rms, eps=config.rms_norm_eps)
    p = f"model.layers.{layer}."

    def attention(x):
        b, t, _ = x.shape
        u = rms(x, w(p + "input_layernorm.weight"))
        q = (u @ w(p + "self_attn.q_proj.weight").T).view(b, t, n_q, hd).transpose(1, 2)
        k = (u @ w(p + "self_attn.k_proj.weight").T).view(b, t, n_kv, hd).transpose(1, 2)
        v = (u @ w(p + "self_attn.v_proj.weight").T).view(b, t, n_kv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(n_q // n_kv, 1), v.repeat_interleave(n_q // n_kv, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, t, hd]
        wo = w(p + "self_attn.o_proj.weight")
        return [sum(o[:, h] @ wo[:, h * hd : (h + 1) * hd].T for h in hs) for hs in heads]

    def mlp(h, rank):
        a, z = ffns[rank]
        u2 = rms(h, w(p + "post_attention_layernorm.weight"))
        return (F.silu(u2 @ w(p + "mlp.gate_proj.weight")[a:z].T) * (u2 @ w(p + "mlp.up_proj.weight")[a:z].T)) @ w(
            p + "mlp.down_proj.weight"
        )[:, a:z].T

    return attention, mlp


def reference_block(w, config, layer: int, x, cos, sin, heads, ffns, spd: bool):
    """Block ``layer`` of the N-shard model on ``x`` [batch, tokens, hidden]: SPD or baseline TP."""
    attention, mlp = reference_partials(w, config, layer, cos, sin, heads, ffns)
    ys = attention(x)
    if spd:  # SPD: MLP shard i sees X + Y_i; one sync carries Y_i + Z_i
        return x + sum(y + mlp(x + y, i) for i, y in enumerate(ys))
    h = x + sum(ys)
    return h + sum(mlp(h, i) for i in range(len(ffns)))


def megatron_split(config, tp: int):
    return _split(config.num_attention_heads, tp), [(r.start, r.stop) for r in _split(config.intermediate_size, tp)]


@torch.no_grad()
def reference_logits(model: str, prompts, tp: int, drop: set[int], layouts=None, overrides=None):
    """Logits of the N-shard model with SPD on ``drop``; ``layouts[block] = (heads per rank, ffn per rank)``."""
    hf = hf_model(model)
    c, state = hf.config, hf.state_dict()
    w = lambda name: (overrides or {}).get(name, state[name])  # noqa: E731
    ids = torch.tensor(prompts)
    b, t = ids.shape
    x = w("model.embed_tokens.weight")[ids]
    cos, sin = hf.model.rotary_emb(x, torch.arange(t).expand(b, -1))
    for layer in range(c.num_hidden_layers):
        heads, ffns = (layouts or {}).get(layer, megatron_split(c, tp))
        x = reference_block(w, c, layer, x, cos, sin, heads, ffns, layer in drop)
    return _rms(x, w("model.norm.weight"), c.rms_norm_eps) @ w("lm_head.weight").T


def test_reference_without_spd_is_the_hf_model():
    with torch.no_grad():
        hf = hf_model(MODEL)(torch.tensor(PROMPTS)).logits
    torch.testing.assert_close(reference_logits(MODEL, PROMPTS, 4, set()), hf, atol=1e-4, rtol=1e-4)


# --- fixtures: an empty plan, a distilled plan, permuted layouts --------------------------------


def _write(path, plan: Plan):
    plan.save(path)
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("spd")


DISTILL = DistillSettings(samples=8, seq_len=64, epochs=10, lr=1e-3, heldout_samples=4)


@pytest.fixture(scope="module")
def distilled(workdir):
    """B2B on block 0 and HG+B2B on block 1 of the tiny model at N = 4 (block 2 zero-shot)."""
    plan = Plan(
        MODEL,
        4,
        {
            0: {"mode": "b2b", "sensitivity": 1.0},
            1: {"mode": "hg+b2b", "sensitivity": 2.0},
            2: {"mode": "zs", "sensitivity": 0.5},
        },
    )
    require_data()  # calibration windows
    return load_plan(distill_to(_write(workdir / "plan.json", plan), workdir / "distilled", DISTILL))


def _scrambled(config, tp: int):
    """A non-trivial head and FFN permutation: heads in reverse order, FFN shards rotated."""
    layout = default_layout(config, tp)
    n_q = config.num_attention_heads
    out = []
    for shards in layout:
        heads = [tuple(n_q - 1 - h for h in s.q_heads) for s in shards]
        ffns = [s.ffn for s in shards[1:] + shards[:1]]
        out.append([type(s)(h, f, s.group) for s, h, f in zip(shards, heads, ffns)])
    assert out != layout
    return out


def _logits_job(comm, device, model, prompts, configs, layouts, extra):
    """Rank 0's logits for each (strategy, options) and for the baseline on each permuted layout."""
    src = source(model)
    out = {}
    for key, (name, options) in configs.items():
        strategy = bound_strategy(name, options, src, comm.world)
        out[key] = Runner(
            strategy.load_model(src, comm.world, comm.rank, torch.float32, device), strategy, comm
        ).logits(prompts)
    baseline = make_strategy("baseline")
    for key, layout in layouts.items():
        model_ = build_rank_model(src, comm.world, comm.rank, torch.float32, device, layout)
        out[key] = Runner(model_, baseline, comm).logits(prompts)
    if extra:  # whole-model perplexities with SPD on blocks k..L-1, for the sensitivity steps
        windows, steps = extra
        n_layers = src.config.num_hidden_layers
        out["ppl"] = dict(
            zip(
                steps,
                ppl_job(comm, device, model, [("spd", {"blocks": f"last:{n_layers - k}"}) for k in steps], windows, 2),
            )
        )
    # numpy pickles by value (torch tensors would travel as shared memory of an exiting process)
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in out.items()}


HG_WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def hg_layouts(src, tp: int, split_kv_groups: bool = False):
    """The head-grouped layout of every block, from the blocks' inputs on ``HG_WINDOWS``."""
    stream = BlockStream(src, tp, torch.device("cpu"), [HG_WINDOWS])
    return [
        headgroup.shards_of(headgroup.head_grouping(stream, stream.block(b), x, split_kv_groups), src.config)
        for b, (x,), _ in stream.blocks(src.config.num_hidden_layers - 1)
    ]


@pytest.fixture(scope="module")
def runs(workdir, request):
    """Every N's logits; the distilled plan's at N = 4 only where the data folder is (distillation needs it)."""
    distilled = request.getfixturevalue("distilled") if data_dir() is not None else None
    src = source(MODEL)
    results = {}
    for tp in (1, 2, 3, 4):
        empty = _write(workdir / f"empty-{tp}.json", Plan(MODEL, tp, {1: {"mode": "tp"}}))
        configs = {
            "baseline": ("baseline", {}),
            "spd_all": ("spd", {"blocks": "all"}),
            "empty_plan": ("spd", {"plan": empty}),
        }
        layouts = {}
        if tp > 1:
            layouts = {"hg_layout": hg_layouts(src, tp), "scrambled_layout": _scrambled(src.config, tp)}
        if tp == 4 and distilled is not None:
            configs["distilled"] = ("spd", {"plan": str(distilled.path)})
        extra = (HG_WINDOWS, [3, 2, 1, 0]) if tp == 2 else None
        out = launch(_logits_job, tp, MODEL, PROMPTS, configs, layouts, extra)
        results[tp] = {k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in out.items()}
        results[tp]["layouts"] = layouts
    return results


# --- the strategy ---------------------------------------------------------------------------


def test_spd_at_one_rank_equals_baseline(runs):
    torch.testing.assert_close(runs[1]["spd_all"], runs[1]["baseline"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_empty_plan_equals_baseline(runs, tp):
    torch.testing.assert_close(runs[tp]["empty_plan"], runs[tp]["baseline"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_spd_everywhere_matches_reference(runs, tp):
    n_layers = source(MODEL).config.num_hidden_layers
    ref = reference_logits(MODEL, PROMPTS, tp, set(range(n_layers)))
    torch.testing.assert_close(runs[tp]["spd_all"], ref, atol=1e-4, rtol=1e-4)
    assert (runs[tp]["spd_all"] - runs[tp]["baseline"]).abs().max() > 1e-3  # SPD really changes the model


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("layout", ["hg_layout", "scrambled_layout"])
def test_head_permutation_leaves_baseline_unchanged(runs, tp, layout):
    torch.testing.assert_close(runs[tp][layout], runs[tp]["baseline"], atol=1e-4, rtol=1e-4)


def test_distilled_plan_matches_reference_with_its_weights_and_layout(runs, distilled):
    from safetensors.torch import load_file

    overrides = load_file(str(distilled.weights_path()))
    layout = distilled.blocks[1]["layout"]
    assert [r["q_heads"] for r in layout] != [list(r) for r in _split(9, 4)] or [r["ffn"] for r in layout] != [
        [r.start, r.stop] for r in _split(200, 4)
    ]
    layouts = {1: ([r["q_heads"] for r in layout], [tuple(r["ffn"]) for r in layout])}
    ref = reference_logits(MODEL, PROMPTS, 4, {0, 1, 2}, layouts, overrides)
    torch.testing.assert_close(runs[4]["distilled"], ref, atol=1e-4, rtol=1e-4)
    assert (runs[4]["distilled"] - runs[4]["spd_all"]).abs().max() > 1e-3  # the distilled weights are in use


# --- B2B and HG -----------------------------------------------------------------------------


def reference_b2b(block: int, heads, ffns, settings: DistillSettings) -> dict[str, torch.Tensor]:
    """B2B of one block written from the equations on the full Hugging Face weights (one tensor per
    weight, so KV heads and norms that several ranks read are one weight): Adam on
    MSE(SPD block, TP block) over the block's inputs in the HF model, the same window order."""
    hf = hf_model(MODEL)
    c, state = hf.config, hf.state_dict()
    windows = calibration_windows(source(MODEL), None, settings.samples, settings.seq_len, settings.seed)
    with torch.no_grad():
        x = hf(windows, output_hidden_states=True).hidden_states[block]
    cos, sin = hf.model.rotary_emb(x, torch.arange(x.shape[1]).expand(x.shape[0], -1))
    teacher_heads, teacher_ffns = megatron_split(c, 4)
    with torch.no_grad():
        target = reference_block(state.__getitem__, c, block, x, cos, sin, teacher_heads, teacher_ffns, spd=False)
    prefix = f"model.layers.{block}."
    trained = {n: t.clone().requires_grad_("norm" not in n) for n, t in state.items() if n.startswith(prefix)}
    optimizer = torch.optim.Adam([t for t in trained.values() if t.requires_grad], lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.epochs):
        for i in torch.randperm(x.shape[0], generator=gen).tolist():
            out = reference_block(trained.__getitem__, c, block, x[i : i + 1], cos[:1], sin[:1], heads, ffns, spd=True)
            loss = F.mse_loss(out, target[i : i + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {n: t.detach() for n, t in trained.items()}


@pytest.mark.parametrize("block", [0, 1])
def test_b2b_matches_an_independent_reference(distilled, block):
    """The streamed B2B of the rank blocks trains what the equations say: the distilled weights' change
    equals the reference's (on the plan's layout: Megatron for b2b, head-grouped for hg+b2b)."""
    from safetensors.torch import load_file

    weights, state = load_file(str(distilled.weights_path())), hf_model(MODEL).state_dict()
    layout = distilled.blocks[block].get("layout")
    heads, ffns = (
        ([r["q_heads"] for r in layout], [tuple(r["ffn"]) for r in layout])
        if layout
        else megatron_split(source(MODEL).config, 4)
    )
    reference = reference_b2b(block, heads, ffns, DISTILL)
    for name, ref in reference.items():
        change, ref_change = weights[name] - state[name], ref - state[name]
        if "norm" in name:
            assert torch.equal(change, ref_change) and not change.any()  # frozen
            continue
        assert ref_change.norm() > 0
        assert (change - ref_change).norm() <= 1e-3 * ref_change.norm(), name


def test_b2b_lowers_heldout_mse(distilled):
    mse = distilled.distill["heldout_mse"]
    assert set(mse) == {"0", "1"}
    for block, m in mse.items():
        assert m["mse_b2b"] < m["mse_zs"], (block, m)
    assert distilled.distill["settings"]["epochs"] == 10


def test_head_grouping_search_separates_similar_heads():
    dist = torch.tensor([[0, 0.1, 5, 5], [0.1, 0, 5, 5], [5, 5, 0, 0.1], [5, 5, 0.1, 0]])
    units = [(h,) for h in range(4)]
    for limit in (headgroup.EXHAUSTIVE_LIMIT, 0):  # exhaustive, then the local search
        headgroup.EXHAUSTIVE_LIMIT, saved = limit, headgroup.EXHAUSTIVE_LIMIT
        try:
            groups = [sorted(h for u in g for h in u) for g in headgroup.group_heads(dist, units, [2, 2])]
        finally:
            headgroup.EXHAUSTIVE_LIMIT = saved
        assert [0, 1] not in groups and [2, 3] not in groups


def test_head_grouping_units_respect_gqa():
    config = source(MODEL).config
    units, sizes = headgroup.units_and_sizes(config, 3)  # 3 KV groups on 3 ranks: whole groups move
    assert units == [(0, 1, 2), (3, 4, 5), (6, 7, 8)] and sizes == [1, 1, 1]
    units, sizes = headgroup.units_and_sizes(config, 4)  # N > KV heads: single heads, Megatron counts
    assert len(units) == 9 and sizes == [3, 2, 2, 2]
    assert headgroup.match_ffn(torch.tensor([[1.0, 9.0], [8.0, 1.0]])) == [1, 0]


# --- sensitivity ----------------------------------------------------------------------------


def test_sensitivity_steps_equal_whole_model_perplexity(runs):
    """The streamed single-process steps against N = 2 real ranks running the whole model."""
    src = source(MODEL)
    nll = progressive_nll(BlockStream(src, 2, torch.device("cpu")), HG_WINDOWS)
    tokens = HG_WINDOWS.shape[0] * (HG_WINDOWS.shape[1] - 1)
    sens, ppl = {k: math.exp(sum(nll[k]) / tokens) for k in range(len(nll))}, runs[2]["ppl"]
    for k in ppl:
        assert math.isclose(sens[k], ppl[k], rel_tol=1e-4), (k, sens[k], ppl[k])


def test_sensitivity_resumes_and_rejects_other_settings(tmp_path):
    require_data()
    out = tmp_path / "sens.json"
    kwargs = dict(samples=4, seq_len=32, calib=None, batch=2, resamples=50)
    first = analyse("random:tiny", 1, out, **kwargs)
    assert sorted(map(int, first["ppl"])) == [0, 1, 2] and set(first["sensitivity"]) == {"0", "1"}
    assert all(len(v) == 4 for v in first["nll"].values())
    state = json.loads(out.read_text())
    state["nll"] = {k: v[:2] for k, v in state["nll"].items()}  # as if interrupted after the first batch
    state["ppl"], state["sensitivity"] = {}, {}
    out.write_text(json.dumps(state))
    again = analyse("random:tiny", 1, out, **kwargs)
    assert again["ppl"] == pytest.approx(first["ppl"], rel=1e-6)
    for k in first["nll"]:
        assert again["nll"][k] == pytest.approx(first["nll"][k], rel=1e-6)
    with pytest.raises(PlanError, match="other settings"):
        analyse("random:tiny", 1, out, samples=3, seq_len=32)


# --- plans ----------------------------------------------------------------------------------


def _sens_state(values):
    return {"model": MODEL, "tp": 4, "n_layers": len(values), "sensitivity": {str(b): s for b, s in enumerate(values)}}


def test_plan_budget_and_classes():
    state = _sens_state([0.9, 0.1, 0.5, 0.2, 0.05, 2.0])
    plan = make_plan(state, "50%", t1=0.1, t2=0.3)
    assert plan.spd_blocks() == {4, 1, 3}
    assert [plan.mode(b) for b in range(6)] == ["tp", "zs", "tp", "b2b", "zs", "tp"]
    full = make_plan(state, "100%", t1=0.1, t2=0.3)
    assert [full.mode(b) for b in range(6)] == ["hg+b2b", "zs", "hg+b2b", "b2b", "zs", "hg+b2b"]
    assert [make_plan(state, "6", t1=0.1, t2=0.3, variant="zs+b2b").mode(b) for b in (0, 3)] == ["b2b", "b2b"]
    assert restrict(full, "50%").spd_blocks() == {4, 1, 3}
    default = make_plan(state, "100%")
    assert default.thresholds["t1"] <= default.thresholds["t2"] and "quantile" in default.thresholds["rule"]
    with pytest.raises(PlanError, match="budget '150%'"):
        make_plan(state, "150%")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(model="random:tiny"), "was made for model"),
        (lambda d: d.update(tp=2), "was made for tp 2"),
        (lambda d: d["blocks"].append({"block": 7, "mode": "zs"}), "out of range"),
        (lambda d: d["blocks"].append({"block": 2, "mode": "fast"}), "unknown mode"),
        (lambda d: d.update(version=9), "version"),
        (lambda d: d["blocks"].append({"block": 0, "mode": "b2b"}), "need distilled weights"),
    ],
)
def test_invalid_plans_are_rejected(tmp_path, change, message):
    data = Plan(MODEL, 4, {1: {"mode": "zs"}}).to_json()
    change(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        make_strategy("spd", {"plan": str(path)}).bind(source(MODEL), 4)


def test_corrupt_plan_and_missing_options_fail_before_launch(tmp_path, capsys):
    from suite.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not a readable JSON"):
        make_strategy("spd", {"plan": str(bad)})
    with pytest.raises(PlanError, match="exactly one of"):
        make_strategy("spd", {})
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", MODEL, "--strategy", "spd", "--spd-plan", str(bad), "--prompt", "hi"])
    assert exit_.value.code == 2 and "not a readable JSON" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    Plan("random:tiny", 1, {}).save(wrong)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", MODEL, "--strategy", "spd", "--spd-plan", str(wrong), "--prompt", "hi"])
    assert exit_.value.code == 2 and "was made for model" in capsys.readouterr().err
