"""Head grouping when whole KV groups cannot move (KV heads = N, Llama-3-8B's structure at N = 8):
splitting KV groups moves query heads, and under the baseline the moved layout changes nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from spd import headgroup
from spd.ranks import BlockStream
from suite.model.presets import preset_config
from suite.model.sharding import build_rank_model, default_layout
from suite.model.sources import ModelSource, RandomWeights
from suite.parallel.launch import launch
from suite.parallel.runner import Runner
from suite.parallel.strategy import make_strategy

# Llama-3-8B's head structure (32 query heads, 8 KV heads, groups of 4) at N = 8, with small widths.
TP = 8
CONFIG = LlamaConfig(
    **{
        **preset_config("llama3-8b").to_dict(),
        "hidden_size": 256,
        "head_dim": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
        "tie_word_embeddings": False,
    }
)
SOURCE = ModelSource("test:llama3-8b-heads", CONFIG, RandomWeights(CONFIG), None)
WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]]


def hg_layouts(split: bool) -> list[list[dict]]:
    stream = BlockStream(SOURCE, TP, torch.device("cpu"), [WINDOWS])
    return [
        headgroup.head_grouping(stream, stream.block(b), x, split)
        for b, (x,), _ in stream.blocks(CONFIG.num_hidden_layers - 1)
    ]


@pytest.fixture(scope="module")
def layouts():
    return {"whole_groups": hg_layouts(False), "split": hg_layouts(True)}


def _logits_job(comm, device, source, layouts, prompts):
    out = {}
    for name, layout in layouts.items():
        model = build_rank_model(source, comm.world, comm.rank, torch.float32, device, layout)
        out[name] = Runner(model, make_strategy("baseline"), comm).logits(prompts).numpy()
    return out


def test_whole_kv_groups_cannot_regroup_heads(layouts):
    megatron = [list(s.q_heads) for s in default_layout(CONFIG, TP)[0]]
    for layout in layouts["whole_groups"]:
        assert [r["q_heads"] for r in layout] == megatron  # one KV group per rank: nothing to trade


def test_split_kv_groups_moves_heads_and_keeps_baseline_logits(layouts):
    megatron = default_layout(CONFIG, TP)
    split = [headgroup.shards_of(layout, CONFIG) for layout in layouts["split"]]
    assert any([s.q_heads for s in shards] != [s.q_heads for s in m] for shards, m in zip(split, megatron))
    for shards in split:
        assert sorted(h for s in shards for h in s.q_heads) == list(range(32))
        assert [len(s.q_heads) for s in shards] == [4] * TP
        cost = headgroup.kv_cost(CONFIG, shards)
        assert cost["kv_heads"] == [len(s.kv_heads) for s in shards] and cost["megatron_kv_heads"] == [1] * TP
        assert cost["extra_kv_heads"] == sum(cost["kv_heads"]) - 8 > 0
        assert cost["extra_kv_cache_elements_per_token"] == 2 * 8 * cost["extra_kv_heads"]
    logits = launch(_logits_job, TP, SOURCE, {"megatron": megatron, "split": split}, PROMPTS)
    torch.testing.assert_close(
        torch.from_numpy(logits["split"]), torch.from_numpy(logits["megatron"]), atol=1e-4, rtol=1e-4
    )


def test_units_per_shape_family():
    smollm2 = preset_config("smollm2-135m")  # 9 query heads, 3 KV heads
    # N = 4 does not divide the KV heads: single heads move either way (Megatron counts 3, 2, 2, 2)
    assert headgroup.units_and_sizes(smollm2, 4) == headgroup.units_and_sizes(smollm2, 4, split_kv_groups=True)
    # N = 3 = KV heads: whole groups (a no-op) unless groups may split
    assert headgroup.units_and_sizes(smollm2, 3) == ([(0, 1, 2), (3, 4, 5), (6, 7, 8)], [1, 1, 1])
    assert headgroup.units_and_sizes(smollm2, 3, split_kv_groups=True) == ([(h,) for h in range(9)], [3, 3, 3])
    llama2_70b = preset_config("llama2-70b")  # 64 query heads, 8 KV heads: at N = 4 two groups per rank move
    units, sizes = headgroup.units_and_sizes(llama2_70b, 4)
    assert len(units) == 8 and sizes == [2] * 4 and all(len(u) == 8 for u in units)
