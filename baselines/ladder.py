"""Ladder Residual (Zhang et al., arXiv 2501.06589): each module's all-reduce overlaps the next module.

Modules 1..2L (odd attention, even MLP). Standard: x_k = x_{k-1} + AR(h_k(x_{k-1})). Ladder:

    x_k = x_{k-1} + AR(h_k(x_{k-2}))   (modules k-1 and k in ladder layers; else h_k(x_{k-1}))

The output of a ladder module reaches the stream one module late: its all-reduce is issued
async and waited just before the module after next reads the stream. Per ladder layer:

    wait(attn_prev); r = r + attn_prev_out
    a = Attn_l(RMSNorm1(r)); attn_prev = AR(a, async)
    wait(mlp_prev);  r = r + mlp_prev_out
    m = MLP_l(RMSNorm2(r));  mlp_prev = AR(m, async)

A non-ladder layer first flushes (waits and adds) the pending outputs; so does the end of the
stack. This changes the model: pretrained weights without retraining lose accuracy. The schedule
runs on the strategy's modules: ``spd+ladder`` defers the syncs an SPD plan leaves the same way.
"""

import functools
from collections import deque
from dataclasses import dataclass

from suite.parallel.strategy import ResidualStream, Strategy, StrategyError, register
from suite.vocabulary import parse_blocks


@register("ladder")
@dataclass
class Ladder(Strategy):
    layers: str = "all"  # "all", "last:K", or 0-based layer indices "3,4,7" ("" for none)

    exact = False
    changes_model = True

    def __post_init__(self):
        parse_blocks(self.layers, None, "layers", StrategyError)  # bad syntax fails before any rank starts

    def ladder_layers(self, n_layers: int) -> frozenset[int]:
        return _ladder_layers(self.layers, n_layers)

    def run_layers(self, layers, h, comm, ctx):
        return ladder_schedule(self.stack(layers), h, comm, ctx, self.ladder_layers(len(layers)))


@functools.cache
def _ladder_layers(layers: str, n_layers: int) -> frozenset[int]:
    """The blocks ``layers`` names in a stack of ``n_layers`` (parsed once, not on every forward)."""
    return frozenset(parse_blocks(layers, n_layers, "layers", StrategyError))


def ladder_schedule(modules, h, comm, ctx, ladder: set[int]):
    """The modules' all-reduces, those of modules in ``ladder`` blocks waited one module late."""
    x = ResidualStream(h)
    pending = deque()  # async all-reduces of ladder outputs not yet in the stream, oldest first

    def flush(keep):
        while len(pending) > keep:
            x.add(pending.popleft())

    for module in modules:
        if module.layer not in ladder:
            flush(0)
            x.add(comm.all_reduce(x.run(module, ctx)))
            continue
        flush(1)  # add the module before last; the previous one stays in flight
        pending.append(comm.all_reduce(x.run(module, ctx), async_op=True))
    flush(0)
    return x.value()
