"""Every field of every lowered node is set.

Why: the lowering's hot path (``StageBuilder.emit_all``) builds nodes without the dataclass
constructor, setting each slot itself (about a third of the lowering's time on the explorer's
benchmark). A field added to ``Node`` and forgotten there would be an unset slot (AttributeError
when read, far from the cause); rebuilding each node through the constructor from its fields
catches it here.
"""

from __future__ import annotations

from dataclasses import fields

import pytest

from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import Node

PLANS = [
    ("gpt3-1.3b", dict(tp=2, pp=2, dp=2, vpp=2, schedule="interleaved", seq=1024, micro_batch=1, global_batch=8,
                       zero=3, recompute="full")),
    ("mixtral-8x7b", dict(tp=2, pp=2, dp=4, ep=4, seq=1024, micro_batch=1, global_batch=16, zero=1,
                          recompute="selective")),
]


@pytest.mark.parametrize(("model", "plan"), PLANS)
def test_every_lowered_node_has_every_field(model: str, plan: dict) -> None:
    low = lower(resolve_model(model), ParallelPlan.parse(plan), fuse=True)
    names = [f.name for f in fields(Node)]
    count = 0
    for prog in low.programs:
        for i, node in enumerate(prog.nodes):
            assert Node(**{k: getattr(node, k) for k in names}) == node
            assert node.id == i
            count += 1
    assert count > 1000
