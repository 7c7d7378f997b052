"""Spans (a block's compute and its one-class collectives run as one event) give exactly the
schedule of the unmerged program: every node's start, end and post time, to the last bit."""

from __future__ import annotations

import dataclasses

import pytest

import tensorstage.sim.engine as engine
from tensorstage.hardware import load_system
from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.parallel.mesh import Mesh
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind, NodeKind, Program
from tensorstage.sim import Machine, execute
from tensorstage.sim.collectives import Fabric, Tier
from tensorstage.sim.compute import ComputeModel
from tensorstage.sim.machine import machine_from_system

PEAK, EFF, LAUNCH = 100e12, 0.5, 2e-6
B0, A0, B1, A1 = 100e9, 1e-6, 10e9, 4e-6


def _machine(slowdown: float) -> Machine:
    comp = ComputeModel(tensor_flops=PEAK * EFF, attention_flops=PEAK * EFF, vector_flops=PEAK / 10,
                        hbm_Bps=1e12, launch_s=LAUNCH, peak_flops=PEAK)
    return Machine(comp, Fabric((Tier("nvl", 8, B0, A0), Tier("ib", 64, B1, A1))), 80 * 2**30, slowdown, "bf16", "t")


def _compute_s(flops: float) -> float:
    return flops / (PEAK * EFF) + LAUNCH


@pytest.fixture
def span_count(monkeypatch):
    """How many spans the engine found, per call of ``engine._spans``."""
    found: list[int] = []
    real = engine._spans

    def counting(*args):
        out = real(*args)
        found.append(sum(1 for x in out if x))
        return out

    monkeypatch.setattr(engine, "_spans", counting)
    return found


def _same_schedule(a, b) -> None:
    assert a.start == b.start and a.end == b.end and a.post == b.post
    assert a.step_time_s == b.step_time_s


def _side_stream_program(side_first_s: float) -> Program:
    """One class: a span ``a -> tp all-reduce -> b`` and, on the dp stream, a collective that starts
    at 0 and a second one queued behind it (it starts when the first ends: inside the span)."""
    p = Program({})
    f = int(1e11)
    dp_bytes = int(side_first_s * B1 / 2)  # two ranks across nodes: ring all-reduce moves S bytes
    p.add("dp1", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=dp_bytes, axes=("dp",))
    p.add("dp2", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=dp_bytes, axes=("dp",))
    p.add("a", NodeKind.COMP, flops=f, op="einsum")
    p.add("tp_ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=2**20, axes=("tp",), data_deps=(2,))
    p.add("b", NodeKind.COMP, flops=f, op="einsum", data_deps=(3,))
    return p


@pytest.mark.parametrize("side_first_s", [1e-3, 2.5e-3])
def test_communication_starting_inside_a_span_slows_its_later_compute(side_first_s, span_count) -> None:
    mesh = Mesh.create([("tp", 8), ("dp", 2)])
    m = _machine(0.5)
    merged = execute([_side_stream_program(side_first_s)], mesh, m)
    plain = execute([_side_stream_program(side_first_s)], mesh, m, merge_chains=False)
    assert span_count[0] == 1
    _same_schedule(merged, plain)
    # dp2 starts when dp1 ends, inside the span (after a started, before b starts): b runs 1.5x
    # slower while dp2 is in flight, which only the unmerged loop or a re-timed span sees
    start_dp2, start_b, end_dp2 = merged.start[1], merged.start[4], merged.end[1]
    assert merged.start[2] < start_dp2 <= start_b
    d, span = _compute_s(1e11), end_dp2 - start_b
    slowed = d if span <= 0 else d * 1.5 if d * 1.5 <= span else span + d - span / 1.5
    assert merged.end[4] - start_b == pytest.approx(slowed, rel=1e-12)
    assert (slowed > d) == (side_first_s > 2e-3)  # the second case re-times b


def test_a_span_stops_before_a_collective_whose_stream_is_busy(span_count) -> None:
    """``a -> dp all-reduce -> b`` while an earlier, long dp collective holds the stream: the dp
    all-reduce waits for it (as unmerged), so the span is cut before it."""
    mesh = Mesh.create([("tp", 8), ("dp", 2)])
    p = Program({})
    p.add("dp_long", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=2**27, axes=("dp",))
    p.add("a", NodeKind.COMP, flops=int(1e10), op="einsum")
    p.add("dp_ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=2**20, axes=("dp",), data_deps=(1,))
    p.add("b", NodeKind.COMP, flops=int(1e10), op="einsum", data_deps=(2,))
    m = _machine(0.25)
    merged, plain = execute([p], mesh, m), execute([p], mesh, m, merge_chains=False)
    assert span_count[0] == 1
    _same_schedule(merged, plain)
    assert merged.start[2] == merged.end[0]  # waited for the stream


def test_a_ready_compute_node_runs_in_a_span_gap(span_count) -> None:
    """Two independent blocks ready at 0: unmerged, the second block's first node runs while the
    first block's collective is in flight; the span must not hide that gap."""
    mesh = Mesh.create([("tp", 8)])
    p = Program({})
    for blk in range(2):
        o = len(p.nodes)
        p.add(f"a{blk}", NodeKind.COMP, flops=int(1e10), op="einsum")
        p.add(f"ar{blk}", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=2**26, axes=("tp",), data_deps=(o,))
        p.add(f"b{blk}", NodeKind.COMP, flops=int(1e10), op="einsum", data_deps=(o + 1,))
    m = _machine(0.0)
    merged, plain = execute([p], mesh, m), execute([p], mesh, m, merge_chains=False)
    assert span_count[0] == 2
    _same_schedule(merged, plain)
    assert merged.start[3] == merged.end[0]  # a1 runs in ar0's gap


@pytest.mark.parametrize("plan, contention", [
    (dict(tp=2, pp=2, dp=2, sp=True, zero=1, recompute="selective", micro_batch=1, global_batch=8), False),
    (dict(tp=2, pp=2, dp=2, vpp=2, schedule="interleaved", zero=3, micro_batch=1, global_batch=8), True),
    (dict(tp=4, pp=1, dp=2, zero=3, micro_batch=1, global_batch=4), False),
    (dict(tp=2, pp=4, dp=1, zero=0, recompute="full", micro_batch=1, global_batch=12), False),
])
def test_lowered_steps_same_schedule_with_and_without_spans(plan, contention, monkeypatch) -> None:
    spec = resolve_model("megatron-1.7b")
    p = ParallelPlan(**plan, seq=1024, dtype="bf16")
    low = lower(spec, p, fuse=True)
    mach = dataclasses.replace(machine_from_system(load_system("dgx-a100-selene"), "bf16"), link_contention=contention)
    assert mach.overlap_slowdown > 0  # the path that re-times a span
    with_spans = execute(low.programs, low.mesh, mach)
    monkeypatch.setattr(engine, "_spans", lambda kind, *rest: [0] * len(kind))
    without = execute(low.programs, low.mesh, mach)
    _same_schedule(with_spans, without)


def _retimed_earlier(mode: str, u: int, f: int, s1: int, s2: int, fa: int, fb: int, fc: int, slow: float):
    """Two messages reach class pp0 during its span ``a -> ar -> b -> ar2 (-> c)``; the second re-times
    the span to an end one ulp *earlier* than the first did (the slowdown formula is not monotone in
    floating point), so the event at the first end is stale and must be skipped, not taken as the
    tail ending a second time (found by review: it double-advanced the tp stream, an IndexError)."""
    rate = 1e12
    comp = ComputeModel(tensor_flops=rate, attention_flops=rate, vector_flops=rate, hbm_Bps=1e15, launch_s=0.0,
                        peak_flops=rate)
    mach = Machine(comp, Fabric((Tier("nvl", 4, 1e11, 0.0), Tier("ib", 64, rate, 0.0))), 80 * 2**30, slow, "bf16", "t")
    p0 = Program({"pp": 0})
    p0.add("r1", NodeKind.RECV, peer_axis="pp", peer_offset=-1, tag=1, comm_bytes=s1)
    p0.add("r2", NodeKind.RECV, peer_axis="pp", peer_offset=1, tag=2, comm_bytes=s2)
    p0.add("a", NodeKind.COMP, flops=fa, op="einsum")
    p0.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=1000, axes=("tp",), data_deps=(2,))
    p0.add("b", NodeKind.COMP, flops=fb, op="einsum", data_deps=(3,))
    p0.add("ar2", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=1000, axes=("tp",), data_deps=(4,))
    if mode == "comp":
        p0.add("c", NodeKind.COMP, flops=fc, op="einsum", data_deps=(5,))
    else:  # the span ends on a collective; ar3 waits for r2 too, so it is no span member
        p0.add("d", NodeKind.COMP, flops=fc, op="einsum", data_deps=(0, 5))
        p0.add("ar3", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=1000, axes=("tp",), data_deps=(1, 6))
        p0.add("e", NodeKind.COMP, flops=fc, op="einsum", data_deps=(7,))
    p1 = Program({"pp": 1})
    p1.add("x1", NodeKind.COMP, flops=u, op="einsum")
    p1.add("s1", NodeKind.SEND, peer_axis="pp", peer_offset=1, tag=1, comm_bytes=s1, data_deps=(0,))
    p1.add("x2", NodeKind.COMP, flops=f, op="einsum", data_deps=(0,))
    p1.add("s2", NodeKind.SEND, peer_axis="pp", peer_offset=-1, tag=2, comm_bytes=s2, data_deps=(2,))
    return [p0, p1], Mesh.create([("tp", 4), ("pp", 2)]), mach


@pytest.mark.parametrize("mode, args", [
    ("comp", (345796320, 202189840, 380251739, 157842915, 568595162, 1153122958, 350375223, 0.1)),
    ("comp", (393511873, 454646120, 1319012846, 818902114, 900638607, 1950541603, 426078418, 0.1)),
    ("coll", (597548442, 114602968, 270892830, 127639120, 746060748, 1311479931, 703326440, 0.25)),
])
def test_a_span_retimed_one_ulp_earlier_ends_once(mode, args, span_count, monkeypatch) -> None:
    progs, mesh, mach = _retimed_earlier(mode, *args)
    with_spans = execute(progs, mesh, mach)
    assert span_count[0] >= 1
    monkeypatch.setattr(engine, "_spans", lambda kind, *rest: [0] * len(kind))
    _same_schedule(with_spans, execute(progs, mesh, mach))
