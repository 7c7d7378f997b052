"""The summary from what the engine recorded (COMP keys, communication labels) equals the summary
that reads every node again (an Execution built by hand has no such record)."""

from __future__ import annotations

import dataclasses

import pytest

from tensorstage.hardware import load_system
from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.sim.engine import execute
from tensorstage.sim.machine import machine_from_system
from tensorstage.sim.result import summarize


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300), path
    else:
        assert a == b, path


@pytest.mark.parametrize("plan, contention", [
    (dict(tp=2, pp=2, dp=2, sp=True, zero=1, recompute="selective", micro_batch=1, global_batch=8), False),
    (dict(tp=2, pp=2, dp=2, vpp=2, schedule="interleaved", zero=3, micro_batch=1, global_batch=8), True),
    (dict(tp=1, pp=1, dp=8, zero=0, micro_batch=2, global_batch=16), False),
])
def test_recorded_keys_give_the_node_summary(plan, contention):
    spec = resolve_model("megatron-1.7b")
    p = ParallelPlan.parse({**plan, "seq": 512})
    low = lower(spec, p, fuse=True)
    machine = dataclasses.replace(machine_from_system(load_system("dgx-a100-selene", 8), p.dtype),
                                  link_contention=contention)
    ex = execute(low.programs, low.mesh, machine)
    assert ex.comp_keys is not None and ex.comm_labels is not None
    assert [len(lab[0]) for lab in ex.comm_labels] == [sum(n.kind != 4 for n in prog.nodes) for prog in ex.programs]
    fast = summarize(ex)
    slow = summarize(dataclasses.replace(ex, comp_keys=None, comm_labels=None))
    _close(dataclasses.asdict(fast), dataclasses.asdict(slow))
    assert fast.classes[0].executed_flops == sum(n.flops for n in ex.programs[0].nodes)
