"""``overlap_param_gather`` with pipeline parallelism (Megatron-LM's default ``--align-param-gather``).

Megatron-LM dispatches, with PP, every bucket's parameter all-gather at the start of the schedule on
all stages at once; the forward pre-hooks only wait for them. Without that alignment each stage's
gathers would be dispatched lazily by its first forward and land on the first micro-batch's path
through the whole pipeline (the bug this file guards against: the option made every PP step slower).
"""

from __future__ import annotations

from tensorstage.hardware.system import load_system
from tensorstage.lower import lower
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind, NodeKind
from tensorstage.sim import simulate
from tests.support import megatron_gpt

SPEC = megatron_gpt(L=16, h=2048, a=16, V=32000, s=2048)


def _plan(opg: bool) -> ParallelPlan:
    return ParallelPlan.parse(dict(tp=2, pp=4, dp=8, seq=2048, micro_batch=1, global_batch=64, zero=1, sp=True,
                                   overlap_param_gather=opg), where="plan")


def test_every_stage_dispatches_its_parameter_gathers_before_any_compute() -> None:
    low = lower(SPEC, _plan(True))
    for prog in low.programs:
        gathers = [n for n in prog.nodes if n.kind == NodeKind.COLL and n.comm == CollKind.ALL_GATHER
                   and n.axes == ("dp",) and ".param" in n.name]
        assert gathers
        ids = {n.id for n in gathers}
        for n in gathers:  # the first depends on nothing, each next one only on the one before
            assert set(n.data_deps) <= ids and len(n.data_deps) <= 1
        assert sum(1 for n in gathers if not n.data_deps) == 1


def test_overlapping_the_parameter_gather_never_slows_a_pipelined_step() -> None:
    system = load_system("dgx-h100-superpod", 64)
    times = {}
    for opg in (False, True):
        low = lower(SPEC, _plan(opg), fuse=True)
        times[opg] = simulate(low.programs, low.mesh, system, tokens_per_step=low.tokens_per_step).step_time_s
    assert times[True] <= times[False]
