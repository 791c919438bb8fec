"""Generation latency per strategy and TP degree on a tiny random model (CPU, gloo).

Fixed rounds (``benchmark.pedantic``): calibrated rounds would differ between ranks and
deadlock them. Each round is one full generation; ``extra_info`` carries the scenario and the
slowest rank's prefill / decode / end-to-end times per round.
"""

import pytest
from ranks import RankGroup

from suite.latency.measure import prompts_for
from suite.model.presets import PRESETS
from suite.parallel.strategy import available
from suite.results import LatencyScenario

MODEL = "random:tiny"
WORLD_SIZES = [1, 2, 4]
STRATEGIES = [
    ("baseline", {}),
    ("spd", {"blocks": "all"}),
    ("ladder", {}),
    ("tokenweave", {}),
    ("seqpar", {}),
    ("nocomm", {}),
]
SCENARIO = {
    "model": MODEL,
    "batch": 2,
    "prompt_len": 32,
    "new_tokens": 8,
    "dtype": "float32",
    "device": "cpu",
    "decode_mode": "eager",
    "backend": "gloo",
    "mode": "measured",
}
ROUNDS, WARMUP = 5, 1


@pytest.mark.parametrize("tp", WORLD_SIZES)
@pytest.mark.parametrize("strategy,options", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_generate(benchmark, strategy, options, tp):
    if strategy not in available():
        pytest.skip(f"strategy {strategy} is not installed")
    cell = LatencyScenario(
        **SCENARIO, strategy=strategy, strategy_options=options, tp=tp, repetitions=ROUNDS, warmup=WARMUP, seed=0
    )
    scenario = cell.to_json()
    prompts = prompts_for(cell, PRESETS["tiny"]["vocab_size"])
    rounds, warmup = (1, 0) if benchmark.disabled else (ROUNDS, WARMUP)
    with RankGroup(scenario | {"prompts": prompts}, rounds + warmup) as group:
        benchmark.pedantic(group.round, setup=group.barrier, rounds=rounds, warmup_rounds=warmup, iterations=1)
        usable = group.runner.strategy.usable
    t = group.timings

    def measured(values):  # the last ``rounds`` entries: warm-up rounds come first
        return values[-rounds:] if values else []

    benchmark.extra_info.update(
        scenario
        | {
            "usable_model": usable,
            "prefill_ms": measured(t.prefill_ms),
            "e2e_ms": measured(t.e2e_ms),
            "decode_ms_per_token": measured(t.decode_ms_per_token),
            "comm_fraction": measured(t.comm_fraction),
        }
    )
    assert len(t.e2e_ms) == len(t.prefill_ms) == rounds + warmup
    assert len(t.decode_ms_per_token) == rounds + warmup and all(d > 0 for d in t.decode_ms_per_token)
    assert all(0 < p < e for p, e in zip(t.prefill_ms, t.e2e_ms))  # a round's generation includes its prefill
