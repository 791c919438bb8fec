"""Baseline Megatron tensor parallelism: two all-reduces per block.

    H   = X + AR(Y_i),  Y_i = o_proj_i(Attn_i(RMSNorm1(X)))
    out = H + AR(Z_i),  Z_i = MLP_i(RMSNorm2(H))
"""

from dataclasses import dataclass

from suite.parallel.strategy import Strategy, register


@register("baseline")
@dataclass
class Baseline(Strategy):
    def run_layers(self, layers, h, comm, ctx):
        for layer in layers:
            h = h + comm.all_reduce(layer.attn(h, ctx))
            h = h + comm.all_reduce(layer.ffn(h))
        return h
