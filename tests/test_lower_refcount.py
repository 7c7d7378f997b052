"""Lowered programs are freed by reference counting, not left in reference cycles for the collector.

Why it matters: a step's millions of nodes held in a cycle survive until a full collection, and every
collector pass in between walks them (6.8 of ~80 CPU s on the explorer's benchmark sample, before the
stage builder <-> data-parallel emitter cycle was broken; ``tensorstage.gcpause``). Checked with the
collector off: after the programs are dropped, a collection must find no program node among the
unreachable objects (``gc.DEBUG_SAVEALL`` keeps what it would have freed).
"""

from __future__ import annotations

import gc

import pytest

from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import Node, Program


@pytest.mark.parametrize("zero", [1, 3])
def test_lowered_programs_leave_no_cyclic_garbage(zero: int) -> None:
    spec = resolve_model("gpt3-1.3b")
    plan = ParallelPlan.parse(dict(tp=2, pp=2, dp=2, zero=zero, seq=1024, micro_batch=1, global_batch=8))
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        low = lower(spec, plan, fuse=True)
        nodes = sum(len(p.nodes) for p in low.programs)
        del low
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, Node | Program)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    assert nodes > 100  # a real step was lowered
    assert cyclic == []
