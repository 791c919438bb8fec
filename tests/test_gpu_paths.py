"""The GPU-only paths: their logic checked on the CPU (real gloo processes where ranks are involved),
and ``gpu``-marked tests of the CUDA model against Hugging Face on the same GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spd.plan_file import Plan
from suite.errors import RankError
from suite.latency.interconnect import Profile
from suite.latency.projection import ProjectingCommunicator
from suite.parallel.comm import Communicator
from suite.parallel.launch import agree, choose_backend, control_group, launch, local_ranks
from suite.parallel.runner import load_runner
from tests.helpers import hf_model

MODEL = "random:tiny"
H100_L2_BYTES = 50e6  # datasheet


# ---------------------------------------------------------------- a failed cell, per cell


def _cells_job(comm, device, fail_on: dict, grace_s: float):
    """Three steps of two collectives each; the ranks in ``fail_on[step]`` fail between them."""
    group, outcomes = control_group(grace_s), []
    for step in range(3):
        error = None
        try:
            comm.all_reduce(torch.ones(4))
            if comm.rank in fail_on.get(step, ()):
                raise RuntimeError(f"step {step} failed")
            comm.all_reduce(torch.ones(4))
        except Exception as exc:
            error = str(exc)
        outcomes.append(agree(group, error))
    return outcomes


def test_ranks_that_fail_a_step_together_agree_and_go_on():
    assert launch(_cells_job, 3, {1: (0, 1, 2)}, 20.0) == [None, "step 1 failed", None]


def test_a_rank_that_fails_alone_ends_the_launch_before_the_collective_timeout():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed"):
        launch(_cells_job, 2, {1: (1,)}, 2.0, timeout_s=120)
    assert time.monotonic() - start < 40  # the grace, the launch and the teardown: not the 120 s timeout


def test_a_failed_cell_under_torchrun_leaves_the_other_cells_running(tmp_path):
    """Two gloo ranks under torchrun: the SPD plan made for N = 4 fails at load on both, the next cell runs."""
    plan = tmp_path / "plan4.json"
    Plan(MODEL, 4, {1: {"mode": "tp"}}).save(plan)
    config = tmp_path / "cells.yaml"
    config.write_text(
        json.dumps(
            {
                "model": MODEL,
                "tp": 2,
                "prompt_len": 4,
                "new_tokens": 2,
                "repetitions": 1,
                "warmup": 0,
                "timeout": 120,
                "strategies": [{"name": "spd", "options": {"plan": str(plan)}}, "baseline"],
            }
        )
    )
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "suite.cli",
            "bench",
            "--config",
            str(config),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 1, run.stderr[-3000:]  # a cell failed (and the run went on)
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert {r["strategy"]: r["status"] for r in rows} == {"spd": "failed", "baseline": "ok"} and len(rows) == 2
    assert "made for tp 4" in next(r["error"] for r in rows if r["strategy"] == "spd")


# ---------------------------------------------------------------- NCCL or gloo, per node


def test_backend_is_chosen_from_the_ranks_on_this_node(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "8", "MASTER_ADDR": "node0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    assert local_ranks(8) == 4  # two nodes of four ranks
    assert choose_backend(8, local_ranks(8), 4) == "nccl"
    assert choose_backend(8, 4, 4, "nccl") == "nccl"
    assert choose_backend(2, 2, 1) == "gloo"  # two ranks share one GPU
    with pytest.raises(Exception, match="needs 4 GPUs on this node but 2"):
        choose_backend(8, 4, 2, "nccl")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("MASTER_ADDR")
    assert local_ranks(8) == 8  # not under torchrun: every rank is local


# ---------------------------------------------------------------- the decode step's inputs


class _HostTensors(TorchDispatchMode):
    """Counts tensors made from host data (``torch.tensor(...)``: a host-to-device copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_decode_makes_no_tensor_from_host_data_per_token():
    runner = load_runner(Communicator(), torch.device("cpu"), MODEL, "baseline")
    counts = {}
    for new_tokens in (2, 12):
        with _HostTensors() as host:
            runner.generate([[1, 2, 3]], new_tokens)
        counts[new_tokens] = host.count
    assert counts[12] == counts[2]


# ---------------------------------------------------------------- the projection at N = 1


def test_a_projection_at_one_rank_loads_no_kernel():
    """No collective to model: a 'cuda' communicator of one rank is built without touching CUDA."""
    profile = Profile.from_dict(
        {
            "name": "flat",
            "sources": ["test"],
            "method": "constant",
            "sms": 8,
            "sms_source": "test",
            "tables": {"all_reduce": {"eager": {2: [[1, 5.0, math.inf]]}}},
        }
    )
    comm = ProjectingCommunicator(world=1, profile=profile, device="cuda")
    x = torch.ones(3)
    assert comm.all_reduce(x) is x and comm.modelled_s == 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_wait_kernel_assembles_without_a_gpu(tmp_path, arch):
    """The PTX the driver JIT-compiles on an A100 or H100, assembled by the ptxas Triton ships (CUDA builds
    of torch bring Triton; the CPU build does not, and this test is skipped there)."""
    from pathlib import Path

    from suite.latency.projection import _HOLD_SMS

    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton ships no ptxas")
    (tmp_path / "hold.ptx").write_text(_HOLD_SMS)
    run = subprocess.run(
        [str(ptxas), f"-arch={arch}", str(tmp_path / "hold.ptx"), "-o", str(tmp_path / "hold.cubin")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_every_graph_capture_is_thread_local():
    """NCCL's watchdog thread queries events during a capture; in the default 'global' error mode such a
    query from another thread invalidates the capture."""
    import ast
    from pathlib import Path

    captures = []
    for path in (Path(__file__).resolve().parents[1] / "suite").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.cuda.graph":
                modes = [k.value for k in node.keywords if k.arg == "capture_error_mode"]
                captures.append((str(path), ast.unparse(modes[0]) if modes else None))
    assert len(captures) >= 4 and {mode for _, mode in captures} == {"'thread_local'"}, captures


# ---------------------------------------------------------------- telemetry and devbench


class _NVLinkNVML:
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139

    def __init__(self):
        self.asked = []

    def __getattr__(self, name):  # every other query: unsupported
        def unsupported(*args):
            raise RuntimeError(f"{name}: not supported")

        return unsupported

    def nvmlDeviceGetFieldValues(self, handle, fields):
        self.asked.append(fields)
        value = type("Value", (), {"ullVal": 0})
        return [type("Field", (), {"nvmlReturn": 0, "value": value}) for _ in fields]


def test_nvlink_throughput_is_read_over_every_link(monkeypatch):
    from suite.latency.telemetry import Sampler

    nvml = _NVLinkNVML()
    monkeypatch.setattr("suite.latency.telemetry._nvml_handle", lambda device: (nvml, object(), "GPU-x"))
    sampler = Sampler(torch.device("cpu"))
    sampler._start = time.perf_counter()
    sampler._sample()
    assert nvml.asked == [[(138, 0xFFFFFFFF), (139, 0xFFFFFFFF)]]  # scope UINT_MAX: the sum of all links


def test_devbench_gemvs_read_their_weights_from_memory():
    from suite.latency.devbench import GEMM_SHAPE, GEMV_WIDTHS

    assert min(GEMM_SHAPE[0] * n * 2 for n in GEMV_WIDTHS) >= 4 * H100_L2_BYTES


# ---------------------------------------------------------------- on a GPU

GPU_PROMPTS = [[1, 5, 9, 200, 17], [3, 3, 40]]
GPU_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_cuda_greedy():
    """Hugging Face's greedy tokens per prompt on GPU 0 (float32, no TF32), its own KV cache."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = hf_model(MODEL).to("cuda")
    out = []
    with torch.no_grad():
        for prompt in GPU_PROMPTS:
            ids = hf.generate(
                torch.tensor([prompt], device="cuda"),
                max_new_tokens=GPU_NEW_TOKENS,
                do_sample=False,
                min_new_tokens=GPU_NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(ids[0, len(prompt) :].tolist())
    hf.to("cpu")
    return out


def _cuda_decode_job(comm, device, prompts, new_tokens, cuda_graph):
    torch.backends.cuda.matmul.allow_tf32 = False
    runner = load_runner(comm, device, MODEL, "baseline")
    return [runner.generate([p], new_tokens, cuda_graph=cuda_graph).tokens[0] for p in prompts]


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda_graph"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_equals_hugging_face_on_the_same_gpu(hf_cuda_greedy, tp, cuda_graph):
    if tp > torch.cuda.device_count():
        pytest.skip(f"needs {tp} GPUs")
    tokens = launch(_cuda_decode_job, tp, GPU_PROMPTS, GPU_NEW_TOKENS, cuda_graph, device="cuda")
    assert tokens == hf_cuda_greedy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_modelled_collective_has_one_deadline_per_launch():
    """Twice as many blocks as SMs (each block takes a whole SM): the second wave starts when the first
    ends and finds the launch's deadline passed, so the launch lasts its time once, not twice."""
    from suite.latency.projection import _hold_kernel

    kernel, shared = _hold_kernel(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    slot = torch.zeros(1, dtype=torch.int64, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    kernel(grid=(2 * sms, 1, 1), block=(1024, 1, 1), args=[slot, 0.02], shared_mem=shared)
    end.record()
    end.synchronize()
    assert 0.019 < start.elapsed_time(end) / 1e3 < 0.03
