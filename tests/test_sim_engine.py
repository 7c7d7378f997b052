"""Engine on hand-built Programs; every expected value is a closed form computed here."""

from __future__ import annotations

import json

import pytest

from tensorstage.errors import SpecError
from tensorstage.parallel.mesh import Mesh
from tensorstage.schedule.program import CollKind, NodeKind, Program
from tensorstage.sim import Machine, execute, simulate, summarize
from tensorstage.sim.collectives import Fabric, Tier
from tensorstage.sim.compute import ComputeModel
from tensorstage.sim.result import memory_series
from tensorstage.sim.timeline import chrome_trace, write_chrome_trace

PEAK = 100e12
EFF = 0.5
HBM = 1e12
LAUNCH = 2e-6
B0, A0, B1, A1 = 100e9, 1e-6, 10e9, 4e-6


def machine(slowdown: float = 0.0, launch: float = LAUNCH, hbm_cap: int = 80 * 2**30,
            fabric: Fabric | None = None) -> Machine:
    comp = ComputeModel(tensor_flops=PEAK * EFF, attention_flops=PEAK * EFF, vector_flops=PEAK / 10,
                        hbm_Bps=HBM, launch_s=launch, peak_flops=PEAK)
    fab = fabric or Fabric((Tier("nvl", 8, B0, A0), Tier("ib", 64, B1, A1)))
    return Machine(comp, fab, hbm_cap, slowdown, "bf16", "test")


def roofline(flops: float, nbytes: float, launch: float = LAUNCH) -> float:
    return max(flops / (PEAK * EFF), nbytes / HBM) + launch


def test_serial_chain_is_sum_of_rooflines() -> None:
    mesh = Mesh.create([("tp", 1)])
    p = Program({})
    work = [(4e12, 1e9), (1e9, 8e9), (0, 0), (3e13, 2e10)]
    for i, (f, b) in enumerate(work):
        p.add(f"n{i}", NodeKind.COMP, flops=int(f), tensor_bytes=int(b), op="einsum",
              data_deps=(i - 1,) if i else ())
    res = simulate([p], mesh, machine())
    assert res.step_time_s == pytest.approx(sum(roofline(f, b) for f, b in work), rel=1e-12)
    cr = res.classes[0]
    assert cr.compute_busy_s == pytest.approx(res.step_time_s)
    assert cr.bubble_s == pytest.approx(0.0, abs=1e-15)


def test_vector_ops_use_vector_peak() -> None:
    mesh = Mesh.create([("tp", 1)])
    p = Program({})
    p.add("norm", NodeKind.COMP, flops=int(1e12), tensor_bytes=1, op="norm")
    res = simulate([p], mesh, machine())
    assert res.step_time_s == pytest.approx(1e12 / (PEAK / 10) + LAUNCH)


def _overlap_program(flops: int, coll_bytes: int) -> Program:
    p = Program({})
    p.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=coll_bytes, axes=("tp",), category="comm")
    p.add("mm", NodeKind.COMP, flops=flops, op="einsum")
    return p


@pytest.mark.parametrize("slowdown", [0.0, 0.25])
@pytest.mark.parametrize("flops", [int(1e12), int(2e14)])
def test_compute_overlaps_independent_collective(slowdown: float, flops: int) -> None:
    mesh = Mesh.create([("tp", 8)])
    nbytes = 2**30
    res = simulate([_overlap_program(flops, nbytes)], mesh, machine(slowdown))
    tc = 2 * 7 / 8 * nbytes / B0 + 2 * 7 * A0  # one node: single-tier ring (NVLS off)
    ta = roofline(flops, 0)
    f = 1 + slowdown
    ta_slow = ta * f if ta * f <= tc else tc + (ta - tc / f)
    assert res.step_time_s == pytest.approx(max(ta_slow, tc), rel=1e-12)
    cr = res.classes[0]
    assert cr.compute_busy_s == pytest.approx(ta_slow, rel=1e-12)
    assert cr.exposed_comm_total_s == pytest.approx(max(0.0, tc - ta_slow), rel=1e-9, abs=1e-15)
    assert cr.exposed_comm_s.get("all_reduce/tp", 0.0) == pytest.approx(max(0.0, tc - ta_slow), rel=1e-9, abs=1e-15)
    assert cr.comm_busy_s["all_reduce/tp"] == pytest.approx(tc)


def test_collectives_on_one_communicator_serialize_on_two_overlap() -> None:
    mesh = Mesh.create([("tp", 8), ("dp", 8)])
    fab = machine().fabric
    s = 2**28
    # tp 8 inside one node: single-tier ring all-reduce; dp 8 one per node: ring reduce-scatter on IB
    t_tp = 2 * 7 / 8 * s / B0 + 2 * 7 * A0
    t_dp = 7 / 8 * s / B1 + 7 * A1
    assert fab.ring_base_latency_s == 0.0 and fab.tiers[0].nvls_bw_Bps == 0.0
    same = Program({})
    same.add("a", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=s, axes=("tp",))
    same.add("b", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=s, axes=("tp",))
    assert simulate([same], mesh, machine()).step_time_s == pytest.approx(2 * t_tp)
    two = Program({})
    two.add("a", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=s, axes=("tp",))
    two.add("b", NodeKind.COLL, comm=CollKind.REDUCE_SCATTER, comm_bytes=s, axes=("dp",))
    assert simulate([two], mesh, machine()).step_time_s == pytest.approx(max(t_tp, t_dp))


def _pipeline(schedule: str, m: int, f_flops: int, b_flops: int, act_bytes: int) -> list[Program]:
    """Two stages; 1F1B or GPipe order per stage fixed by ctrl deps; activations sent forward,
    gradients backward (tags: 2*mb forward, 2*mb+1 backward)."""
    progs = []
    for s in (0, 1):
        p = Program({"pp": s})
        if schedule == "gpipe":
            order = [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]
        elif s == 0:  # 1F1B, p=2: warm-up 1 forward on stage 0
            order = [("F", 0)]
            for i in range(1, m):
                order += [("F", i), ("B", i - 1)]
            order += [("B", m - 1)]
        else:
            order = [x for i in range(m) for x in (("F", i), ("B", i))]
        prev = None
        for kind, i in order:
            deps: tuple[int, ...] = ()
            if kind == "F" and s == 1:
                deps = (p.add(f"recv_f{i}", NodeKind.RECV, comm_bytes=act_bytes, peer_axis="pp", peer_offset=-1,
                              tag=2 * i).id,)
            if kind == "B" and s == 0:
                deps = (p.add(f"recv_b{i}", NodeKind.RECV, comm_bytes=act_bytes, peer_axis="pp", peer_offset=1,
                              tag=2 * i + 1).id,)
            n = p.add(f"{kind}{i}", NodeKind.COMP, flops=f_flops if kind == "F" else b_flops, op="einsum",
                      data_deps=deps, ctrl_deps=(prev,) if prev is not None else (),
                      category="fwd" if kind == "F" else "bwd_input",
                      mem_alloc_bytes=1000 if kind == "F" else 0, mem_free_bytes=1000 if kind == "B" else 0)
            prev = n.id
            if kind == "F" and s == 0:
                p.add(f"send_f{i}", NodeKind.SEND, comm_bytes=act_bytes, peer_axis="pp", peer_offset=1, tag=2 * i,
                      data_deps=(n.id,))
            if kind == "B" and s == 1:
                p.add(f"send_b{i}", NodeKind.SEND, comm_bytes=act_bytes, peer_axis="pp", peer_offset=-1,
                      tag=2 * i + 1, data_deps=(n.id,))
        p.model_flops = m * (f_flops + b_flops)
        progs.append(p)
    return progs


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_two_stage_pipeline_makespan(schedule: str, m: int) -> None:
    mesh = Mesh.create([("tp", 1), ("pp", 2)])
    f_flops, b_flops = int(5e12), int(1e13)
    res = simulate(_pipeline(schedule, m, f_flops, b_flops, act_bytes=0), mesh, machine(launch=0.0,
                   fabric=Fabric((Tier("nvl", 8, B0, 0.0), Tier("ib", 64, B1, 0.0)))))
    tf, tb = f_flops / (PEAK * EFF), b_flops / (PEAK * EFF)
    p = 2
    assert res.step_time_s == pytest.approx((p - 1 + m) * (tf + tb), rel=1e-12)
    # bubble per stage = (p-1)(tf+tb): F-PP-BUBBLE fraction (p-1)/m of the ideal m(tf+tb)
    for cr in res.classes:
        assert cr.bubble_s == pytest.approx((p - 1) * (tf + tb), rel=1e-9)
    # activations in flight: 1F1B stage 0 holds at most p microbatches, GPipe all m
    peak0 = res.classes[0].memory_peak_bytes
    assert peak0 == 1000 * (min(m, p) if schedule == "1f1b" else m)


def test_pipeline_with_transfer_time_and_mfu() -> None:
    mesh = Mesh.create([("tp", 1), ("dp", 2), ("pp", 2)])
    m, f_flops, b_flops, act = 4, int(5e12), int(1e13), 2**27
    res = simulate(_pipeline("1f1b", m, f_flops, b_flops, act), mesh, machine(launch=0.0), tokens_per_step=4096)
    tf, tb = f_flops / (PEAK * EFF), b_flops / (PEAK * EFF)
    tx = A0 + act / B0  # pp stride 2, span 4 GPUs: inside one 8-GPU node -> scale-up tier
    ends = _recurrence_1f1b_two_stage(m, tf, tb, tx)
    assert res.step_time_s == pytest.approx(ends, rel=1e-12)
    world = 4
    model = 2 * 2 * m * (f_flops + b_flops)  # 2 classes x 2 ranks each
    assert res.mfu == pytest.approx(model / (res.step_time_s * world * PEAK), rel=1e-12)
    assert res.hfu == pytest.approx(res.mfu)
    assert res.tokens_per_s == pytest.approx(4096 / res.step_time_s)
    assert [c.ranks for c in res.classes] == [2, 2]
    json.dumps(res.to_dict())


def _recurrence_1f1b_two_stage(m: int, tf: float, tb: float, tx: float) -> float:
    """Start times of the 2-stage 1F1B order from its definition (each op waits for its stage's
    previous op and for its cross-stage input plus one transfer)."""
    order0 = [("F", 0)] + [x for i in range(1, m) for x in (("F", i), ("B", i - 1))] + [("B", m - 1)]
    order1 = [x for i in range(m) for x in (("F", i), ("B", i))]
    done: dict[tuple[int, str, int], float] = {}
    t0 = t1 = 0.0
    i0 = i1 = 0
    while i0 < len(order0) or i1 < len(order1):
        progressed = False
        if i0 < len(order0):
            k, i = order0[i0]
            need = done.get((1, "B", i)) if k == "B" else 0.0
            if need is not None:
                st = max(t0, need + (tx if k == "B" else 0.0))
                t0 = st + (tf if k == "F" else tb)
                done[(0, k, i)] = t0
                i0 += 1
                progressed = True
        if i1 < len(order1):
            k, i = order1[i1]
            need = done.get((0, "F", i)) if k == "F" else 0.0
            if need is not None:
                st = max(t1, need + (tx if k == "F" else 0.0))
                t1 = st + (tf if k == "F" else tb)
                done[(1, k, i)] = t1
                i1 += 1
                progressed = True
        assert progressed
    return max(t0, t1)


def test_cross_class_collective_waits_for_all_classes() -> None:
    mesh = Mesh.create([("tp", 1), ("pp", 2)])
    progs = []
    work = [int(1e12), int(3e12)]
    s = 2**26
    for st in (0, 1):
        p = Program({"pp": st})
        p.add("w", NodeKind.COMP, flops=work[st], op="einsum")
        p.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=s, axes=("pp",), data_deps=(0,))
        progs.append(p)
    mach = machine()
    res = simulate(progs, mesh, mach)
    tc = 2 * 1 / 2 * s / B0 + 2 * A0  # ring all-reduce over the 2 stages on one node
    assert res.step_time_s == pytest.approx(roofline(work[1], 0) + tc)
    assert res.classes[0].finish_s == res.classes[1].finish_s
    assert res.classes[0].sync_wait_s == pytest.approx(roofline(work[1], 0) - roofline(work[0], 0))


def test_memory_peak_of_known_pattern() -> None:
    mesh = Mesh.create([("tp", 2)])
    p = Program({}, static_bytes={"weights": 1000, "gradients": 1000, "optimizer_states": 6000})
    # a(+300) -> b(+500) -> coll(+200 buffer, freed at its end) -> c(-300) -> d(+100, -500)
    p.add("a", NodeKind.COMP, flops=int(1e9), mem_alloc_bytes=300)
    p.add("b", NodeKind.COMP, flops=int(1e9), mem_alloc_bytes=500, data_deps=(0,))
    p.add("g", NodeKind.COLL, comm=CollKind.ALL_GATHER, comm_bytes=1 << 20, axes=("tp",), data_deps=(1,),
          mem_alloc_bytes=200, mem_free_bytes=200)
    p.add("c", NodeKind.COMP, flops=int(1e9), mem_free_bytes=300, data_deps=(2,))
    p.add("d", NodeKind.COMP, flops=int(1e9), mem_alloc_bytes=100, mem_free_bytes=500, data_deps=(3,))
    res = simulate([p], mesh, machine(hbm_cap=8000 + 999))
    cr = res.classes[0]
    assert cr.memory_peak_bytes == 8000 + 300 + 500 + 200
    assert cr.memory_at_peak_bytes == {"gradients": 1000, "optimizer_states": 6000, "weights": 1000,
                                       "activations": 800, "comm_buffers": 200}
    assert cr.oom and res.oom
    assert not simulate([p], mesh, machine(hbm_cap=9000)).oom


def test_same_class_ring_send_recv() -> None:
    # context-parallel style ring: every rank sends to +1 and receives from -1; one class.
    mesh = Mesh.create([("cp", 4)])
    p = Program({})
    p.add("s", NodeKind.SEND, comm_bytes=2**20, peer_axis="cp", peer_offset=1, tag=7)
    p.add("r", NodeKind.RECV, comm_bytes=2**20, peer_axis="cp", peer_offset=-1, tag=7)
    p.add("x", NodeKind.COMP, flops=int(1e9), data_deps=(1,))
    res = simulate([p], mesh, machine())
    assert res.step_time_s == pytest.approx(A0 + 2**20 / B0 + roofline(1e9, 0))


def test_sends_with_one_tag_pair_in_program_order() -> None:
    # two sends with the same tag from stage 0: the k-th send pairs with the k-th recv (id order), so
    # the second recv waits for the send that runs after stage 0's one-second compute
    mesh = Mesh.create([("pp", 2)])
    a, b = Program({"pp": 0}), Program({"pp": 1})
    a.add("s1", NodeKind.SEND, comm_bytes=2**20, peer_axis="pp", peer_offset=1, tag=5)
    a.add("x", NodeKind.COMP, flops=int(1e12), data_deps=(0,))
    a.add("s2", NodeKind.SEND, comm_bytes=2**20, peer_axis="pp", peer_offset=1, tag=5, data_deps=(1,))
    b.add("r1", NodeKind.RECV, comm_bytes=2**20, peer_axis="pp", peer_offset=-1, tag=5)
    b.add("r2", NodeKind.RECV, comm_bytes=2**20, peer_axis="pp", peer_offset=-1, tag=5, data_deps=(0,))
    ex = execute([a, b], mesh, machine())
    t = A0 + 2**20 / B0  # one transfer inside the scale-up tier
    assert ex.end[3] == pytest.approx(t)
    assert ex.end[4] == pytest.approx(t + roofline(1e12, 0) + t)


def test_unpaired_or_unequal_send_recv_raise_spec_error() -> None:
    mesh = Mesh.create([("pp", 2)])
    a, b = Program({"pp": 0}), Program({"pp": 1})
    b.add("r", NodeKind.RECV, comm_bytes=8, peer_axis="pp", peer_offset=-1, tag=3)
    with pytest.raises(SpecError, match="recv without send") as exc:
        simulate([a, b], mesh, machine())
    assert exc.value.field == "programs" and "class (('pp', 1),) expects tag 3 from (('pp', 0),)" in str(exc.value)
    a.add("s", NodeKind.SEND, comm_bytes=16, peer_axis="pp", peer_offset=1, tag=3)
    with pytest.raises(SpecError, match="send/recv size mismatch for tag 3: 16 vs 8 bytes"):
        simulate([a, b], mesh, machine())
    # the first problem in send order is reported: tag 3's sizes, before tag 2's missing recv
    a.add("s2", NodeKind.SEND, comm_bytes=8, peer_axis="pp", peer_offset=1, tag=2)
    with pytest.raises(SpecError, match="size mismatch for tag 3"):
        simulate([a, b], mesh, machine())


@pytest.mark.parametrize(("tag", "nbytes", "error"), [
    (2**63, 8, "tags must be integers within int64; got 9223372036854775808"),
    ("fwd", 8, "tags must be integers within int64; got 'fwd'"),
    (1.5, 8, "tags must be integers within int64; got 1.5"),
    (1, "8", "message sizes \\(comm_bytes\\) must be numbers within int64; got '8'"),
])
def test_send_recv_tags_and_sizes_are_checked(tag: object, nbytes: object, error: str) -> None:
    mesh = Mesh.create([("pp", 2)])
    a, b = Program({"pp": 0}), Program({"pp": 1})
    a.add("s", NodeKind.SEND, comm_bytes=nbytes, peer_axis="pp", peer_offset=1, tag=tag)
    b.add("r", NodeKind.RECV, comm_bytes=nbytes, peer_axis="pp", peer_offset=-1, tag=tag)
    with pytest.raises(SpecError, match=error) as exc:
        simulate([a, b], mesh, machine())
    assert exc.value.field == "programs"


def test_fractional_message_bytes_are_kept() -> None:
    mesh = Mesh.create([("pp", 2)])
    a, b = Program({"pp": 0}), Program({"pp": 1})
    a.add("s", NodeKind.SEND, comm_bytes=1e6 + 0.5, peer_axis="pp", peer_offset=1, tag=1)
    b.add("r", NodeKind.RECV, comm_bytes=1e6 + 0.5, peer_axis="pp", peer_offset=-1, tag=1)
    assert simulate([a, b], mesh, machine()).step_time_s == pytest.approx(A0 + (1e6 + 0.5) / B0, rel=1e-15)


def test_inconsistent_programs_raise_spec_error() -> None:
    mesh = Mesh.create([("tp", 1), ("pp", 2)])
    a, b = Program({"pp": 0}), Program({"pp": 1})
    a.add("s", NodeKind.SEND, comm_bytes=10, peer_axis="pp", peer_offset=1, tag=1)
    with pytest.raises(SpecError, match="send/recv mismatch") as exc:
        simulate([a, b], mesh, machine())
    assert exc.value.field == "programs" and "tag 1: 1 send(s), 0 recv(s)" in str(exc.value)
    c = Program({"pp": 0})
    c.add("x", NodeKind.COMP, data_deps=(1,))
    c.add("y", NodeKind.COMP)
    with pytest.raises(SpecError, match="not an earlier id") as exc:
        simulate([c], Mesh.create([("pp", 1)]), machine())
    assert exc.value.field == "programs" and "node 0 (x) depends on 1" in str(exc.value)
    d0, d1 = Program({"pp": 0}), Program({"pp": 1})
    d0.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=8, axes=("pp",))
    d0.add("ar2", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=8, axes=("pp",))
    d1.add("r", NodeKind.RECV, comm_bytes=8, peer_axis="pp", peer_offset=-1, tag=0)
    d1.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=8, axes=("pp",), data_deps=(0,))
    d0.add("s", NodeKind.SEND, comm_bytes=8, peer_axis="pp", peer_offset=1, tag=0, data_deps=(1,))
    with pytest.raises(SpecError, match="deadlock") as exc:
        simulate([d0, d1], mesh, machine())
    # stage 0's all-reduce needs stage 1's, which waits on a recv stage 0 sends only after its second one
    assert exc.value.field == "programs" and "5 node(s) never ran; first: class {'pp': 0} node 0 (ar, COLL)" in str(
        exc.value)


def test_timeline_export(tmp_path) -> None:
    mesh = Mesh.create([("tp", 1), ("pp", 2)])
    progs = _pipeline("1f1b", 3, int(1e12), int(2e12), 1024)
    ex = execute(progs, mesh, machine())
    trace = chrome_trace(ex)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == sum(len(p.nodes) for p in progs)
    assert {e["pid"] for e in xs} == {0, 1}
    comp = [e for e in xs if e["tid"] == 0 and e["pid"] == 0]
    assert sum(e["dur"] for e in comp) * 1e-6 == pytest.approx(summarize(ex).classes[0].compute_busy_s)
    path = write_chrome_trace(ex, tmp_path / "t.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(trace))
    assert write_chrome_trace(ex, tmp_path / "u.json").read_bytes() == path.read_bytes()


def test_memory_free_by_another_kind_and_series() -> None:
    # ZeRO-3 style: the all-gather allocates the gathered weight, the matmul that used it frees it.
    mesh = Mesh.create([("dp", 4)])
    p = Program({}, static_bytes={"weights": 50})
    p.add("ag", NodeKind.COLL, comm=CollKind.ALL_GATHER, comm_bytes=1 << 20, axes=("dp",), mem_alloc_bytes=400)
    p.add("mm", NodeKind.COMP, flops=int(1e9), data_deps=(0,), mem_alloc_bytes=30, mem_free_bytes=400)
    p.add("mm2", NodeKind.COMP, flops=int(1e9), data_deps=(1,), mem_alloc_bytes=10)
    ex = execute([p], mesh, machine())
    cr = summarize(ex).classes[0]
    assert cr.memory_peak_bytes == 50 + 400 + 30
    assert cr.memory_at_peak_bytes == {"weights": 50, "activations": 30, "comm_buffers": 400}
    # the level after all changes at each distinct time: the gather starts at 0, mm starts when the
    # gather ends, mm's free and mm2's alloc coincide.
    t_ag = 3 * (1 << 20) / B0 + 3 * A0
    series = memory_series(ex, 0)
    assert [b for _, b in series] == [450, 480, 90]
    assert [t for t, _ in series] == pytest.approx([0.0, t_ag, t_ag + roofline(1e9, 0)], rel=1e-12)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_chain_merging_is_exact_and_deterministic(schedule: str) -> None:
    mesh = Mesh.create([("tp", 2), ("pp", 2)])
    progs = _pipeline(schedule, 5, int(3e12), int(7e12), 2**24)
    for p in progs:  # add chains (several COMP nodes per action) and a TP collective on a side stream
        n = len(p.nodes)
        p.add("opt_a", NodeKind.COMP, flops=int(1e11), data_deps=(n - 1,), category="optimizer", op="adam")
        p.add("opt_b", NodeKind.COMP, flops=int(2e11), data_deps=(n,), category="optimizer", op="adam")
        p.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=2**26, axes=("tp",), data_deps=(n,))
        p.add("opt_c", NodeKind.COMP, flops=int(3e11), data_deps=(n + 1,), category="optimizer")
    a = execute(progs, mesh, machine(), merge_chains=True)
    b = execute(progs, mesh, machine(), merge_chains=False)
    assert a.step_time_s == pytest.approx(b.step_time_s, rel=1e-12)
    assert a.start == pytest.approx(b.start, rel=1e-9, abs=1e-12)
    assert a.end == pytest.approx(b.end, rel=1e-9, abs=1e-12)
    ra, rb = summarize(a), summarize(b)
    # opt_a, opt_b are vector ops (adam); opt_c has no op kind: charged at tensor rate
    assert ra.classes[0].optimizer_s == pytest.approx(3 * LAUNCH + 3e11 / (PEAK / 10) + 3e11 / (PEAK * EFF), rel=1e-9)
    assert json.dumps(ra.to_dict()) == json.dumps(summarize(execute(progs, mesh, machine())).to_dict())
    assert ra.classes[1].compute_by_category_s == pytest.approx(rb.classes[1].compute_by_category_s)


def test_hfu_over_mfu_with_full_recompute() -> None:
    # F-MFU-HFU: full recompute executes 4 forward-equivalents for 3 counted ones -> HFU/MFU = 4/3.
    mesh = Mesh.create([("dp", 4)])
    p = Program({})
    fwd = int(1e13)
    for i, (name, f) in enumerate([("fwd", fwd), ("recompute", fwd), ("bwd", 2 * fwd)]):
        p.add(name, NodeKind.COMP, flops=f, op="einsum", category=name if name != "bwd" else "bwd_input",
              data_deps=(i - 1,) if i else ())
    p.model_flops = 3 * fwd
    res = simulate([p], mesh, machine(launch=0.0))
    assert res.step_time_s == pytest.approx(4 * fwd / (PEAK * EFF))
    assert res.mfu == pytest.approx(3 * fwd / (res.step_time_s * PEAK))  # = 0.75 * EFF
    assert res.hfu / res.mfu == pytest.approx(4 / 3)
    assert res.classes[0].compute_by_category_s["recompute"] == pytest.approx(fwd / (PEAK * EFF))


def test_machine_from_preset_system() -> None:
    from tensorstage.hardware.system import load_system
    from tensorstage.sim import machine_from_system

    sysa = load_system("dgx-a100-selene")
    dev = sysa.device
    m = machine_from_system(sysa, "bf16")
    assert m.compute.peak_flops == 312e12  # A100 datasheet dense bf16 (public_cases.yaml)
    assert m.compute.tensor_flops == pytest.approx(312e12 * dev.matmul_efficiency)
    assert m.compute.hbm_Bps == pytest.approx(2039e9 * dev.hbm_efficiency)
    assert m.hbm_capacity_bytes == 80 * 2**30
    with pytest.raises(SpecError, match="dtype"):
        machine_from_system(sysa, "fp8")  # A100 has no fp8 tensor cores


def test_embedding_all_reduce_between_first_and_last_stage_only() -> None:
    mesh = Mesh.create([("tp", 1), ("pp", 4)])
    work = [int(1e12), int(5e12), int(2e12), int(3e12)]
    progs = []
    for st in range(4):
        p = Program({"pp": st})
        p.add("w", NodeKind.COMP, flops=work[st], op="einsum")
        if st in (0, 3):
            p.add("emb_ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=2**24, axes=("pp",), data_deps=(0,))
        progs.append(p)
    mach = machine()
    res = simulate(progs, mesh, mach)
    tc = 2 * 3 / 4 * 2**24 / B0 + 2 * 3 * A0  # ring all-reduce costed as the full pp group (4, one node)
    end_ar = max(roofline(work[0], 0), roofline(work[3], 0)) + tc
    assert [c.finish_s for c in res.classes] == pytest.approx(
        [end_ar, roofline(work[1], 0), roofline(work[2], 0), end_ar])
    assert res.step_time_s == pytest.approx(max(end_ar, roofline(work[1], 0)))


def test_lower_id_node_cuts_into_a_chain_as_unmerged() -> None:
    # node 1 waits for a collective that ends while the independent chain 2..5 runs; under the
    # lowest-ready-id rule it runs right after the chain member in progress, not after the chain.
    mesh = Mesh.create([("tp", 8)])
    s = 2**28
    tc = 2 * 7 / 8 * s / B0 + 14 * A0
    d = tc / 1.5
    f = int((d - LAUNCH) * PEAK * EFF)
    d = roofline(f, 0)
    p = Program({})
    p.add("ar", NodeKind.COLL, comm=CollKind.ALL_REDUCE, comm_bytes=s, axes=("tp",))
    p.add("a", NodeKind.COMP, flops=f, op="einsum", data_deps=(0,))
    for i in range(2, 6):
        p.add(f"c{i}", NodeKind.COMP, flops=f, op="einsum", data_deps=(i - 1,) if i > 2 else ())
    merged, plain = execute([p], mesh, machine()), execute([p], mesh, machine(), merge_chains=False)
    assert plain.end[1] == pytest.approx(3 * d)  # c2 [0,d], c3 [d,2d], a [2d,3d]
    assert merged.start == plain.start and merged.end == plain.end
    assert merged.step_time_s == pytest.approx(5 * d)


def test_sync_wait_counts_overlapping_waits_once() -> None:
    """Waits [0,4), [1,3), [2,6), [8,9) and an empty one: union = [0,6) + [8,9) = 7, not 4+2+4+1 = 11."""
    import numpy as np

    from tensorstage.sim.result import union_length

    starts = np.array([0.0, 1.0, 2.0, 8.0, 5.0])
    ends = np.array([4.0, 3.0, 6.0, 9.0, 5.0])
    assert union_length(starts, ends) == 7.0
    assert union_length(np.array([]), np.array([])) == 0.0


def test_sync_wait_never_exceeds_the_step() -> None:
    """Many collectives waiting at once (a pipeline with data parallelism) still wait at most a step."""
    from tensorstage.hardware.system import load_system
    from tensorstage.lower import lower
    from tensorstage.parallel.plan import ParallelPlan
    from tests.support import megatron_gpt

    plan = ParallelPlan.parse(dict(tp=2, pp=4, dp=4, seq=512, micro_batch=1, global_batch=32), where="plan")
    low = lower(megatron_gpt(L=8, h=512, a=8, V=2048, s=512), plan, fuse=True)
    res = simulate(low.programs, low.mesh, load_system("dgx-h100-superpod", 32))
    for c in res.classes:
        assert 0.0 <= c.sync_wait_s <= res.step_time_s


def test_gathered_parameters_freed_by_compute_leave_comm_buffers() -> None:
    # FSDP: the gather allocates the unit's parameters (a communication buffer); the matmul that
    # used them frees them (mem_free_comm_bytes); saved activations stay activations. A later peak
    # must show the activations, not the activations minus the freed parameters.
    mesh = Mesh.create([("dp", 4)])
    p = Program({}, static_bytes={"weights": 50})
    p.add("fwd0", NodeKind.COMP, flops=int(1e9), mem_alloc_bytes=1000)
    p.add("ag", NodeKind.COLL, comm=CollKind.ALL_GATHER, comm_bytes=1 << 20, axes=("dp",), mem_alloc_bytes=400,
          data_deps=(0,))
    p.add("mm", NodeKind.COMP, flops=int(1e9), data_deps=(1,), mem_free_bytes=400, mem_free_comm_bytes=400)
    p.add("mm2", NodeKind.COMP, flops=int(1e9), data_deps=(2,), mem_alloc_bytes=2000)
    cr = summarize(execute([p], mesh, machine())).classes[0]
    assert cr.memory_peak_bytes == 50 + 1000 + 2000
    assert cr.memory_at_peak_bytes == {"weights": 50, "activations": 3000, "comm_buffers": 0}
