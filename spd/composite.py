"""SPD composed with an overlap schedule: the syncs an SPD plan leaves, deferred or overlapped.

A composite is SPD's plan (which blocks drop their attention sync, with the plan's head grouping
and B2B weights: ``SPD.modules``, ``layout``, ``weights``) on another strategy's schedule of the
remaining syncs (its ``run_layers``), by inheritance and nothing else:

    spd+ladder      x_k = x_{k-1} + AR(m_k(x_{k-2})) over SPD's modules m_k (ladder's schedule;
                    its option ``layers`` picks the blocks whose syncs are deferred, default all)
    spd+tokenweave  SPD's modules, each sync split-overlapped as TokenWeave does (its options);
                    the same model as ``spd`` up to summation order

An empty drop set gives the plain overlap strategy; the plain ``spd`` is SPD's modules on the
default schedule. Options: those of ``spd`` (``plan`` or ``blocks``) and of the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.ladder import Ladder
from baselines.tokenweave import TokenWeave
from spd.strategy import SPD
from suite.parallel.strategy import register


@register("spd+ladder")
@dataclass
class SPDLadder(SPD, Ladder):
    def __post_init__(self):
        SPD.__post_init__(self)
        Ladder.__post_init__(self)


@register("spd+tokenweave")
@dataclass
class SPDTokenWeave(SPD, TokenWeave):
    def __post_init__(self):
        SPD.__post_init__(self)
        TokenWeave.__post_init__(self)
