"""Step-level mechanisms of the calibration (docs/calibration.md), each against a closed form.

* Megatron-LM's optimizer step (``GraphOptions.optimizer_impl="megatron"``): bytes per parameter
  counted by hand from the passes Megatron 2021-22 runs (grad-buffer zero, DP average, fp16
  unscale, L2 norm, Adam, fp32 -> 16-bit copy).
* NCCL's per-collective ring base latency (``baseLat[RING][SIMPLE]`` = 8.4 us, NCCL tuning.cc).
"""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.graph import GraphOptions, build_graph
from tensorstage.hardware.system import load_system
from tensorstage.model.spec import ModelSpec
from tensorstage.schedule.program import CollKind
from tensorstage.sim.collectives import (
    Fabric,
    Tier,
    all_reduce_s,
    all_to_all_s,
    collective_time_s,
)
from tensorstage.sim.machine import fabric_from_system

SPEC = ModelSpec(name="tiny", num_layers=2, hidden=256, num_heads=4, ffn=1024, vocab=1000, max_seq=512)


def _optimizer_bytes_per_param(**opts: object) -> float:
    g = build_graph(SPEC, "train", GraphOptions(**opts))
    rep = g.costs({"b": 1, "s": 64}, exact=True)
    return rep.totals["optimizer_bytes"] / g.param_count()


@pytest.mark.parametrize(
    ("precision", "impl", "per_param"),
    [
        # fused Adam on fp16 gradients (fp16's default): read g2 + master4 + m4 + v4, write master4 +
        # m4 + v4 + 16-bit param 2
        ("fp16", "fused", 14 + 14),
        # Megatron fp16, fp16 gradient buffer: zero(w2) + /dp(r2 w2) + .float() copy(r2 w4) +
        # unscale(r4 w4) + l2norm(r4) + adam(r16 w12) + copy to the model(r4 w2)
        ("fp16", "megatron", 2 + 4 + 6 + 8 + 4 + 28 + 6),
        # Megatron bf16: no loss scaler, so no unscale pass
        ("bf16", "megatron", 4 + 8 + 4 + 28 + 6),
        # fp32 training: no master copy, Adam updates the parameter in place, no copy kernel
        ("fp32", "megatron", 4 + 8 + 4 + 28),
    ],
)
def test_optimizer_bytes_per_parameter(precision: str, impl: str, per_param: int) -> None:
    assert _optimizer_bytes_per_param(precision=precision, optimizer_impl=impl) == per_param


def test_optimizer_bytes_fp16_with_fp32_gradients() -> None:
    """``--accumulate-allreduce-grads-in-fp32``: the fp32 buffer is what the step reads, no copy pass:
    zero(w4) + /dp(r4 w4) + unscale(r4 w4) + l2norm(r4) + adam(r16 w12) + copy to the model(r4 w2)."""
    assert _optimizer_bytes_per_param(precision="fp16", grad_dtype="fp32") == 4 + 8 + 8 + 4 + 28 + 6


def test_optimizer_impl_is_validated() -> None:
    with pytest.raises(SpecError) as exc:
        GraphOptions(optimizer_impl="apex").validate()
    assert exc.value.field == "optimizer_impl"


def test_megatron_step_is_one_op_per_weight() -> None:
    """``lower.assemble`` shards optimizer nodes per weight (ZeRO, expert weights)."""
    g = build_graph(SPEC, "train")
    for blk in g.blocks().values():
        assert len(blk.optimizer) == len(blk.weights)


A0, B0 = 3.4e-6, 240e9
BASE = 8.4e-6  # NCCL src/graph/tuning.cc baseLat[RING][SIMPLE]
S = 64 * 2**20


def test_ring_base_latency_once_per_collective() -> None:
    fab = Fabric((Tier("nvl", 8, B0, A0),), ring_base_latency_s=BASE)
    t, algo = all_reduce_s(S, (8,), fab)
    assert algo == "ring"
    # ring all-reduce on 8: 2(n-1)/n * S/B + 2(n-1) alpha, plus the base latency once
    assert t == pytest.approx(BASE + 2 * 7 / 8 * S / B0 + 2 * 7 * A0, rel=1e-12)
    t_rs, _ = collective_time_s(CollKind.REDUCE_SCATTER, S, (8,), fab)
    # ring reduce-scatter: (n-1)/n * S/B + (n-1) alpha, plus the base latency once
    assert t_rs == pytest.approx(BASE + 7 / 8 * S / B0 + 7 * A0, rel=1e-12)
    t_ag, _ = collective_time_s(CollKind.ALL_GATHER, S / 8, (8,), fab)
    assert t_ag == pytest.approx(t_rs, rel=1e-12)
    # all-to-all is grouped send/recv in NCCL, outside the collective tuning model
    assert all_to_all_s(S, (8,), fab)[0] == pytest.approx(7 / 8 * S / B0 + A0, rel=1e-12)


def test_preset_fabric_carries_nccl_base_latency() -> None:
    assert fabric_from_system(load_system("dgx-a100-selene")).ring_base_latency_s == pytest.approx(8.4e-6)


def test_negative_base_latency_rejected() -> None:
    with pytest.raises(SpecError) as exc:
        Fabric((Tier("nvl", 8, B0, A0),), ring_base_latency_s=-1.0)
    assert exc.value.field == "fabric.ring_base_latency_s" and ">= 0" in str(exc.value)
