"""``moe_a2a_overlap``: one micro-batch's forward and another's backward run as independent chains, so
each one's expert-parallel all-to-alls can run under the other's compute (Megatron-Core combined 1F1B).
"""

from __future__ import annotations

import pytest

from tensorstage import api
from tensorstage.errors import SpecError
from tensorstage.lower.assemble import overlap_pairs
from tensorstage.schedule.pipeline import Kind, StepComm, pipeline_order


def _steps(pp: int, m: int, rank: int) -> list[StepComm]:
    return [StepComm(a, None, None) for a in pipeline_order("1f1b", pp, m)[rank]]


def test_pairs_are_each_backward_with_the_next_forward():
    # one stage, 4 micro-batches: F0 B0 F1 B1 F2 B2 F3 B3 -> B(i) runs beside F(i+1)
    steps = _steps(1, 4, 0)
    assert [f"{s.action.kind.value}{s.action.microbatch}" for s in steps] == \
        ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]
    assert overlap_pairs(steps) == {2, 4, 6}
    for i in overlap_pairs(steps):
        assert (steps[i - 1].action.kind, steps[i].action.kind) == (Kind.B, Kind.F)


def test_rules():
    with pytest.raises(SpecError, match="moe_a2a_overlap"):
        api.make_plan(ep=1, moe_a2a_overlap=True)
    with pytest.raises(SpecError, match="moe_a2a_overlap"):
        api.make_plan(dp=2, ep=2, pp=2, moe_a2a_overlap=True)


def test_overlap_hides_all_to_alls_without_changing_the_work():
    """EP 16 across two nodes (the all-to-alls cross InfiniBand): with the overlap the step is shorter,
    less all-to-all time is exposed, the model FLOPs are the same, and the step is still at least the
    busiest rank's compute (nothing runs faster than the compute stream)."""
    kw = dict(tp=1, pp=1, dp=16, ep=16, seq=2048, global_batch=64, micro_batch=1, zero=1, recompute="selective")
    plain = api.simulate("qwen3-30b-a3b", "dgx-h100-superpod", api.make_plan(**kw), full=True).result
    over = api.simulate("qwen3-30b-a3b", "dgx-h100-superpod", api.make_plan(moe_a2a_overlap=True, **kw),
                        full=True).result
    a2a = "all_to_all/ep"
    assert over.step_time_s < plain.step_time_s
    assert over.classes[0].exposed_comm_s[a2a] < plain.classes[0].exposed_comm_s[a2a]
    assert over.classes[0].model_flops == plain.classes[0].model_flops
    assert over.step_time_s >= max(c.compute_busy_s for c in over.classes)


def test_fp8_dispatch_bytes():
    """DeepSeek-V3 sec. 3.3.2: rows toward the experts in FP8 plus one fp32 scale per 128 elements,
    combines in BF16. Qwen3-30B-A3B (hidden 2048, top-8), 2048 tokens per rank, EP 4."""
    from tensorstage.lower import lower_blocks_cached
    from tensorstage.model import resolve_model
    from tensorstage.schedule.program import CollKind, NodeKind

    spec = resolve_model("qwen3-30b-a3b")
    h, k, tokens = spec.hidden, spec.moe.top_k, 2048

    def a2a(**kw):
        plan = api.make_plan(tp=1, pp=1, dp=4, ep=4, seq=tokens, global_batch=4, micro_batch=1, **kw)
        _, blocks = lower_blocks_cached(spec, plan)
        moe = blocks["moe"]
        pick = lambda nodes: {n.name.split(":")[0]: n.comm_bytes for n in nodes  # noqa: E731
                              if n.kind == NodeKind.COLL and n.comm == CollKind.ALL_TO_ALL and ".a2a" in n.name}
        return pick(moe.forward), pick(moe.backward)

    fwd, bwd = a2a(dtype="fp8", moe_dispatch_fp8=True)
    assert fwd["moe.dispatch.a2a"] == tokens * k * (h + 4 * h // 128)  # 1 byte + scales
    assert fwd["moe.combine.a2a"] == tokens * k * h * 2  # bf16
    assert bwd["moe.combine.grad_experts.a2a"] == tokens * k * (h + 4 * h // 128)  # gradients toward experts
    assert bwd["moe.dispatch.grad.a2a"] == tokens * k * h * 2
    plain, _ = a2a(dtype="fp8")
    assert plain["moe.dispatch.a2a"] == tokens * k * h * 2
    with pytest.raises(SpecError, match="moe_dispatch_fp8"):
        api.make_plan(dp=2, ep=2, dtype="bf16", moe_dispatch_fp8=True)
