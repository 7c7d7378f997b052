"""TPU v4 / v5p systems: the ICI 3-D torus as one ASTRA-sim ``Ring`` dimension per axis.

* Slices: a job smaller than the pod runs on the most balanced torus slice, which reproduces the
  shapes Google lists (Cloud TPU v4/v5p docs: 4x4x4, 4x4x8, 4x8x8, 8x8x8, 8x8x16; PaLM's 3072-chip
  v4 slices were 12x16x16, Chowdhery et al. 2022 sec. 4).
* Ring collectives on one torus axis follow the textbook bidirectional ring (each chip has two
  links on the axis, so a ring moves data at 2 x the link bandwidth):
  all-reduce ``2(k-1)/k * S / B + 2(k-1) * alpha``, all-gather / reduce-scatter
  ``(k-1)/k * S / B + (k-1) * alpha``, with ``B = 2 * link_GBps * efficiency``; an all-reduce over
  the whole 3-D torus is the dimension-ordered one (reduce-scatter along x, then y on a quarter
  of the data, then z on a sixteenth; all-gather back): ``2 * sum_i [(k_i-1)/k_i * S_i / B + (k_i-1) * alpha]``
  with ``S_i = S / prod_{j<i} k_j``. Every ring collective also pays the fabric's fixed
  per-collective latency once (``NCCL_RING_BASE_LATENCY_S``).
* A plan simulates on both systems; peak FLOPs and HBM are the device presets' (Google's docs).
"""

from __future__ import annotations

import pytest

from tensorstage.api import simulate as simulate_model
from tensorstage.hardware import load_system
from tensorstage.hardware.torus import torus_slice
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind
from tensorstage.sim.collectives import collective_time_s, members_per_domain
from tensorstage.sim.machine import LINK_EFFICIENCY, NCCL_RING_BASE_LATENCY_S, fabric_from_system
from tensorstage.trace.astra_config import astra_config

GiB = 1 << 30


@pytest.mark.parametrize(
    ("chips", "shape"),
    [(64, (4, 4, 4)), (128, (4, 4, 8)), (256, (4, 8, 8)), (512, (8, 8, 8)), (1024, (8, 8, 16)),
     (3072, (12, 16, 16)), (4096, (16, 16, 16))],
)
def test_v4_slices_follow_googles_shapes(chips: int, shape: tuple[int, ...]) -> None:
    assert tuple(d.npus for d in load_system("tpu-v4-pod", chips).network) == shape


def test_slice_rule_edges() -> None:
    assert torus_slice((16, 16, 24), 6144) == (16, 16, 24)
    assert torus_slice((16, 16, 16), 17) is None  # a prime above every ring: no slice
    v5p = load_system("tpu-v5p", 2 * 6144)  # two full slices over the data-center network
    assert [d.npus for d in v5p.network] == [16, 16, 24, 2]
    assert astra_config(load_system("tpu-v4-pod", 64)).network["topology"] == ["Ring", "Ring", "Ring"]


def _ring(k: int, full_bytes: float, bw: float, alpha: float, phases: int) -> float:
    """``phases`` = 2 for all-reduce, 1 for all-gather / reduce-scatter (full size ``full_bytes``)."""
    return phases * ((k - 1) / k * full_bytes / bw + (k - 1) * alpha)


@pytest.mark.parametrize(("system", "link_GBps"), [("tpu-v4-pod", 50.0), ("tpu-v5p", 100.0)])
def test_ring_collectives_on_torus_axes_follow_the_closed_form(system: str, link_GBps: float) -> None:
    fabric = fabric_from_system(load_system(system, 64))  # one 4x4x4 cube
    k, alpha, base = 4, 1e-6, NCCL_RING_BASE_LATENCY_S
    bw = 2 * link_GBps * 1e9 * LINK_EFFICIENCY["scale-up"]  # two links per chip on a ring axis
    S = 1.0 * GiB
    for axis, stride in (("x", 1), ("y", 4), ("z", 16)):
        members = members_per_domain([(stride, k)], fabric)
        t_ar, algo = collective_time_s(CollKind.ALL_REDUCE, S, members, fabric)
        assert algo in ("ring", "hierarchical"), axis
        assert t_ar == pytest.approx(base + _ring(k, S, bw, alpha, 2), rel=1e-12), axis
        t_ag, _ = collective_time_s(CollKind.ALL_GATHER, S / k, members, fabric)  # comm size = shard
        assert t_ag == pytest.approx(base + _ring(k, S, bw, alpha, 1), rel=1e-12), axis
    # the whole cube: dimension-ordered all-reduce, x then y then z on shrinking data
    members = members_per_domain([(1, 64)], fabric)
    t_3d, algo = collective_time_s(CollKind.ALL_REDUCE, S, members, fabric)
    expected = base + sum(_ring(k, S / k**i, bw, alpha, 2) for i in range(3))
    assert algo == "hierarchical" and t_3d == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("system", "peak", "hbm_GiB"), [("tpu-v4-pod", 275e12, 32), ("tpu-v5p", 459e12, 95)]
)
def test_a_plan_simulates_on_a_tpu_slice(system: str, peak: float, hbm_GiB: int) -> None:
    plan = ParallelPlan.parse({"tp": 4, "dp": 16, "seq": 1024, "micro_batch": 1, "global_batch": 64})
    run = simulate_model("gpt3-125m", system, plan, full=False)
    res = run.result
    assert res.world == 64 and res.peak_flops_per_device == peak and res.hbm_capacity_bytes == hbm_GiB * GiB
    assert res.step_time_s > 0 and 0 < res.mfu < 1 and not res.oom
    assert res.collective_algorithms  # the TP and DP collectives ran on the torus
