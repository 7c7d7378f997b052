"""Steady-state extrapolation of steps that settle geometrically (``sim.steady``, settling transients).

Checked against a closed form (a quantity that is affine plus a geometric transient is carried to its
exact value) and against the full simulation of a ZeRO-3 pipeline whose overlap settles by a constant
factor per micro-batch; irregular transients are refused.
"""

from __future__ import annotations

import pytest

from tensorstage.parallel.plan import ParallelPlan
from tensorstage.sim.steady import _NotAffine, _settling


def test_affine_plus_geometric_is_carried_to_its_closed_form():
    a, b, c, rho = 3.0, 0.25, -0.04, 0.4
    v = [a + b * m + c * rho**m for m in range(10, 15)]
    steps = 500
    target = 14 + steps
    exact = a + b * target + c * rho**target
    assert _settling(v, steps, "x", floor=exact) == pytest.approx(exact, rel=1e-12)


def test_irregular_or_slow_transients_are_refused():
    # second differences changing sign (a pipeline still changing regime)
    v = [0.0, 1.0, 2.001, 3.0, 4.002]
    with pytest.raises(_NotAffine):
        _settling(v, 100, "x", floor=5.0)
    # a transient decaying too slowly (ratio 0.9) to be carried to its limit
    v = [0.25 * m - 0.5 * 0.9**m for m in range(5)]
    with pytest.raises(_NotAffine):
        _settling(v, 1000, "x", floor=250.0)


def test_zero3_pipeline_settling_matches_the_full_simulation():
    """GPT-3 6.7B, TP 8, PP 8, ZeRO-3 (gathers overlapping the compute they slow): no three
    consecutive counts are affine, the five short runs settle geometrically, and the extrapolated
    step equals the full simulation of 128 micro-batches."""
    from tensorstage.api import simulate as simulate_model

    plan = ParallelPlan.parse({"tp": 8, "pp": 8, "dp": 2, "zero": 3, "global_batch": 256, "seq": 2048,
                               "recompute": "full", "micro_batch": 1})
    quick = simulate_model("gpt3-6.7b", "dgx-a100-selene", plan, full=False)
    full = simulate_model("gpt3-6.7b", "dgx-a100-selene", plan, full=True)
    assert quick.notes and "10, 11, 12, 13, 14 micro-batches" in quick.notes[0]
    a, b = full.result, quick.result
    assert b.step_time_s == pytest.approx(a.step_time_s, rel=1e-9)
    assert b.peak_memory_bytes == a.peak_memory_bytes
    for ca, cb in zip(a.classes, b.classes, strict=True):
        for name in ("compute_busy_s", "bubble_s", "exposed_comm_total_s", "finish_s"):
            assert getattr(cb, name) == pytest.approx(getattr(ca, name), abs=1e-5 * a.step_time_s)
        assert (cb.nodes, cb.executed_flops, cb.model_flops) == (ca.nodes, ca.executed_flops, ca.model_flops)
