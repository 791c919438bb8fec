"""Block sensitivity to SPD (the paper's Algorithm 1, first step), and how stable it is.

Drop the attention sync progressively from the last block backwards; after each step measure
perplexity on calibration text. With P(k) = perplexity with SPD on blocks k..L-1 (P(L): none),

    sensitivity(k) = P(k) - P(k + 1)

All L + 1 steps run in one pass per batch of windows, streamed one block at a time
(``spd.ranks``): block i is built once and runs the baseline stream and, for every k <= i, the
stream with SPD from block k on; the lm_head then scores every stream. Memory holds one block
and L + 1 residual streams of a batch of windows (``batch`` sets it), never the whole model.

Every window's negative log-likelihood at every step is kept, so the analysis reports its own
stability (``spd.stability``: a bootstrap over windows). The output JSON is rewritten
atomically after every batch and re-read on start: an interrupted analysis continues where it
stopped (with the same settings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from spd.data import CALIBRATION, calibration_windows
from spd.plan_file import PlanError
from spd.ppl import window_nll
from spd.ranks import BlockStream
from spd.stability import bootstrap
from suite.files import write_json_atomic
from suite.model.sources import resolve

FORMAT, VERSION = "spdbench-spd-sensitivity", 2
SETTINGS = ("model", "tp", "calib", "samples", "seq_len", "seed")


@torch.no_grad()
def progressive_nll(stream: BlockStream, windows: torch.Tensor, progress=None) -> list[list[float]]:
    """``nll[k][w]``: window w's summed NLL with SPD on blocks k..L-1, for k = 0..L (L: no SPD block).
    ``progress.update()`` is called after each block."""
    n_layers = stream.source.config.num_hidden_layers
    x, spd = stream.embed(windows), {}  # the baseline stream; k -> the stream with SPD from block k on
    for i in range(n_layers):
        block = stream.block(i)
        spd = {k: block(h, spd=True) for k, h in spd.items()} | {i: block(x, spd=True)}
        x = block(x)
        del block
        if progress is not None:
            progress.update()
    spd[n_layers] = x
    return [window_nll(stream.ends, spd[k], windows) for k in range(n_layers + 1)]


def load_sensitivity(path: str | Path) -> dict:
    try:
        state = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"sensitivity file {path} not found: run `spdbench spd sensitivity` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"sensitivity file {path} is not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PlanError(f"{path} is not an SPD sensitivity file")
    if state.get("version") not in (1, VERSION):  # version 1: no per-window NLL (plans only, no resume)
        raise PlanError(
            f"sensitivity file {path} has version {state.get('version')!r}; this spdbench reads "
            f"versions 1 and {VERSION}"
        )
    return state


def _finish(state: dict, resamples: int) -> None:
    """Perplexities, sensitivities and the stability report from the per-window NLLs of every window."""
    nll, tokens = state["nll"], state["seq_len"] - 1
    windows = len(nll["0"])
    state["ppl"] = {k: math.exp(sum(v) / (windows * tokens)) for k, v in nll.items()}
    ppl = {int(k): v for k, v in state["ppl"].items()}
    state["sensitivity"] = {str(k): ppl[k] - ppl[k + 1] for k in range(state["n_layers"])}
    state["stability"] = bootstrap([nll[str(k)] for k in range(state["n_layers"] + 1)], tokens, resamples=resamples)


def analyse(
    model: str,
    tp: int,
    out: str | Path,
    calib: str | None = None,
    samples: int = 8,
    seq_len: int = 256,
    seed: int = 0,
    batch: int = 8,
    device: str = "cpu",
    resamples: int = 1000,
) -> dict:
    """Run (or resume) the analysis; returns the finished state."""
    source = resolve(model, device)
    windows = calibration_windows(source, calib, samples, seq_len, seed)
    settings = dict(
        model=source.identity, tp=tp, calib=calib or CALIBRATION, samples=samples, seq_len=seq_len, seed=seed
    )
    n_layers = source.config.num_hidden_layers
    out = Path(out)
    state = {
        "format": FORMAT,
        "version": VERSION,
        **settings,
        "n_layers": n_layers,
        "nll": {str(k): [] for k in range(n_layers + 1)},
        "ppl": {},
        "sensitivity": {},
    }
    if out.exists():
        previous = load_sensitivity(out)
        if previous["version"] != VERSION:
            raise PlanError(
                f"{out} was written by an older spdbench (no per-window NLL to resume from): "
                "delete it or use another --out"
            )
        changed = [k for k in SETTINGS if previous.get(k) != settings[k]]
        if changed:
            raise PlanError(
                f"{out} holds an analysis with other settings ({changed[0]}={previous.get(changed[0])!r}): "
                "use another --out or delete it"
            )
        state = previous
    done = len(state["nll"]["0"])
    if done < samples:
        stream = BlockStream(source, tp, torch.device(device))
        starts = range(done, samples, batch)
        with tqdm(total=len(starts) * n_layers, desc="sensitivity (blocks x window batches)") as progress:
            for start in starts:
                nll = progressive_nll(stream, windows[start : start + batch].to(device), progress)
                for k, values in enumerate(nll):
                    state["nll"][str(k)] += values
                write_json_atomic(out, state)
    if not state["sensitivity"] or state.get("stability", {}).get("resamples") != resamples:
        _finish(state, resamples)
        write_json_atomic(out, state)
    return state


def rows(state: dict, command: str) -> list:
    """Result rows for the results store: ``spd_sensitivity`` per block, ``spd_stability`` per budget."""
    from suite.environment import environment
    from suite.results import Row, SensitivityScenario, StabilityScenario

    env, ppl, stability = environment(), state["ppl"], state["stability"]
    calibration = dict(
        model=state["model"],
        tp=state["tp"],
        calib=state["calib"],
        samples=state["samples"],
        seq_len=state["seq_len"],
        seed=state["seed"],
    )
    interval = stability["sensitivity_interval"]
    out = [
        Row(
            scenario=SensitivityScenario(
                **calibration,
                strategy="spd",
                block=int(block),
                strategy_options={"blocks": f"{block}..{state['n_layers'] - 1}"},
            ),
            values={
                "sensitivity": s,
                "ppl": ppl[block],
                "sensitivity_p05": interval[block][0],
                "sensitivity_p95": interval[block][1],
            },
            env=env,
            command=command,
        )
        for block, s in sorted(state["sensitivity"].items(), key=lambda kv: int(kv[0]))
    ]
    rank, classes = stability["rank_correlation"], stability["class_agreement"]
    for budget, agreement in stability["chosen_set_agreement"].items():
        scenario = StabilityScenario(
            **calibration, strategy="spd", resamples=stability["resamples"], budget_pct=float(budget.rstrip("%"))
        )
        out.append(
            Row(
                scenario=scenario,
                env=env,
                command=command,
                values={
                    "rank_corr_mean": rank["mean"],
                    "rank_corr_p05": rank["p05"],
                    "set_agreement_mean": agreement["mean"],
                    "set_agreement_p05": agreement["p05"],
                    "class_agreement_mean": classes["mean"],
                    "class_agreement_p05": classes["p05"],
                    "baseline_ppl": ppl[str(state["n_layers"])],
                },
            )
        )
    return out
