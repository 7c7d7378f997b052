"""Megatron-Core ``--tp-comm-overlap``: TP all-gather / reduce-scatter pipelined with their GEMMs.

What the plan option means (Transformer Engine userbuffers, Megatron-Core docs): with sequence
parallelism, the all-gather of a column-parallel layer's input runs while that layer's GEMM
consumes the slices already received, and the reduce-scatter of a row-parallel layer's output runs
while the GEMM produces it. Checked here: the dependency structure that says so, the bounds it puts
on the simulated step (it can hide at most all TP communication; on large GEMMs it saves time, the
chunked GEMMs costing less than the transfers they hide), Transformer Engine's GEMM chunking, and the
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
from tensorstage.sim.compute import fused_parts
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


def _gemm_parts(node) -> list[tuple]:
    """The GEMM shapes a node runs: its own, or its chunks' (Transformer Engine's split GEMMs)."""
    parts = fused_parts(node.op)
    if parts is not None:
        return [p[4] for p in parts if p[4] is not None]
    return [node.gemm] if node.gemm is not None else []


def test_forward_all_gather_starts_with_its_gemm_and_reduce_scatter_with_its_producer() -> None:
    fwd = _dense_block(True).forward
    gathers = [i for i, n in enumerate(fwd) if _tp(n, CollKind.ALL_GATHER)]
    scatters = [i for i, n in enumerate(fwd) if _tp(n, CollKind.REDUCE_SCATTER)]
    assert len(gathers) == 2 and len(scatters) == 2  # SP: before QKV and FC1; after out-proj and FC2
    for g in gathers:
        gemm = next(i for i in range(g + 1, len(fwd)) if _gemm_parts(fwd[i]))
        assert g not in fwd[gemm].deps  # the GEMM does not wait for the whole gather ...
        assert set(fwd[gemm].deps) == set(fwd[g].deps)  # ... it starts when the gather starts
        readers = [i for i in range(gemm + 1, len(fwd)) if g in fwd[i].deps]
        assert readers, "something after the GEMM must wait for the gather"
    for r in scatters:
        gemm = max(i for i in range(r) if _gemm_parts(fwd[i]))
        assert set(fwd[r].deps) == set(fwd[gemm].deps)  # issued with the GEMM that produces it
        assert any(r in fwd[i].deps for i in range(r + 1, len(fwd)))  # the residual waits for it


def test_without_the_option_every_tp_collective_blocks_the_stream() -> None:
    fwd = _dense_block(False).forward
    for i, n in enumerate(fwd):
        if _tp(n, CollKind.ALL_GATHER) or _tp(n, CollKind.REDUCE_SCATTER):
            assert fwd[i + 1].deps == (i,)  # the next node waits for the collective


def test_overlapped_gemms_run_in_transformer_engine_chunks() -> None:
    """Transformer Engine's default comm-GEMM overlap (``module/base.py`` ``initialize_ub``):
    "ring_exchange" (qkv/fc1 forward, proj/fc2 input gradient) splits the GEMM over its tokens into
    tp chunks as the gathered slices arrive; "pipeline" (proj/fc2 forward, then reduce-scatter)
    into 4; the weight-gradient GEMMs ("bulk") run whole. FLOPs and bytes are unchanged."""
    plain, chunked = _dense_block(False), _dense_block(True)
    tp, tokens = 4, 1024
    for chain in ("forward", "backward"):
        p = {n.name: n for n in getattr(plain, chain)}
        for n in getattr(chunked, chain):
            parts = _gemm_parts(n)
            if n.name not in p or not parts:
                continue
            assert (n.flops, n.tensor_bytes) == (p[n.name].flops, p[n.name].tensor_bytes)
            whole = p[n.name].gemm
            if len(parts) > 1:
                assert sum(g[1] for g in parts) == whole[1] == tokens and {g[2:] for g in parts} == {whole[2:]}
    fwd = {n.name: len(_gemm_parts(n)) for n in chunked.forward}
    assert fwd["attn.q_proj"] == fwd["mlp.fc1"] == tp  # ring exchange
    assert fwd["attn.o_proj"] == fwd["mlp.down_proj"] == 4  # pipeline
    bwd = {n.name: len(_gemm_parts(n)) for n in chunked.backward}
    assert bwd["mlp.down_proj.grad_x:mlp.act"] == tp  # fc2 dgrad: ring exchange on the gathered dY
    assert all(v == 1 for k, v in bwd.items() if ".grad_w:" in k and v)  # wgrad: bulk, whole


def test_overlap_hides_time_but_never_more_than_the_tp_communication() -> None:
    """t(no overlap) - TP comm busy <= t(overlap) < t(no overlap), on GEMMs large enough that TE's
    chunking costs less than the communication it hides (h 4096, 2048 tokens, TP 4)."""
    spec = megatron_gpt(L=2, h=4096, a=32, V=4096, s=2048)
    system = load_system("dgx-h100-superpod", 4)
    out = {}
    for ov in (False, True):
        plan = ParallelPlan.parse(dict(tp=4, sp=True, seq=2048, tp_comm_overlap=ov, micro_batch=1, global_batch=2),
                                  where="plan")
        low = lower(spec, plan, fuse=True)
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
