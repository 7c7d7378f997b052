"""Pipeline schedules: closed-form bubbles, memory, dependency soundness, and p2p pairing.

Expected numbers come from formulas written here, not from the code under test:
F-PP-BUBBLE and F-ZERO-BUBBLE of ../shared/validation/public_cases.yaml (Narayanan et al.
SC'21 sec. 2.2; Qi et al. ICLR'24).
"""

from __future__ import annotations

import itertools

import pytest

from tensorstage.errors import SpecError
from tensorstage.schedule.pipeline import Action, Kind, check_order, p2p_plan, pipeline_order
from tensorstage.schedule.simulate import DeadlockError, simulate_order

GRID = [(p, m) for p in (1, 2, 3, 4, 6) for m in (1, 2, 4, 5, 8, 12)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("t_f", "t_b"), [(1.0, 2.0), (1.0, 1.0), (0.7, 1.9)])
def test_gpipe_1f1b_bubble_is_p_minus_1_over_m(schedule: str, t_f: float, t_b: float) -> None:
    for p, m in GRID:
        r = simulate_order(pipeline_order(schedule, p, m), t_f, t_b)
        ideal = m * (t_f + t_b)
        assert r.makespan == pytest.approx(ideal + (p - 1) * (t_f + t_b))
        assert r.bubble_fraction == pytest.approx((p - 1) / m)
        assert all(b == pytest.approx(ideal) for b in r.busy)


@pytest.mark.parametrize(("p", "v"), [(2, 2), (2, 3), (3, 2), (4, 2), (4, 3), (4, 4)])
def test_interleaved_bubble_is_p_minus_1_over_vm(p: int, v: int) -> None:
    t_f, t_b = 1.0, 2.0  # per full stage; each of the v chunks takes 1/v of it
    for m in (p, 2 * p, 3 * p, 5 * p):
        r = simulate_order(pipeline_order("interleaved", p, m, v), t_f / v, t_b / v)
        assert r.bubble_fraction == pytest.approx((p - 1) / (v * m))
        assert r.makespan == pytest.approx(m * (t_f + t_b) + (p - 1) * (t_f + t_b) / v)


def test_interleaved_beats_1f1b_by_factor_v() -> None:
    p, m = 4, 8
    plain = simulate_order(pipeline_order("1f1b", p, m), 1.0, 2.0)
    for v in (2, 4):
        inter = simulate_order(pipeline_order("interleaved", p, m, v), 1.0 / v, 2.0 / v)
        assert inter.bubble_fraction == pytest.approx(plain.bubble_fraction / v)


def test_zb_h1_bubble_is_one_third_of_1f1b_and_keeps_memory() -> None:
    for p in (2, 3, 4, 6, 8):
        for m in (p, p + 1, 2 * p, 3 * p):
            zb = simulate_order(pipeline_order("zb-h1", p, m), 1.0, 1.0, t_w=1.0)
            ref = simulate_order(pipeline_order("1f1b", p, m), 1.0, 1.0, t_w=1.0)  # B = I + W
            ideal = 3.0 * m
            # 1F1B bubble (p-1)(t_f+t_i+t_w) = 3(p-1); ZB-H1 (p-1)(t_f+t_i-t_w) = p-1.
            assert ref.makespan - ideal == pytest.approx(3 * (p - 1))
            assert zb.makespan - ideal == pytest.approx(p - 1)
            assert zb.bubble_fraction == pytest.approx(ref.bubble_fraction / 3)
            # Activations waiting for their input-grad: exactly 1F1B's p - rank on every rank.
            assert zb.peak_inflight == tuple(p - r for r in range(p)) == ref.peak_inflight
            # Counted until the weight-grad, the deferred W push later ranks up to, never past, p.
            assert max(zb.peak_inflight_until_w) == p


def test_zb_h1_general_times_bubble() -> None:
    # Qi et al.: ZB-H1 bubble (p-1)(T_F + T_B - T_W) when T_W <= T_F, T_B (W fills the drain).
    p, m = 4, 12
    for t_f, t_i, t_w in [(1.0, 1.0, 0.5), (2.0, 2.0, 1.0), (1.0, 1.5, 1.0)]:
        zb = simulate_order(pipeline_order("zb-h1", p, m), t_f, t_i, t_w=t_w)
        assert zb.makespan - m * (t_f + t_i + t_w) == pytest.approx((p - 1) * (t_f + t_i - t_w))


def test_1f1b_inflight_at_most_p_and_gpipe_holds_all() -> None:
    for p, m in GRID:
        one = simulate_order(pipeline_order("1f1b", p, m), 1.0, 2.0)
        assert one.peak_inflight == tuple(min(p - r, m) for r in range(p))
        assert max(one.peak_inflight) <= p
        gp = simulate_order(pipeline_order("gpipe", p, m), 1.0, 2.0)
        assert gp.peak_inflight == (m,) * p


def test_interleaved_inflight_matches_megatron_warmup() -> None:
    # In chunk units: warmup forwards + the first steady forward, capped at m*v.
    for p, v in [(2, 2), (4, 2), (4, 3)]:
        for m in (p, 2 * p, 4 * p):
            r = simulate_order(pipeline_order("interleaved", p, m, v), 1.0, 2.0)
            want = tuple(min(2 * (p - k - 1) + (v - 1) * p + 1, m * v) for k in range(p))
            assert r.peak_inflight == want


ALL_CASES = [(s, p, m, 1) for s in ("gpipe", "1f1b", "zb-h1") for p, m in GRID] + [
    ("interleaved", p, m, v) for p in (1, 2, 3, 4) for v in (2, 3) for m in (p, 2 * p, 3 * p)
]


@pytest.mark.parametrize(("schedule", "p", "m", "v"), ALL_CASES)
def test_orders_are_complete_and_never_deadlock(schedule: str, p: int, m: int, v: int) -> None:
    orders = pipeline_order(schedule, p, m, v)
    check_order(orders, p, m, v)
    r = simulate_order(orders, 1.0, 1.0, t_w=1.0, t_comm=0.25)
    # Every rank runs every action once, and starts only after what it needs has finished
    # (written out here independently of `dependencies`).
    assert len(r.finish) == sum(len(o) for o in orders)
    done = {(a.kind, a.microbatch, a.stage): (rank, t) for (rank, a), t in r.finish.items()}
    for (rank, a), t0 in r.start.items():
        mb, s = a.microbatch, a.stage
        need = []
        if a.kind is Kind.F and s > 0:
            need.append((Kind.F, mb, s - 1))
        if a.kind in (Kind.B, Kind.I):
            need.append((Kind.F, mb, s))
            if s + 1 < p * v:
                need.append((a.kind, mb, s + 1))
        if a.kind is Kind.W:
            need.append((Kind.I, mb, s))
        for key in need:
            src_rank, t_done = done[key]
            assert t0 >= t_done + (0.25 if src_rank != rank else 0.0) - 1e-9


def test_legacy_interleaved_all_warmup_when_m_equals_p() -> None:
    p, v = 4, 2
    legacy = pipeline_order("interleaved", p, p, v, legacy_all_warmup=True)
    for order in legacy:  # every forward precedes every backward
        kinds = [a.kind for a in order]
        assert kinds == [Kind.F] * (p * v) + [Kind.B] * (p * v)
    simulate_order(legacy, 1.0, 2.0)  # still deadlock-free


def test_bad_order_is_reported_as_deadlock() -> None:
    orders = pipeline_order("1f1b", 2, 2)
    orders[1] = [orders[1][1], orders[1][0], *orders[1][2:]]  # backward before its forward
    # rank 1 opens with B0, which needs its own later F0; rank 0 runs F0 F1 and then waits on B0's grad
    with pytest.raises(DeadlockError, match=r"blocked actions per rank: \{0: '0B0', 1: '1B0'\}$"):
        simulate_order(orders, 1.0, 1.0)
    swapped = pipeline_order("1f1b", 3, 4)
    swapped[0].reverse()
    # rank 0 opens with B3 (needs F3, later); ranks 1 and 2 wait on rank 0's F0 that never comes
    with pytest.raises(DeadlockError, match=r"blocked actions per rank: \{0: '0B3', 1: '1F0', 2: '2F0'\}$"):
        simulate_order(swapped, 1.0, 1.0)


@pytest.mark.parametrize(
    ("schedule", "p", "m", "v"),
    [
        ("gpipe", 4, 3, 1),
        ("1f1b", 4, 8, 1),
        ("zb-h1", 3, 5, 1),
        ("interleaved", 4, 8, 2),
        ("interleaved", 2, 4, 3),
        ("interleaved", 1, 2, 2),
    ],
)
def test_p2p_plan_pairs_every_message(schedule: str, p: int, m: int, v: int) -> None:
    orders = pipeline_order(schedule, p, m, v)
    plan = p2p_plan(orders, p, v)
    sends = [s.send for steps in plan for s in steps if s.send is not None]
    recvs = [s.recv for steps in plan for s in steps if s.recv is not None]
    stages = p * v
    # One activation and one gradient message per microbatch per stage boundary, if it crosses ranks.
    assert len(sends) == len(recvs) == (2 * m * (stages - 1) if p > 1 else 0)
    assert sorted(sends, key=lambda x: x.tag) == sorted(recvs, key=lambda x: x.tag)
    assert len({x.tag for x in sends}) == len(sends)
    for rank, steps in enumerate(plan):
        for s in steps:
            if s.send is not None:
                assert s.send.src_rank == rank and s.send.src_action == s.action
                assert s.send.dst_rank == (rank + (1 if s.send.payload == "activation" else -1)) % p
            if s.recv is not None:
                assert s.recv.dst_rank == rank and s.recv.dst_action == s.action


def test_action_prints_like_torch() -> None:
    assert str(Action(Kind.F, 3, 1, 5)) == "5F3"
    assert str(pipeline_order("zb-h1", 2, 2)[1][1]) == "1I0"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("pipedream", 2, 4, 1), "schedule"),
        (("interleaved", 4, 6, 2), "microbatches"),
        (("interleaved", 4, 8, 1), "vpp"),
        (("1f1b", 4, 8, 2), "vpp"),
        (("1f1b", 0, 8, 1), "pp"),
        (("gpipe", 2, 0, 1), "microbatches"),
    ],
)
def test_bad_input_names_the_field(args: tuple, field: str) -> None:
    with pytest.raises(SpecError) as err:
        pipeline_order(*args)
    assert err.value.field == field


def test_split_backward_needs_weight_time() -> None:
    with pytest.raises(SpecError) as err:
        simulate_order(pipeline_order("zb-h1", 2, 2), 1.0, 1.0)
    assert err.value.field == "t_w"


def test_all_actions_on_holding_rank() -> None:
    for p, v in itertools.product((2, 3), (2, 3)):
        for rank, order in enumerate(pipeline_order("interleaved", p, 2 * p, v)):
            assert {a.stage for a in order} == {c * p + rank for c in range(v)}
            assert all(a.stage == a.chunk * p + rank for a in order)


def test_heterogeneous_stage_times_gpipe_is_a_flow_shop() -> None:
    # Identical jobs through a flow shop: makespan = sum of stage times + (m-1) * slowest stage,
    # once for the forward sweep and once for the backward sweep (which starts when the last
    # stage finishes its last forward, all other stages being idle by then).
    t_f = [1.0, 3.0, 2.0, 1.5]
    t_b = [2.0, 5.0, 4.0, 3.5]
    for m in (1, 3, 8):
        r = simulate_order(pipeline_order("gpipe", 4, m), t_f, t_b)
        want = sum(t_f) + (m - 1) * max(t_f) + sum(t_b) + (m - 1) * max(t_b)
        assert r.makespan == pytest.approx(want)
        assert r.busy == tuple(pytest.approx(m * (f + b)) for f, b in zip(t_f, t_b, strict=True))
    with pytest.raises(SpecError) as err:
        simulate_order(pipeline_order("gpipe", 4, 2), t_f[:3], t_b)
    assert err.value.field == "t_f"


def test_comm_time_adds_per_hop() -> None:
    # GPipe with a per-message latency c: each of the (p-1) hops of the first microbatch's
    # forward and of the last microbatch's backward waits c extra.
    p, m, c = 4, 5, 0.5
    r = simulate_order(pipeline_order("gpipe", p, m), 1.0, 2.0, t_comm=c)
    assert r.makespan == pytest.approx((m + p - 1) * 3.0 + 2 * (p - 1) * c)
