"""No-communication bound: every all-reduce replaced by the identity on the local partial.

    H   = X + Y_i
    out = H + Z_i

Right shapes, wrong outputs: its latency is the bound every overlap or drop method approaches.
"""

from dataclasses import dataclass

from suite.parallel.strategy import ResidualStream, Strategy, register


@register("nocomm")
@dataclass
class NoComm(Strategy):
    exact = False
    usable = False

    def run_layers(self, layers, h, comm, ctx):
        x = ResidualStream(h)
        for module in self.stack(layers):
            x.add(x.run(module, ctx))
        return x.value()
