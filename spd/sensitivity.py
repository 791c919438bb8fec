"""Block sensitivity to SPD (the paper's Algorithm 1, first step).

Drop the attention sync progressively from the last block backwards; after each step measure
perplexity on calibration text. With P(k) = perplexity with SPD on blocks k..L-1 (P(L): none),

    sensitivity(k) = P(k) - P(k + 1)

The output JSON is rewritten atomically after every step and re-read on start, so an
interrupted analysis continues where it stopped (with the same settings).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from spd.data import calibration_windows
from spd.plan import PlanError, write_json_atomic
from spd.ppl import sensitivity_job
from suite.parallel import launch as launching
from suite.model.sources import resolve

FORMAT = "spdbench-spd-sensitivity"
SETTINGS = ("model", "tp", "calib", "samples", "seq_len", "seed")


def _save_step(path: str, state: dict, k: int, ppl: float) -> None:
    state["ppl"][str(k)] = ppl
    state["sensitivity"] = sensitivities(state)
    write_json_atomic(Path(path), state)


def sensitivities(state: dict) -> dict[str, float]:
    ppl = {int(k): v for k, v in state["ppl"].items()}
    return {str(k): ppl[k] - ppl[k + 1] for k in sorted(ppl) if k + 1 in ppl}


def load_sensitivity(path: str | Path) -> dict:
    try:
        state = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"sensitivity file {path} not found: run `spdbench spd sensitivity` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"sensitivity file {path} is not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PlanError(f"{path} is not an SPD sensitivity file")
    return state


def analyse(model: str, tp: int, out: str | Path, calib: str | None = None, samples: int = 8,
            seq_len: int = 256, seed: int = 0, batch: int = 8, device: str = "cpu", backend: str = "auto",
            timeout_s: float = launching.DEFAULT_TIMEOUT_S) -> dict:
    """Run (or resume) the analysis; returns the finished state."""
    source = resolve(model)
    windows = calibration_windows(source, calib, samples, seq_len, seed)
    settings = dict(model=source.identity, tp=tp, calib=calib or "calibration_wiki/wiki.utf8", samples=samples,
                    seq_len=seq_len, seed=seed)
    n_layers = source.config.num_hidden_layers
    out = Path(out)
    state = {"format": FORMAT, "version": 1, **settings, "n_layers": n_layers, "ppl": {}, "sensitivity": {}}
    if out.exists():
        previous = load_sensitivity(out)
        changed = [k for k in SETTINGS if previous.get(k) != settings[k]]
        if changed:
            raise PlanError(f"{out} holds an analysis with other settings ({changed[0]}={previous.get(changed[0])!r}): "
                            "use another --out or delete it")
        state = previous
    steps = [k for k in range(n_layers, -1, -1) if str(k) not in state["ppl"]]
    if steps:
        save = functools.partial(_save_step, str(out), state)
        launching.launch(sensitivity_job, tp, model,
                         windows, batch, steps, save, device=device, backend=backend, timeout_s=timeout_s)
        state = load_sensitivity(out)
    return state


def rows(state: dict, command: str) -> list:
    """Result rows (kind ``spd_sensitivity``) for the results store."""
    from suite.results import Row, SensitivityScenario, environment

    env, ppl = environment(), state["ppl"]
    return [Row(scenario=SensitivityScenario(model=state["model"], strategy="spd", tp=state["tp"],
                                             strategy_options={"blocks": f"{block}..{state['n_layers'] - 1}"},
                                             block=int(block), calib=state["calib"], samples=state["samples"],
                                             seq_len=state["seq_len"], seed=state["seed"]),
                values={"sensitivity": s, "ppl": ppl[block]}, env=env, command=command)
            for block, s in sorted(state["sensitivity"].items(), key=lambda kv: int(kv[0]))]
