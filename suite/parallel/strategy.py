"""Strategies: how the decoder stack is scheduled and synchronised.

A strategy owns the schedule and nothing else: given the rank-local blocks (whose ``attn`` and
``ffn`` return partial outputs), the residual stream ``h`` (flat ``[tokens, hidden]``), a
communicator and the forward context, it returns the residual stream after the last block.

A strategy splits into two orthogonal choices: ``modules(layers)``, the stack as modules each of
whose partial outputs one sync completes (Megatron's attention and MLP of every block, unless a
strategy merges some, as SPD does), and ``run_layers``, the schedule of those syncs (by default
each all-reduced before the next module reads the stream). A composite strategy inherits one of
each (``spd+ladder``: SPD's modules on ladder's schedule).

Lifecycle: ``make_strategy(name, options)`` checks the options; ``bind(source, tp)`` checks the
strategy against a model and N and keeps what it needs from them (an SPD plan's blocks); then
``load_model`` builds a rank's shard from the strategy's ``layout`` and ``weights`` (the plain
Megatron shard unless a strategy changes them) and ``run_layers`` runs it (on ``stack(layers)``: the
modules, built on a model's first forward). ``model_key`` names the rank model a strategy runs, so
strategies that run the same one share it.

Strategies are found through the ``spdbench.strategies`` entry-point group (the built-ins
register there too) or registered in-process with ``@register``.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Callable, ClassVar

import torch

from suite.errors import SpdbenchError
from suite.model.llama import Block, ForwardContext, Transformer
from suite.model.sharding import Layout, build_rank_model, default_layout
from suite.model.sources import ModelSource, WeightSource
from suite.parallel.comm import Communicator, Pending
from suite.vocabulary import STRATEGY_ENTRY_POINTS, check_strategy, installed_strategies

_REGISTRY: dict[str, type[Strategy]] = {}


class StrategyError(SpdbenchError):
    """Unknown strategy or bad strategy option."""


@dataclasses.dataclass(frozen=True)
class SyncedModule:
    """A module whose partial output one sync completes: ``partial = run(norm(x), ctx)`` on the
    residual stream ``x``; with ``norm`` None, ``run`` reads the residual stream itself."""

    layer: int  # the block it belongs to
    norm: Callable | None
    run: Callable
    # with norm None: the norm ``run`` applies to x first (an SPD block), passed as run(x, ctx, normed=...)
    # when the stream forms x with it
    stream_norm: Callable | None = None

    def __call__(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.run(h if self.norm is None else self.norm(h), ctx)


class ResidualStream:
    """The residual stream x with its latest addend held back, so that the next module's norm forms the sum
    (``RMSNorm.add_forward``: with compiled kernels the add and the norm are one kernel, as deployments fuse
    them). The sums are the same, in the same order, as adding each addend at once."""

    def __init__(self, h: torch.Tensor):
        self._h, self._addend = h, None

    def add(self, y: torch.Tensor | Pending) -> None:
        """x = x + y; an in-flight ``y`` is waited for once the sums before it are formed (they overlap it)."""
        self._fold()
        self._addend = y.wait() if isinstance(y, Pending) else y

    def run(self, module: SyncedModule, ctx: ForwardContext) -> torch.Tensor:
        """The module's partial output on x."""
        norm = module.norm if module.norm is not None else module.stream_norm
        if self._addend is None or norm is None:
            return module(self.value(), ctx)
        self._h, normed = norm.add_forward(self._h, self._addend)
        self._addend = None
        return module.run(normed, ctx) if module.norm is not None else module.run(self._h, ctx, normed=normed)

    def value(self) -> torch.Tensor:
        """x, its addends summed."""
        self._fold()
        return self._h

    def _fold(self) -> None:
        if self._addend is not None:
            self._h, self._addend = self._h + self._addend, None


def megatron_modules(index: int, layer: Block) -> list[SyncedModule]:
    """Block ``index`` as Megatron syncs it: the attention, then the MLP."""
    return [
        SyncedModule(index, layer.input_layernorm, layer.self_attn),
        SyncedModule(index, layer.post_attention_layernorm, lambda u, ctx: layer.mlp(u)),
    ]


def all_reduce_each(
    modules: list[SyncedModule], h: torch.Tensor, comm: Communicator, ctx: ForwardContext
) -> torch.Tensor:
    """x_k = x_{k-1} + AR(m_k(x_{k-1})): every sync completes before the next module reads the stream."""
    x = ResidualStream(h)
    for module in modules:
        x.add(comm.all_reduce(x.run(module, ctx)))
    return x.value()


class Strategy:
    name: ClassVar[str]
    exact: ClassVar[bool] = True  # logits equal the single-device model up to summation order
    usable: ClassVar[bool] = True  # False: a latency bound whose outputs are not a model
    changes_model: ClassVar[bool] = False  # True: a different model than the pretrained one (no retraining here)

    def modules(self, layers: list[Block]) -> list[SyncedModule]:
        """The decoder stack as synced modules, in order."""
        return [m for i, layer in enumerate(layers) for m in megatron_modules(i, layer)]

    def run_layers(self, layers: list[Block], h: torch.Tensor, comm: Communicator, ctx: ForwardContext) -> torch.Tensor:
        """The residual stream after the stack: the schedule of the modules' syncs."""
        return all_reduce_each(self.stack(layers), h, comm, ctx)

    def stack(self, layers: list[Block]) -> list[SyncedModule]:
        """``modules(layers)``, built on a model's first forward and kept for the next: a decode step does
        not rebuild it in Python."""
        kept = getattr(self, "_stack", None)
        if kept is None or kept[0] is not layers:
            kept = self._stack = (layers, self.modules(layers))
        return kept[1]

    def bind(self, source: ModelSource, tp: int) -> None:
        """Check the strategy against the model and N, keeping what it needs of them; raises StrategyError."""

    def layout(self, config, tp: int) -> Layout:
        """Which heads and FFN columns each rank holds, per block."""
        return default_layout(config, tp)

    def weights(self, source: ModelSource) -> WeightSource:
        """Where the rank model's tensors come from."""
        return source.weights

    def model_key(self) -> str | None:
        """None when the strategy runs the plain shard (shared by all such strategies), else its own key."""
        return None

    def describe(self) -> dict:
        """Row fields that say what the strategy changed (after ``bind``), e.g. SPD's share of blocks."""
        return {}

    def load_model(
        self, source: ModelSource, tp: int, rank: int, dtype: torch.dtype, device: torch.device
    ) -> Transformer:
        """This rank's model, from the strategy's layout and weights (call ``bind`` first)."""
        return build_rank_model(
            dataclasses.replace(source, weights=self.weights(source)),
            tp,
            rank,
            dtype,
            device,
            self.layout(source.config, tp),
        )

    def options(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Every strategy name: the entry points' (without importing them) and those registered in-process."""
    return sorted(installed_strategies() | set(_REGISTRY))


def strategy_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        for ep in entry_points(group=STRATEGY_ENTRY_POINTS, name=name):
            register(name)(ep.load())
    if name not in _REGISTRY:
        check_strategy(name, names(), StrategyError)
    return _REGISTRY[name]


def available() -> list[str]:
    """Every strategy, loaded."""
    for name in names():
        strategy_class(name)
    return sorted(_REGISTRY)


def _convert(field: dataclasses.Field, value: str):
    kind = (
        field.type
        if isinstance(field.type, type)
        else {"int": int, "float": float, "bool": bool}.get(str(field.type), str)
    )
    if kind is bool:
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise StrategyError(f"option {field.name}={value!r}: expected true or false")
        return value.lower() in ("1", "true", "yes")
    try:
        return kind(value)
    except ValueError:
        raise StrategyError(f"option {field.name}={value!r}: expected {kind.__name__}") from None


def make_strategy(name: str, options: dict[str, str] | None = None) -> Strategy:
    """Build a strategy from string options (as given on the command line)."""
    cls, options = strategy_class(name), dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise StrategyError(f"strategy {name!r} has no option {unknown[0]!r} (its options: {known})")
    return cls(**{k: _convert(fields[k], v) if isinstance(v, str) else v for k, v in options.items()})


def bound_strategy(name: str, options: dict | None, source: ModelSource, tp: int) -> Strategy:
    """A strategy checked against the model and N."""
    strategy = make_strategy(name, options)
    strategy.bind(source, tp)
    return strategy
