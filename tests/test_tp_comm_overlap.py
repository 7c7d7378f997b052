"""Megatron-Core ``--tp-comm-overlap``: TP all-gather / reduce-scatter pipelined with their GEMMs.

What the plan option means (Transformer Engine userbuffers, Megatron-Core docs): with sequence
parallelism, the all-gather of a column-parallel layer's input runs while that layer's GEMM
consumes the slices already received, and the reduce-scatter of a row-parallel layer's output runs
while the GEMM produces it. Checked here: the dependency structure that says so, the bounds it puts
on the simulated step (it can hide at most all TP communication and never costs time), and the
plan rules Megatron enforces (it needs TP > 1 and SP).
"""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.graph.graph import build_graph
from tensorstage.hardware.system import load_system
from tensorstage.lower import graph_options, lower
from tensorstage.lower.blocks import lower_blocks
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind, NodeKind
from tensorstage.sim import simulate
from tests.support import megatron_gpt

SPEC = megatron_gpt(L=2, h=1024, a=16, V=4096, s=1024)


def _plan(overlap: bool, **kw) -> ParallelPlan:
    return ParallelPlan.parse(dict(tp=4, sp=True, seq=1024, tp_comm_overlap=overlap, **kw), where="plan")


def _dense_block(overlap: bool):
    plan = _plan(overlap)
    opts = graph_options(plan, None)
    blocks = lower_blocks(build_graph(SPEC, opts.phase, opts), plan, overlap_tp_comm=overlap)
    return blocks["dense"]


def _tp(node, kind: CollKind) -> bool:
    return node.kind == NodeKind.COLL and node.comm == kind and node.axes == ("tp",)


def test_forward_all_gather_starts_with_its_gemm_and_reduce_scatter_with_its_producer() -> None:
    fwd = _dense_block(True).forward
    gathers = [i for i, n in enumerate(fwd) if _tp(n, CollKind.ALL_GATHER)]
    scatters = [i for i, n in enumerate(fwd) if _tp(n, CollKind.REDUCE_SCATTER)]
    assert len(gathers) == 2 and len(scatters) == 2  # SP: before QKV and FC1; after out-proj and FC2
    for g in gathers:
        gemm = next(i for i in range(g + 1, len(fwd)) if fwd[i].gemm is not None)
        assert g not in fwd[gemm].deps  # the GEMM does not wait for the whole gather ...
        assert set(fwd[gemm].deps) == set(fwd[g].deps)  # ... it starts when the gather starts
        readers = [i for i in range(gemm + 1, len(fwd)) if g in fwd[i].deps]
        assert readers, "something after the GEMM must wait for the gather"
    for r in scatters:
        gemm = max(i for i in range(r) if fwd[i].gemm is not None)
        assert set(fwd[r].deps) == set(fwd[gemm].deps)  # issued with the GEMM that produces it
        assert any(r in fwd[i].deps for i in range(r + 1, len(fwd)))  # the residual waits for it


def test_without_the_option_every_tp_collective_blocks_the_stream() -> None:
    fwd = _dense_block(False).forward
    for i, n in enumerate(fwd):
        if _tp(n, CollKind.ALL_GATHER) or _tp(n, CollKind.REDUCE_SCATTER):
            assert fwd[i + 1].deps == (i,)  # the next node waits for the collective


def test_overlap_hides_time_but_never_more_than_the_tp_communication() -> None:
    """t(no overlap) - TP comm busy <= t(overlap) < t(no overlap)."""
    system = load_system("dgx-h100-superpod", 4)
    out = {}
    for ov in (False, True):
        low = lower(SPEC, _plan(ov, micro_batch=1, global_batch=2), fuse=True)
        out[ov] = simulate(low.programs, low.mesh, system, tokens_per_step=low.tokens_per_step)
    plain, overlapped = out[False], out[True]
    tp_busy = sum(v for k, v in plain.classes[0].comm_busy_s.items() if k.endswith("/tp"))
    assert tp_busy > 0
    assert overlapped.step_time_s < plain.step_time_s
    assert overlapped.step_time_s >= plain.step_time_s - tp_busy
    # the FLOPs are the same: overlapping moves time, not work
    assert overlapped.classes[0].executed_flops == plain.classes[0].executed_flops


@pytest.mark.parametrize("kw", [dict(tp=1, sp=False), dict(tp=4, sp=False)])
def test_needs_tp_and_sequence_parallelism(kw: dict) -> None:
    with pytest.raises(SpecError) as exc:
        ParallelPlan.parse(dict(tp_comm_overlap=True, seq=1024, **kw), where="plan")
    assert exc.value.field == "tp_comm_overlap"
