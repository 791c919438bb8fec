"""The SPD sweeps: one metric for SPD budgets x variants (the paper's figures at small scale).

Variants: ``zs`` (every SPD block zero-shot), ``zs+b2b`` (SB and ESB blocks distilled),
``zs+b2b+hg`` (ESB blocks head-grouped, then distilled). Each block is classified once, with
thresholds from all blocks' sensitivities, so a block's mode does not depend on the budget:
the blocks are distilled once (for the 100% plan) and every budget uses the n least sensitive
of them. Distilling a block uses only its inputs in the unmodified model, so this equals
distilling per budget. A 0% budget is the same model for every variant (no SPD block): it runs once.

Metrics: ``ppl`` (WikiText-2 test perplexity on N ranks, rows of kind ``spd_ppl``) and
``accuracy`` (lm-eval tasks through the TP model on N ranks, ``suite.accuracy.evaluate``: rows of
kind ``accuracy`` with ``spd_variant`` and ``spd_blocks_pct``, which the report draws as the
paper's accuracy figure). ``strategy`` runs every plan as ``spd`` or a composite (``spd+ladder``,
``spd+tokenweave``): rows carry its name. Both resume: finished rows in the results file are not run again, and
the distilled plans are reused when present.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spd.data import wikitext2_windows
from spd.distill import WEIGHTS_FILE, distill
from spd.plan import make_plan, restrict
from spd.plan_file import PlanError, load_plan
from spd.ppl import ppl_job
from spd.sensitivity import load_sensitivity
from suite.environment import environment
from suite.model.sources import resolve
from suite.parallel import launch as launching
from suite.results import PerplexityScenario, ResultStore, Row
from suite.vocabulary import SPD_VARIANTS


def _distilled(state, out: Path, settings, model: str) -> dict[str, Path]:
    """Distil the 100% plans of zs+b2b and zs+b2b+hg (once; reused when present). SB blocks are shared."""
    from safetensors.torch import save_file

    paths = {v: out / v / "plan.json" for v in ("zs+b2b", "zs+b2b+hg")}
    if all(p.exists() for p in paths.values()):
        return paths
    b2b, b2b_tensors = distill(make_plan(state, "100%", variant="zs+b2b"), settings, model)
    hg_plan = make_plan(state, "100%", variant="zs+b2b+hg")
    esb = {b for b in hg_plan.blocks if hg_plan.mode(b) == "hg+b2b"}
    hg, hg_tensors = distill(hg_plan, settings, model, only=esb)
    shared = {k: v for k, v in b2b_tensors.items() if int(k.split(".")[2]) not in esb}
    hg.distill["heldout_mse"] = {
        **{b: r for b, r in b2b.distill["heldout_mse"].items() if int(b) not in esb},
        **hg.distill["heldout_mse"],
    }
    for variant, plan, tensors in (("zs+b2b", b2b, b2b_tensors), ("zs+b2b+hg", hg, shared | hg_tensors)):
        paths[variant].parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(paths[variant].parent / WEIGHTS_FILE))
        plan.weights = WEIGHTS_FILE
        plan.save(paths[variant])
    return paths


def plans(
    model: str,
    tp: int,
    sensitivity: str | Path,
    budgets: list[int],
    settings,
    out: str | Path,
    variants: tuple[str, ...] = SPD_VARIANTS,
) -> dict[tuple[int, str], Path]:
    """The plan of every (budget, variant), distilling the 100% plans first (once, where a variant
    distils); a 0% budget only as zs."""
    state = load_sensitivity(sensitivity)
    source = resolve(model)
    if (state["model"], state["tp"]) != (source.identity, tp):
        raise PlanError(f"{sensitivity} is for {state['model']} at N={state['tp']}, not {source.identity} at N={tp}")
    out = Path(out)
    full = _distilled(state, out, settings, model) if set(variants) - {"zs"} else {}
    paths = {}
    for b in budgets:
        for variant in variants if b else ("zs",):
            if variant == "zs":
                paths[b, variant] = make_plan(state, f"{b}%", variant="zs").save(out / "zs" / f"plan-{b}.json")
            else:
                plan = restrict(load_plan(full[variant]), f"{b}%")
                paths[b, variant] = plan.save(full[variant].parent / f"plan-{b}.json")
    return paths


def _table(values: dict[tuple[int, str], float]) -> pd.DataFrame:
    """Budget (rows) x variant (columns); the 0% budget's one model fills every variant."""
    variants = {v for _, v in values}
    values = values | {(0, v): values[0, "zs"] for v in variants if (0, "zs") in values}
    return (
        pd.Series(values)
        .rename_axis(["budget_pct", "spd_variant"])
        .unstack()[[v for v in SPD_VARIANTS if v in variants]]
    )


def ppl_sweep(
    model: str,
    tp: int,
    paths: dict[tuple[int, str], Path],
    eval_samples: int,
    eval_seq_len: int,
    results: str | Path,
    command: str,
    *,
    device: str = "cpu",
    backend: str = "auto",
    timeout: float = launching.DEFAULT_TIMEOUT_S,
    strategy: str = "spd",
) -> pd.DataFrame:
    """WikiText-2 test perplexity per budget (rows) and variant (columns); rows already in ``results`` are reused."""
    source = resolve(model)
    windows = wikitext2_windows(source, eval_samples, eval_seq_len)
    scenarios = {
        key: PerplexityScenario(
            model=source.identity,
            strategy=strategy,
            strategy_options={"plan": str(path)},
            tp=tp,
            dataset="wikitext2-test",
            tokens=windows.numel(),
            seq_len=eval_seq_len,
            budget_pct=key[0],
            spd_variant=key[1],
        )
        for key, path in paths.items()
    }
    store = ResultStore(results)
    done = {r["cell_id"]: r["ppl"] for r in store.rows() if r.get("kind") == "spd_ppl" and r.get("status") == "ok"}
    todo = [key for key in paths if scenarios[key].cell_id not in done]
    ppl = (
        launching.launch(
            ppl_job,
            tp,
            model,
            [(strategy, {"plan": str(paths[k])}) for k in todo],
            windows,
            8,
            device=device,
            backend=backend,
            timeout_s=timeout,
        )
        if todo
        else []
    )
    env = environment()
    store.append(
        *[
            Row(scenario=scenarios[key], values={"ppl": value}, env=env, command=command)
            for key, value in zip(todo, ppl)
        ]
    )
    return _table({key: done[scenarios[key].cell_id] for key in paths if key not in todo} | dict(zip(todo, ppl)))


def accuracy_sweep(
    model: str,
    tp: int,
    paths: dict[tuple[int, str], Path],
    tasks: list[str],
    limits: list[str],
    folder,
    results: str | Path,
    command: str,
    *,
    device: str = "cpu",
    backend: str = "auto",
    timeout: float = launching.DEFAULT_TIMEOUT_S,
    batch_size: int = 32,
    strategy: str = "spd",
) -> pd.DataFrame:
    """Mean accuracy over ``tasks`` (acc_norm where a task has it) per budget (rows) and variant (columns).

    Every plan is evaluated with lm-eval on one launch of the TP ranks (``suite.accuracy.evaluate``), which
    appends one row per task and metric to ``results`` and skips the tasks already there."""
    from suite.accuracy.evaluate import evaluate

    mean = {}
    per_plan = evaluate(
        model,
        tp,
        [(strategy, {"plan": str(path)}, command) for path in paths.values()],
        tasks,
        limits,
        folder,
        results,
        device=device,
        backend=backend,
        timeout=timeout,
        batch_size=batch_size,
    )
    for key, rows in zip(paths, per_plan):
        scores = {(r.scenario.task, r.scenario.metric): r.values["value"] for r in rows}
        mean[key] = sum(scores.get((t, "acc_norm"), scores.get((t, "acc"), float("nan"))) for t in tasks) / len(tasks)
    return _table(mean)
