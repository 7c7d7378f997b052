"""Replaying a TP2 x PP2 x DP2 plan on 8 real gloo processes (loopback: runs on any machine).

Independent expectations, computed here from the lowered Programs and the mesh, not from the
replay code: every rank runs exactly the communication nodes of its class whose group has more
than one member (plus every send/recv), in increasing node id (a topological order), one after
another; the Perfetto file has one track per rank and the simulated classes beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import megatron_gpt

from tensorstage.lower import lower
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.replay.bench import make_links
from tensorstage.replay.step import replay_programs, step_dict
from tensorstage.replay.timeline import replay_trace_events
from tensorstage.schedule.program import NodeKind


def test_tp2_pp2_dp2_step_replays_every_communication_node_in_order(tmp_path: Path) -> None:
    plan = ParallelPlan(tp=2, pp=2, dp=2, sp=True, zero=1, seq=128, global_batch=4, micro_batch=1)
    lw = lower(megatron_gpt(L=2, h=256, a=8, V=1024, s=128), plan, fuse=True)
    mesh = lw.mesh
    assert mesh.world == 8
    res = replay_programs(lw.programs, mesh, make_links(8, 1.0, 0.0), system="dgx-h100-superpod", scale=0.05,
                          network="loopback", timeout_s=240)
    for r, out in enumerate(res.results):
        prog = next(p for p in lw.programs if all(mesh.coord(r, a) == v for a, v in p.class_key.items()))
        expected = [n.id for n in prog.nodes
                    if n.kind in (NodeKind.SEND, NodeKind.RECV) or (n.kind == NodeKind.COLL and mesh.size(*n.axes) > 1)]
        ran = [res.rank_ops.origin[r][rec["i"]][1] for rec in out["records"]]
        assert ran == expected, f"rank {r}"
        times = [(rec["start_ns"], rec["end_ns"]) for rec in out["records"]]
        assert all(a[1] <= b[0] for a, b in zip(times, times[1:], strict=False))
    doc = step_dict(res)
    kinds = {k for pc in doc["per_class"] for k in pc["by_kind"]}
    assert {"all_gather", "reduce_scatter", "send_recv"} <= kinds
    assert all(pc["comm_measured_s"] > 0 and pc["comm_simulated_s"] > 0 for pc in doc["per_class"])
    assert doc["collectives"] == "p2p"
    for pc in doc["per_class"]:  # the p2p ring reduce-scatter is the simulator's: the same alpha-beta time
        rs = pc["by_kind"]["reduce_scatter"]
        assert rs["algorithm_model_s"] == pytest.approx(rs["simulated_s"], rel=1e-3)  # sizes rounded to floats
    events = replay_trace_events(res)["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert {f"replay rank {r}" for r in range(8)} <= names
    assert sum(n.startswith("simulated") for n in names) == len(lw.programs)
    json.dumps(events)


def test_dp0_slice_keeps_tp_groups_and_pipeline_pairs_and_counts_what_it_leaves_out() -> None:
    from tensorstage.replay.program import rank_ops, slice_ranks

    plan = ParallelPlan(tp=2, pp=2, dp=2, sp=True, zero=1, seq=128, global_batch=4, micro_batch=1)
    lw = lower(megatron_gpt(L=2, h=256, a=8, V=1024, s=128), plan, fuse=True)
    members = slice_ranks(lw.mesh, {"dp": 0})
    assert members == [0, 1, 4, 5]  # Megatron order: tp innermost (stride 1), dp stride 2, pp stride 4
    ro = rank_ops(lw.programs, lw.mesh, ranks=members)
    assert sorted(ro.groups) == [[0, 1], [2, 3]]  # the two TP groups, in process indices
    peers = {(i, o.peer) for i, ops in enumerate(ro.ops) for o in ops if o.kind in ("send", "recv")}
    assert peers == {(0, 2), (2, 0), (1, 3), (3, 1)}  # pipeline neighbours stay inside the slice
    dp_nodes = sum(1 for r in members for n in next(p for p in lw.programs if p.class_key["pp"] == lw.mesh.coord(r, "pp")).nodes
                   if n.kind == NodeKind.COLL and "dp" in n.axes)
    assert sum(ro.skipped.values()) == dp_nodes > 0
