"""Comparison strategies on real gloo ranks: tokenweave and seqpar equal the baseline, ladder equals
an independent single-process reference of its equations, nocomm is the identity sync; tokenweave
splits where TokenWeave does and keeps both halves on SDPA's causal path."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.overrides import TorchFunctionMode

from suite.cli import main
from suite.parallel.launch import launch
from suite.parallel.strategy import make_strategy
from tests.helpers import hf_model, source

MODEL = "smollm2-135m"
NEW_TOKENS = 32
TEXTS = [
    "The capital of France is",
    "Tensor parallelism splits every layer of a transformer across many GPUs",
    "Once upon a time, in a small village",
]
# split_multiple=2 cuts the prefill inside a row and every decode step (3 tokens -> 2 + 1) between rows
TOKENWEAVE = {"split_min_tokens": "0", "split_multiple": "2"}
GENERATED = {
    "baseline": ("baseline", {}),
    "seqpar": ("seqpar", {}),
    "tokenweave": ("tokenweave", TOKENWEAVE),
    "tokenweave unfused": ("tokenweave", TOKENWEAVE | {"fused": "false"}),
}
LADDERS = ["all", "last:16", "3,4,7"]


def prompts() -> list[list[int]]:
    return [source(MODEL).tokenizer().encode(t) for t in TEXTS]


def unpadded(texts=TEXTS) -> list[list[int]]:
    """The prompts cut to the shortest one's length: plain causal attention, no padding mask."""
    ids = [source(MODEL).tokenizer().encode(t) for t in texts]
    return [p[: min(map(len, ids))] for p in ids]


def _job(comm, device, prompts):
    """Every strategy on one rank model (they share weights): generations and full-prompt logits."""
    from suite.parallel.runner import Runner, load_runner
    from suite.parallel.strategy import make_strategy

    model = load_runner(comm, device, MODEL, "baseline").model

    def runner(name, options=None):
        return Runner(model, make_strategy(name, options), comm)

    out = {}
    for key, (name, options) in GENERATED.items():
        run = runner(name, options)
        gen = run.generate(prompts, NEW_TOKENS)
        out[key] = gen.tokens, gen.prefill_logits, run.logits(prompts).float()
    for key in ("baseline", "tokenweave"):  # the split cuts a row of a causal (unpadded) prefill
        out[f"{key} causal"] = runner(*GENERATED[key]).logits(unpadded()).float()
    out["nocomm"] = runner("nocomm").logits(prompts).float()
    for layers in ["last:0", *LADDERS]:
        out[f"ladder {layers}"] = runner("ladder", {"layers": layers}).logits(prompts).float()
    return out


@pytest.fixture(scope="module", params=[1, 2, 4])
def tp_run(request):
    return request.param, launch(_job, request.param, prompts())


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def _valid(logits: torch.Tensor, b: int, prompt: list[int]) -> torch.Tensor:
    """Row b of left-padded [batch, width, vocab] logits without its pad positions."""
    return logits[b, logits.shape[1] - len(prompt) :]


def test_prompts_straddle_the_token_split():
    lengths = [len(p) for p in prompts()]
    width, total = max(lengths), len(lengths) * max(lengths)
    at = make_strategy("tokenweave", TOKENWEAVE).split_point(total, 2)
    assert len(set(lengths)) == len(lengths) and at % width, "the split must cut a row in two"
    assert make_strategy("tokenweave", TOKENWEAVE).split_point(len(lengths), 2) == 2  # decode steps split too


@pytest.mark.parametrize("name", ["seqpar", "tokenweave", "tokenweave unfused"])
def test_fused_and_split_sync_equal_baseline(tp_run, name):
    tp, out = tp_run
    base_tokens, base_prefill, base_logits = out["baseline"]
    tokens, prefill, logits = out[name]
    assert tokens == base_tokens, f"{name} tp={tp}: greedy tokens differ from baseline"
    assert _close(prefill, base_prefill), f"{name} tp={tp}: prefill logits differ"
    for b, prompt in enumerate(prompts()):
        assert _close(_valid(logits, b, prompt), _valid(base_logits, b, prompt)), f"{name} tp={tp} row {b}"


def test_split_causal_prefill_equals_baseline(tp_run):
    tp, out = tp_run
    width = len(unpadded()[0])
    assert make_strategy("tokenweave", TOKENWEAVE).split_point(3 * width, 2) % width, "the split must cut a row"
    assert _close(out["tokenweave causal"], out["baseline causal"]), f"tp={tp}"


def test_split_point_is_tokenweaves():
    """TokenWeave's repository: the first half holds ((T + 255) & ~255) // 2 + offset tokens."""
    for offset in (0, 32, -64):
        tokenweave = make_strategy("tokenweave", {"split_offset": str(offset)})
        for tokens in range(1024, 20000, 7):
            assert tokenweave.split_point(tokens, 2) == ((tokens + 255) & ~255) // 2 + offset
    assert make_strategy("tokenweave").split_point(1100, 2) == 640  # half of 1100 rounded to 256 would be 512
    assert make_strategy("tokenweave").split_point(1023, 2) is None  # below split_min_tokens: no split
    assert make_strategy("tokenweave", {"split_multiple": "3", "split_min_tokens": "0"}).split_point(10, 2) == 6
    for world in (2, 4, 8):  # TokenWeave splits only where there is a sync to overlap
        assert make_strategy("tokenweave").split_point(4096, world) == 2048
    assert make_strategy("tokenweave").split_point(4096, 1) is None


class _SDPACalls(TorchFunctionMode):
    """Records how each scaled_dot_product_attention call masks: (attn_mask, is_causal, queries, keys)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal"), args[0].shape[-2], args[1].shape[-2]))
        return func(*args, **kwargs)


def test_both_halves_of_a_split_take_the_causal_path():
    """A causal prefill cut inside a row (N = 2: TokenWeave splits only with a sync to overlap): every
    segment stays causal without a mask; the part of the cut row after the split attends with SDPA's
    lower-right causal bias, the rest with is_causal."""
    from suite.parallel.comm import LocalGroup
    from suite.parallel.runner import load_runner

    tokens = [[5, 6, 7, 8, 9, 10, 11, 12]] * 3  # 24 tokens, cut after 12: row 1 is split 4 + 4

    def rank(comm, _):
        baseline = load_runner(comm, torch.device("cpu"), "random:tiny-uneven", "baseline")
        split = load_runner(comm, torch.device("cpu"), "random:tiny-uneven", "tokenweave", TOKENWEAVE)
        with _SDPACalls() as calls:  # the mode is per thread: this rank's calls
            logits = split.logits(tokens)
        return baseline.model, calls.calls, logits, baseline.logits(tokens)

    model, calls, logits, base_logits = LocalGroup(2).run(rank, [None, None])[0]
    ctx = model.context(torch.zeros(3, dtype=torch.long), torch.arange(8), 8)
    halves = ctx.split(make_strategy("tokenweave", TOKENWEAVE).split_point(24, 2))
    assert [[(s.n_rows, s.length, s.kv_len) for s in half.segments] for half in halves] == [
        [(1, 8, 8), (1, 4, 4)],
        [(1, 4, 8), (1, 8, 8)],
    ]
    assert all(s.causal and s.mask is None for half in halves for s in half.segments)
    layers = model.config.num_hidden_layers
    assert len(calls) == 4 * layers
    causal = [c for c in calls if c[0] is None and c[1] and c[2] == c[3]]
    lower_right = [c for c in calls if isinstance(c[0], CausalBias) and not c[1]]
    assert len(causal) == 3 * layers and len(lower_right) == layers
    assert all(c[0].variant == CausalVariant.LOWER_RIGHT and (c[2], c[3]) == (4, 8) for c in lower_right)
    assert _close(logits, base_logits)
    padded = model.context(torch.tensor([0, 2, 0]), torch.arange(8), 8)  # padding needs the mask
    assert not padded.segments[0].causal and padded.segments[0].mask.shape == (3, 1, 8, 8)


def test_ladder_without_ladder_layers_equals_baseline(tp_run):
    tp, out = tp_run
    assert torch.equal(out["ladder last:0"], out["baseline"][2])  # the very same all-reduce schedule


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def ladder_reference(prompt: tuple[int, ...], ladder: frozenset[int]) -> torch.Tensor:
    """Logits [S, V] of the full HF weights with x_k = x_{k-1} + h_k(x_{k-2}) when modules k-1 and k
    are both in ladder layers, else x_k = x_{k-1} + h_k(x_{k-1})."""
    hf = hf_model(MODEL)
    ids = torch.tensor([prompt])
    x = hf.model.embed_tokens(ids)
    rope = hf.model.rotary_emb(x, torch.arange(len(prompt))[None])
    causal = torch.full((len(prompt), len(prompt)), float("-inf")).triu(1)[None, None]
    modules = []
    for i, layer in enumerate(hf.model.layers):
        modules.append((lambda t, b=layer: b.self_attn(b.input_layernorm(t), rope, causal)[0], i in ladder))
        modules.append((lambda t, b=layer: b.mlp(b.post_attention_layernorm(t)), i in ladder))
    xs, after_ladder = [x], False
    for h, is_ladder in modules:
        xs.append(xs[-1] + h(xs[-2] if after_ladder and is_ladder else xs[-1]))
        after_ladder = is_ladder
    return hf.lm_head(hf.model.norm(xs[-1]))[0]


def _ladder_set(layers: str) -> frozenset[int]:
    ladder = make_strategy("ladder", {"layers": layers})
    return frozenset(ladder.ladder_layers(source(MODEL).config.num_hidden_layers))


def test_ladder_reference_without_ladder_is_hugging_face():
    prompt = prompts()[1]
    assert _close(ladder_reference(tuple(prompt), frozenset()), hf_model(MODEL)(torch.tensor([prompt])).logits[0])


def test_ladder_layer_sets():
    assert _ladder_set("all") == set(range(30)) and _ladder_set("last:16") == set(range(14, 30))
    assert _ladder_set("3, 4,7") == {3, 4, 7} and _ladder_set("") == set() == _ladder_set("last:0")


@pytest.mark.parametrize("layers", LADDERS)
def test_ladder_equals_reference(tp_run, layers):
    tp, out = tp_run
    ours = out[f"ladder {layers}"]
    assert not _close(ours, out["baseline"][2]), "ladder layers must change the model"
    for b, prompt in enumerate(prompts()):
        ref = ladder_reference(tuple(prompt), _ladder_set(layers))
        assert _close(_valid(ours, b, prompt), ref), f"ladder layers={layers} tp={tp} row {b}"


def test_nocomm_is_baseline_only_on_one_rank(tp_run):
    tp, out = tp_run
    same = _close(out["nocomm"], out["baseline"][2])
    assert same == (tp == 1), f"nocomm tp={tp}"


@pytest.mark.parametrize(
    "strategy, option, tp",
    [("ladder", "layers=last:16", 1), ("tokenweave", "split_min_tokens=0", 2), ("seqpar", None, 1)],
)
def test_generate_cli(capsys, strategy, option, tp):
    args = [
        "generate",
        "--strategy",
        strategy,
        "--tp",
        str(tp),
        "--prompt",
        TEXTS[0],
        "--prompt",
        TEXTS[1],
        "--max-new-tokens",
        "4",
    ]
    args += ["--strategy-opt", option] if option else []
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["strategy"] == strategy and len(result["token_ids"]) == 2
    assert all(len(ids) == 4 for ids in result["token_ids"])
    if option:
        key, value = option.split("=")
        assert str(result["strategy_options"][key]) == value
    assert result["usable_model"]


def test_generate_cli_notes_that_nocomm_is_not_a_model(capsys):
    assert main(["generate", "--strategy", "nocomm", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert "nocomm is a latency bound, not a usable model" in capsys.readouterr().out


@pytest.mark.parametrize(
    "strategy, option, message",
    [
        ("ladder", "layers=top:3", "layers='top:3'"),
        ("ladder", "layers=last:-1", "expected all, last:K"),
        ("tokenweave", "split_multiple=0", "split_multiple=0"),
        ("tokenweave", "split_min_tokens=x", "expected int"),
        ("seqpar", "split_multiple=2", "has no option"),
    ],
)
def test_bad_strategy_options_are_one_line_errors(capsys, strategy, option, message):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--strategy", strategy, "--strategy-opt", option, "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "name", ["baseline", "ladder", "nocomm", "seqpar", "tokenweave", "spd", "spd+ladder", "spd+tokenweave"]
)
def test_the_stack_is_built_once_per_model(name):
    """``modules(layers)`` is built on a model's first forward only (eager decode does not rebuild it per
    step; the ladder would re-parse its layers), and again for another model."""
    from suite.parallel.comm import Communicator
    from suite.parallel.runner import Runner, load_runner

    options = {"blocks": "all"} if name.startswith("spd") else {}
    runner = load_runner(Communicator(), torch.device("cpu"), "random:tiny", name, options)
    strategy, built = runner.strategy, []
    modules = strategy.modules
    strategy.modules = lambda layers: built.append(layers) or modules(layers)
    runner.generate([[5, 17, 42]], 4)  # a prefill and three decode steps
    assert built == [runner.model.layers]
    other = load_runner(Communicator(), torch.device("cpu"), "random:tiny", name, options).model
    Runner(other, strategy, runner.comm).generate([[5, 17, 42]], 2)
    assert built == [runner.model.layers, other.layers]


@pytest.mark.parametrize(
    "name, sums_per_layer, fewer",  # each module but the first reads a sum (ladder: two in flight at first)
    [("baseline", 2, 1), ("nocomm", 2, 1), ("seqpar", 2, 1), ("ladder", 2, 2), ("spd", 2, 1)],
)
def test_each_sum_a_norm_reads_is_formed_with_that_norm(name, sums_per_layer, fewer):
    """The residual add after a sync and the norm that reads it are one call (``RMSNorm.add_forward``, one
    compiled region in kernels: compiled); the logits stay exact (the tests against Hugging Face)."""
    from suite.parallel.comm import Communicator
    from suite.parallel.runner import load_runner

    options = {"blocks": "all"} if name == "spd" else {}
    runner = load_runner(Communicator(), torch.device("cpu"), "random:tiny", name, options)
    calls = []
    for layer in runner.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.add_forward = lambda x, delta, norm=norm: calls.append(norm) or type(norm).add_forward(norm, x, delta)
    runner.generate([[5, 17, 42]], 1)  # one prefill
    assert len(calls) == sums_per_layer * len(runner.model.layers) - fewer
