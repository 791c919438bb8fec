"""``spdbench validate-projection``: the same cells measured on N real ranks and projected, error per cell."""

from __future__ import annotations

import dataclasses

from suite.latency.interconnect import Profile
from suite.results import LatencyScenario


def cells(
    model: str,
    strategies: list[str],
    options: dict,
    tp: int,
    batches: list[int],
    prompt_lens: list[int],
    new_tokens: int,
    repetitions: int,
    warmup: int,
    cuda_graph: bool,
    dtype: str = "float32",
    device: str = "cpu",
    backend: str = "auto",
    timeout: float = 300,
    kernels: str = "eager",
) -> list[LatencyScenario]:
    """One measured cell per strategy x batch x prompt length."""
    return [
        LatencyScenario(
            model=model,
            strategy=name,
            strategy_options=options,
            tp=tp,
            batch=b,
            prompt_len=p,
            new_tokens=new_tokens,
            repetitions=repetitions,
            warmup=warmup,
            dtype=dtype,
            device=device,
            backend=backend,
            timeout=timeout,
            decode_mode="cuda_graph" if cuda_graph else "eager",
            kernels=kernels,
        )
        for name in strategies
        for b in batches
        for p in prompt_lens
    ]


def _measured_job(comm, device, cells):
    """On every rank: the cells' timings with the real communicator."""
    from suite.latency.measure import measure, prompts_for
    from suite.latency.stats import summarise
    from suite.parallel.runner import ModelCache
    from suite.parallel.strategy import bound_strategy

    models, out = ModelCache(device), []
    for cell in cells:
        strategy = bound_strategy(cell.strategy, cell.strategy_options, models.source(cell.model), comm.world)
        runner = models.runner(cell.model, cell.dtype, strategy, comm, cell.kernels)
        timings = measure(
            runner,
            comm,
            prompts_for(cell, runner.model.config.vocab_size),
            cell.new_tokens,
            cell.repetitions,
            cell.warmup,
            cuda_graph=cell.decode_mode == "cuda_graph",
        )
        out.append(summarise(timings, cell.batch, cell.new_tokens))
    return out


def validate(cells: list[LatencyScenario], profile: Profile, sms: int | None = None) -> list[dict]:
    """Per cell: measured and projected prefill / decode medians and the relative error."""
    from suite.latency.projection import project_cell, projected_runner
    from suite.parallel import launch as launching

    first = cells[0]
    measured = launching.launch(
        _measured_job, first.tp, cells, device=first.device, backend=first.backend, timeout_s=first.timeout
    )
    results, runners = [], {}
    for cell, real in zip(cells, measured):
        key = (cell.strategy, tuple(sorted(cell.strategy_options.items())), cell.kernels)
        if key not in runners:
            runners[key] = projected_runner(
                cell.model,
                cell.strategy,
                cell.strategy_options,
                cell.tp,
                profile,
                cell.dtype,
                cell.device,
                sms,
                kernels=cell.kernels,
            )
        projected = project_cell(dataclasses.replace(cell, mode="projected"), runners[key])
        row = {"strategy": cell.strategy, "tp": cell.tp, "batch": cell.batch, "prompt_len": cell.prompt_len}
        for key_ in ("prefill_ms_median", "decode_ms_per_token_median"):
            m, p = real[key_], projected[key_]
            row |= {
                f"{key_}_measured": m,
                f"{key_}_projected": p,
                f"{key_.split('_')[0]}_error_pct": None if m is None or p is None else 100 * (p / m - 1),
            }
        results.append(row)
    return results
