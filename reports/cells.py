"""The page's shared vocabulary: table cells, n/a with its reason, a change vs the baseline as a cell,
scenario values as text, the reference strategies and the scenario fields a latency row is compared
within."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCENARIO = ["batch", "prompt_len", "new_tokens", "dtype", "device", "decode_mode", "kernels"]
SCENARIO_LABELS = {
    "batch": "batch",
    "prompt_len": "prompt",
    "new_tokens": "new tokens",
    "dtype": "dtype",
    "device": "device",
    "decode_mode": "decode",
    "kernels": "kernels",
}
GROUP = ["model", "provenance", "device_profile", "interconnect", "tp", *SCENARIO]
REFERENCE = "baseline"
BOUND = "nocomm"
# How latency rows were obtained, in the order the page shows them; the CPU's last and apart.
SETTINGS = {"simulated": "simulated", "gpu": "measured on GPUs", "projected": "projected", "cpu": "measured on the CPU"}


@dataclass
class Cell:
    text: str
    css: str = ""  # "na" for n/a cells, "ref" for links to commands and environments
    links: tuple = ()  # (text, href) pairs shown after the text


def na(reason: str) -> Cell:
    return Cell(f"n/a: {reason}", "na")


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def plain(value) -> str:
    """A scenario value as text: '' when missing, integral floats without '.0'."""
    if missing(value):
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def change_cell(r, change, random: bool, fill) -> str | Cell:
    """Row ``r``'s accuracy or perplexity change vs the baseline (``change``, with a ``text()``): n/a for
    a model that is not usable or has random weights, ``fill()`` (an n/a with its command) when missing."""
    if not r.usable_model:
        return na("not a usable model")
    if r.strategy == REFERENCE:
        return "0 (reference)"
    if change is not None:
        return change.text()
    if random:
        return na("random weights: accuracy says nothing")
    return fill()
