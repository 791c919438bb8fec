"""Strategies: how the decoder stack is scheduled and synchronised.

A strategy owns the schedule and nothing else: given the rank-local blocks (whose ``attn`` and
``ffn`` return partial outputs), the residual stream ``h`` (flat ``[tokens, hidden]``), a
communicator and the forward context, it returns the residual stream after the last block.
Options are dataclass fields, set from ``key=value`` strings. Strategies register by name here
or through the ``spdbench.strategies`` entry-point group from other packages.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import ClassVar

import torch

from suite.comm import Communicator
from suite.llama import Block, ForwardContext, Transformer
from suite.sharding import build_rank_model
from suite.sources import ModelSource

_REGISTRY: dict[str, type[Strategy]] = {}
_BUILTIN_MODULES = ("baselines.allreduce", "baselines.ladder", "baselines.tokenweave", "baselines.seqpar",
                    "baselines.nocomm", "spd.strategy")


class StrategyError(ValueError):
    """Unknown strategy or bad strategy option."""


class Strategy:
    name: ClassVar[str]
    exact: ClassVar[bool] = True  # logits equal the single-device model up to summation order
    usable: ClassVar[bool] = True  # False: a latency bound whose outputs are not a model

    def run_layers(self, layers: list[Block], h: torch.Tensor, comm: Communicator,
                   ctx: ForwardContext) -> torch.Tensor:
        raise NotImplementedError

    def load_model(self, source: ModelSource, tp: int, rank: int, dtype: torch.dtype,
                   device: torch.device) -> Transformer:
        """This rank's model; strategies that change weights or head placement (SPD) override it."""
        return build_rank_model(source, tp, rank, dtype, device)

    def options(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_all() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside the module
                raise
    for ep in entry_points(group="spdbench.strategies"):
        if ep.name not in _REGISTRY:
            register(ep.name)(ep.load())


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _convert(field: dataclasses.Field, value: str):
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "bool": bool}.get(
        str(field.type), str)
    if kind is bool:
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise StrategyError(f"option {field.name}={value!r}: expected true or false")
        return value.lower() in ("1", "true", "yes")
    try:
        return kind(value)
    except ValueError:
        raise StrategyError(f"option {field.name}={value!r}: expected {kind.__name__}") from None


def make_strategy(name: str, options: dict[str, str] | None = None) -> Strategy:
    """Build a registered strategy from string options (as given on the command line)."""
    _load_all()
    if name not in _REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    cls, options = _REGISTRY[name], dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise StrategyError(f"strategy {name!r} has no option {unknown[0]!r} (its options: {known})")
    return cls(**{k: _convert(fields[k], v) if isinstance(v, str) else v for k, v in options.items()})


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StrategyError(f"--strategy-opt {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out
