"""Kernel regimes: which kernels an implementation launches for the model's ops, as data.

A regime (``suite/latency/kernels/*.yaml``: name, description, sources, method) is the pricing
policy a simulated cell applies to the ops the model and the strategy run (``kernels:`` in a cell):

- ``elementwise``: ``per_op`` (one kernel per aten op, PyTorch eager) or ``fused`` (each run of
  elementwise ops between two other kernels is one kernel reading what it takes from outside the run
  and writing what outlives it: Inductor's fusion, or an implementation's hand-fused add + RMSNorm,
  RoPE and SiLU-and-mul kernels);
- ``merged_gemms``: back-to-back GEMMs reading the same input are one wider GEMM (QKV, gate-up);
- ``attention.prefill`` and ``attention.decode``, each ``{keys, mask}``: ``keys`` is ``filled`` (the
  kernel reads the cache positions written so far) or ``static_cache`` (every slot of the static cache,
  prompt + new tokens rounded up to ``attention.cache_multiple``); ``mask`` is ``causal`` (no mask:
  the kernel skips the masked pairs, as FlashAttention does) or ``explicit`` (a boolean mask over the
  keys is read and every pair is computed);
- ``attention.kv_heads``: ``shared`` (GQA inside the kernel) or ``repeated`` (K and V copied to the
  query heads before the kernel, every layer and step);
- ``launches``: the decode launch modes the implementation runs (the cell's ``decode_mode`` picks).

This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from suite.errors import SpdbenchError
from suite.latency.profile_files import read_mapping

REGIME_DIR = Path(__file__).parent / "kernels"
CHOICES = {
    "elementwise": ("per_op", "fused"),
    "keys": ("filled", "static_cache"),
    "kv_heads": ("shared", "repeated"),
    "mask": ("causal", "explicit"),
}
LAUNCHES = ("eager", "cuda_graph")
PHASES = ("prefill", "decode")


class KernelRegimeError(SpdbenchError):
    """A kernel regime is missing or malformed."""


@dataclass(frozen=True)
class KernelRegime:
    """How one implementation turns the model's ops into kernels."""

    name: str
    description: str
    sources: tuple[str, ...]
    method: str
    elementwise: str
    merged_gemms: bool
    attention: dict[str, tuple[str, str]]  # phase (prefill, decode) -> (keys, mask)
    kv_heads: str
    cache_multiple: int
    launches: tuple[str, ...]

    @property
    def fused(self) -> bool:
        return self.elementwise == "fused"

    def static_cache_len(self, max_len: int) -> int:
        """The static cache's length for ``max_len`` positions (rounded up to ``cache_multiple``)."""
        return -(-max_len // self.cache_multiple) * self.cache_multiple

    @classmethod
    def from_dict(cls, data: dict, where: str) -> KernelRegime:
        attention = data.get("attention")
        missing = [
            k
            for k in ("name", "sources", "method", "elementwise", "merged_gemms", "attention", "launches")
            if data.get(k) in (None, "", [], {})
        ]
        if missing:
            raise KernelRegimeError(f"{where}: missing {', '.join(missing)} (a regime states its sources and method)")
        if not isinstance(attention, dict) or not all(isinstance(attention.get(p), dict) for p in PHASES):
            raise KernelRegimeError(f"{where}: attention must give kv_heads and, for prefill and decode, keys and mask")
        values = [("elementwise", data["elementwise"]), ("kv_heads", attention.get("kv_heads"))]
        values += [(k, attention[p].get(k)) for p in PHASES for k in ("keys", "mask")]
        for key, value in values:
            if value not in CHOICES[key]:
                raise KernelRegimeError(f"{where}: {key}={value!r}: choose one of {', '.join(CHOICES[key])}")
        launches = tuple(data["launches"])
        if not launches or not set(launches) <= set(LAUNCHES):
            raise KernelRegimeError(f"{where}: launches must list some of {', '.join(LAUNCHES)}")
        multiple = attention.get("cache_multiple", 1)
        if not isinstance(multiple, int) or multiple < 1:
            raise KernelRegimeError(f"{where}: attention.cache_multiple must be a positive integer")
        sources = data["sources"] if isinstance(data["sources"], list) else [data["sources"]]
        phases = {p: (attention[p]["keys"], attention[p]["mask"]) for p in PHASES}
        return cls(
            data["name"],
            data.get("description", ""),
            tuple(sources),
            data["method"],
            data["elementwise"],
            bool(data["merged_gemms"]),
            phases,
            attention["kv_heads"],
            multiple,
            launches,
        )


def available_regimes() -> list[str]:
    return sorted(p.stem for p in REGIME_DIR.glob("*.yaml"))


def load_regime(name_or_path: str) -> KernelRegime:
    """A shipped kernel regime by name (``compiled``) or a regime file."""
    data, path = read_mapping(name_or_path, REGIME_DIR, "kernels", KernelRegimeError)
    return KernelRegime.from_dict(data, path)
