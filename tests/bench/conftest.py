"""pytest-benchmark cases: run them with ``pytest tests/bench --benchmark-only``.

A plain ``pytest`` (or ``pytest tests``) skips them: they are slow, and timings taken beside
other tests mean little. Import the JSON of ``--benchmark-json=FILE`` into a results store with
``spdbench bench --import-benchmark FILE --out DIR``.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with pytest tests/bench --benchmark-only")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    from test_latency import WORLD_SIZES

    from suite.environment import environment

    env = environment()
    machine_info["spdbench_env"] = env
    machine_info |= {
        "torch": env["torch"],
        "cuda": env["cuda"],
        "nccl": env["nccl"],
        "gpus": env["gpus"],
        "gpu_driver": env["driver"],
        "world_sizes": WORLD_SIZES,
        "backend": "gloo",
    }
