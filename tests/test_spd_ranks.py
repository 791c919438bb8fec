"""SPD's single-process tooling: N rank blocks run by the SPD schedule on an in-process group must be
what N real ranks compute (gloo processes), and the attention maps what Hugging Face's eager
attention computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from spd.ranks import BlockStream, window_context
from spd.strategy import run_blocks
from suite.model.sharding import BlockShard, build_blocks, build_rank_model, default_layout, unshard_block
from suite.parallel.comm import LocalGroup
from suite.parallel.launch import launch
from tests.helpers import hf_model, source

MODEL = "random:tiny-uneven"  # 9 heads, 3 KV heads, FFN 200: uneven splits, KV heads replicated at N = 4
BLOCK = 1
X = torch.randn(2, 12, 144, generator=torch.Generator().manual_seed(3))


def _kv_splitting(config, tp: int) -> list[BlockShard]:
    """Query heads dealt round-robin: every rank reads several KV groups, some KV heads on several ranks."""
    heads, shards = config.num_attention_heads, default_layout(config, tp)[BLOCK]
    return [BlockShard(tuple(range(r, heads, tp)), s.ffn, s.group) for r, s in enumerate(shards)]


def _layouts(config, tp: int) -> dict[str, list[list[BlockShard]]]:
    megatron = default_layout(config, tp)
    split = [list(shards) for shards in megatron]
    split[BLOCK] = _kv_splitting(config, tp)
    return {"megatron": megatron, "kv_splitting": split}


def _block_job(comm, device, model, layouts, x):
    """Each layout's block ``BLOCK`` on N real ranks: (TP output, SPD output) of rank 0."""
    src, out = source(model), {}
    for name, layout in layouts.items():
        rank_model = build_rank_model(src, comm.world, comm.rank, torch.float32, device, layout)
        rank_model.setup_cache(*x.shape[:2])
        ctx = window_context(rank_model, *x.shape[:2])
        block = rank_model.layers[BLOCK]
        with torch.no_grad():
            out[name] = [
                run_blocks([block], x.flatten(0, 1), comm, ctx, drop).view_as(x).numpy() for drop in (set(), {0})
            ]
    return out


@pytest.fixture(scope="module", params=[2, 4])
def multi_rank(request):
    tp = request.param
    return tp, launch(_block_job, tp, MODEL, _layouts(source(MODEL).config, tp), X)


@pytest.mark.parametrize("layout", ["megatron", "kv_splitting"])
def test_single_process_block_equals_the_multi_rank_block(multi_rank, layout):
    tp, ranks = multi_rank
    src = source(MODEL)
    shards = _layouts(src.config, tp)[layout][BLOCK]
    if layout == "kv_splitting":
        assert sum(len(s.kv_heads) for s in shards) > src.config.num_key_value_heads  # KV heads replicated
    blocks = BlockStream(src, tp, torch.device("cpu")).block(BLOCK, shards)
    with torch.no_grad():
        tp_out, spd_out = blocks(X), blocks(X, spd=True)
    torch.testing.assert_close(tp_out, torch.from_numpy(ranks[layout][0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spd_out, torch.from_numpy(ranks[layout][1]), atol=1e-5, rtol=1e-5)
    assert (spd_out - tp_out).abs().max() > 1e-3  # SPD is not TP at N > 1


@torch.no_grad()
def test_attention_maps_and_head_partials_match_hugging_face():
    src = source(MODEL)
    config = copy.deepcopy(src.config)
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(hf_model(MODEL).state_dict())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    out = hf.eval()(ids, output_attentions=True, output_hidden_states=True)
    x = out.hidden_states[BLOCK]  # the input of block BLOCK
    stream = BlockStream(src, 4, torch.device("cpu"))
    per_head = stream.block(BLOCK, default_layout(src.config, src.config.num_attention_heads)[BLOCK])
    torch.testing.assert_close(per_head.attention_probs(x), out.attentions[BLOCK].transpose(0, 1), atol=1e-5, rtol=1e-5)
    megatron = stream.block(BLOCK)
    torch.testing.assert_close(megatron.attention_probs(x), out.attentions[BLOCK].transpose(0, 1), atol=1e-5, rtol=1e-5)
    # every head's o_proj contribution sums to the attention output of the block
    torch.testing.assert_close(per_head.attn_partials(x).sum(0), megatron.attn_partials(x).sum(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(megatron(x), out.hidden_states[BLOCK + 1], atol=1e-5, rtol=1e-5)


def test_rank_blocks_unshard_to_the_model_tensors():
    src = source(MODEL)
    shards = _kv_splitting(src.config, 4)
    state = unshard_block(
        build_blocks(src, BLOCK, shards, torch.float32, torch.device("cpu")), shards, src.config, BLOCK
    )
    assert len(state) == 9
    for name, tensor in state.items():
        assert torch.equal(tensor, src.weights.read(name)), name


def test_local_group_sums_with_autograd_and_keeps_grad_mode():
    group = LocalGroup(3)
    xs = [torch.full((2,), float(r + 1), requires_grad=True) for r in range(3)]
    outs = group.run(lambda comm, x: comm.all_reduce(x * x), xs)  # sum_r x_r^2 on every rank
    assert all(torch.equal(o, torch.full((2,), 14.0)) for o in outs)
    outs[0].sum().backward()
    assert [x.grad.tolist() for x in xs] == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    with torch.no_grad():
        assert group.run(lambda comm, x: comm.all_reduce(x * x), xs)[1].grad_fn is None
    scattered = group.run(lambda comm, x: comm.reduce_scatter(torch.arange(6.0) * x.detach()[0]), xs)
    assert [s.tolist() for s in scattered] == [[0.0, 6.0], [12.0, 18.0], [24.0, 30.0]]
    gathered = group.run(lambda comm, x: comm.all_gather(x.detach()[:1], async_op=True).wait(), xs)
    assert gathered[2].tolist() == [1.0, 2.0, 3.0]


def test_local_group_rank_failure_ends_the_run():
    group = LocalGroup(3)

    def fn(comm, x):
        if comm.rank == 1:
            raise RuntimeError("rank 1 broke")
        return comm.all_reduce(x)  # would wait for rank 1 forever

    with pytest.raises(RuntimeError, match="rank 1 broke"):
        group.run(fn, [torch.ones(1)] * 3)
    assert group.run(lambda comm, x: comm.all_reduce(x), [torch.ones(1)] * 3)[0].item() == 3.0  # usable again
