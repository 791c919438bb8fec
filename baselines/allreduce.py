"""Baseline Megatron tensor parallelism: two all-reduces per block.

    H   = X + AR(Y_i),  Y_i = o_proj_i(Attn_i(RMSNorm1(X)))
    out = H + AR(Z_i),  Z_i = MLP_i(RMSNorm2(H))

Megatron's modules on the default schedule (``suite.parallel.strategy.all_reduce_each``).
"""

from dataclasses import dataclass

from suite.parallel.strategy import Strategy, register


@register("baseline")
@dataclass
class Baseline(Strategy):
    pass
