"""The perplexity sweep: WikiText-2 test perplexity for SPD budgets x variants.

Variants: ``zs`` (every SPD block zero-shot), ``zs+b2b`` (SB and ESB blocks distilled),
``zs+b2b+hg`` (ESB blocks head-grouped, then distilled). Each block is classified once, with
thresholds from all blocks' sensitivities, so a block's mode does not depend on the budget:
the blocks are distilled once (for the 100% plan) and every budget uses the n least sensitive
of them. Distilling a block uses only its inputs in the unmodified model, so this equals
distilling per budget. Perplexity is measured on N ranks (rank 0 computes the loss).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spd.data import wikitext2_windows
from spd.distill import WEIGHTS_FILE, distill
from spd.plan import PlanError, VARIANTS, load_plan, make_plan, restrict
from spd.ppl import ppl_job
from spd.sensitivity import load_sensitivity
from suite.parallel import launch as launching
from suite.results import PerplexityScenario, ResultStore, Row, environment
from suite.model.sources import resolve


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
    hg.distill["heldout_mse"] = {**{b: r for b, r in b2b.distill["heldout_mse"].items() if int(b) not in esb},
                                 **hg.distill["heldout_mse"]}
    for variant, plan, tensors in (("zs+b2b", b2b, b2b_tensors), ("zs+b2b+hg", hg, shared | hg_tensors)):
        paths[variant].parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(paths[variant].parent / WEIGHTS_FILE))
        plan.weights = WEIGHTS_FILE
        plan.save(paths[variant])
    return paths


def sweep(model: str, tp: int, sensitivity: str | Path, budgets: list[int], settings, out: str | Path,
          eval_samples: int, eval_seq_len: int, results: str | Path | None, command: str, *, device: str = "cpu",
          backend: str = "auto", timeout: float = launching.DEFAULT_TIMEOUT_S) -> pd.DataFrame:
    """Perplexity per budget (rows) and variant (columns); rows already in ``results`` are reused."""
    state = load_sensitivity(sensitivity)
    source = resolve(model)
    if (state["model"], state["tp"]) != (source.identity, tp):
        raise PlanError(f"{sensitivity} is for {state['model']} at N={state['tp']}, "
                        f"not {source.identity} at N={tp}")
    out = Path(out)
    full = _distilled(state, out, settings, model)
    configs = {}  # (budget, variant) -> strategy options
    for b in budgets:
        for variant in VARIANTS:
            if variant == "zs":
                path = make_plan(state, f"{b}%", variant="zs").save(out / "zs" / f"plan-{b}.json")
            else:
                path = restrict(load_plan(full[variant]), f"{b}%").save(full[variant].parent / f"plan-{b}.json")
            configs[b, variant] = {"plan": str(path)}
    windows = wikitext2_windows(source, eval_samples, eval_seq_len)
    scenarios = {key: PerplexityScenario(model=source.identity, strategy="spd", strategy_options=configs[key], tp=tp,
                                         dataset="wikitext2-test", tokens=windows.numel(), seq_len=eval_seq_len,
                                         budget_pct=key[0], spd_variant=key[1]) for key in configs}
    store = ResultStore(results) if results else None
    done = {r["cell_id"]: r["ppl"] for r in store.rows() if r.get("status") == "ok"} if store else {}
    todo = [key for key in configs if scenarios[key].cell_id not in done]
    runs = sorted({(0, "zs") if b == 0 else (b, v) for b, v in todo})  # a 0% budget is the same model for all
    ppl = launching.launch(ppl_job, tp, model, [("spd", configs[k]) for k in runs], windows, 8,
                           device=device, backend=backend, timeout_s=timeout) if runs else []
    measured = dict(zip(runs, ppl))
    env = environment()
    rows = [Row(scenario=scenarios[key], values={"ppl": measured[(0, "zs") if key[0] == 0 else key]}, env=env,
                command=command) for key in todo]
    if store:
        store.append(*rows)
    table = {key: done[scenarios[key].cell_id] for key in configs if key not in todo}
    table |= {key: row.values["ppl"] for key, row in zip(todo, rows)}
    frame = pd.Series(table).rename_axis(["budget_pct", "spd_variant"]).unstack()
    return frame[list(VARIANTS)]
