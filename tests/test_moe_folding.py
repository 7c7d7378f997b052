"""Megatron MoE parallel folding (``etp 1``): expert parallelism laid over the TP ranks too.

Megatron-Core's "MoE parallel folding" (``--expert-tensor-parallel-size 1``) lets the expert layers
re-factor ``tp * cp * dp`` as ``ep * edp`` while attention keeps TP/CP/DP; Qwen3-235B trains with
EP 32 on TP 2 x DP 16. Checked here from first principles: the expert view's groups, whole experts
per rank, each TP rank dispatching its own sequence shard, no TP collective in the expert region and
no TP reduction of expert gradients.
"""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.lower import lower_blocks_cached
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind, NodeKind

SPEC = resolve_model("qwen3-30b-a3b")  # 128 experts, top-8, hidden 2048, expert width 768


def plan(**kw) -> ParallelPlan:
    base = dict(pp=1, seq=2048, global_batch=8, micro_batch=1, sp=kw.get("tp", 1) > 1)
    return ParallelPlan.parse({**base, **kw})


def test_rules_and_groups():
    p = plan(tp=2, dp=2, ep=4, etp=1)
    assert p.folded and p.expert_tp == 1 and p.edp == 1
    mesh = p.mesh()
    # the expert view re-factors all of tp * cp * dp: one EP group of the four ranks, EP inner
    assert [(a.name, a.size) for a in mesh.views["expert"] if a.name != "pp"] == [("ep", 4), ("edp", 1)]
    assert plan(tp=2, dp=4, ep=4, etp=1).edp == 2  # 2 x 4 / 4 replicas of each expert
    assert not plan(tp=2, dp=4, ep=4).folded and plan(tp=2, dp=4, ep=4, etp=2).edp == 1
    with pytest.raises(SpecError, match="ep=4 must divide dp\\*cp=2"):
        plan(tp=2, dp=2, ep=4)  # without folding EP is carved out of dp * cp only
    with pytest.raises(SpecError, match="etp=3 must be 1"):
        plan(tp=2, dp=2, ep=2, etp=3)
    with pytest.raises(SpecError, match="multiple of tp=4"):
        plan(tp=4, dp=4, ep=2, etp=1)
    with pytest.raises(SpecError, match="needs sequence parallelism"):
        ParallelPlan.parse({"tp": 2, "dp": 2, "ep": 4, "etp": 1, "sp": False, "seq": 2048, "global_batch": 8})


def _moe(p: ParallelPlan):
    _, blocks = lower_blocks_cached(SPEC, p)
    return blocks["moe"]


def test_expert_region_is_local_and_whole():
    moe = SPEC.moe
    folded, plain = _moe(plan(tp=2, dp=2, ep=4, etp=1)), _moe(plan(tp=1, dp=4, ep=4))
    # same experts per rank (128 / 4 = 32), whole width: the expert weights are the plain EP rank's
    fw = {w.name: w.numel for w in folded.weights if w.expert}
    assert fw == {w.name: w.numel for w in plain.weights if w.expert}
    assert fw["moe.experts.gate_proj.weight"] == moe.num_experts // 4 * SPEC.hidden * moe.expert_ffn
    # each TP rank dispatches its own sequence shard: 2048 / 2 tokens x top-8 rows of hidden bf16
    a2a = [n for n in folded.forward if n.kind == NodeKind.COLL and n.comm == CollKind.ALL_TO_ALL
           and n.name.endswith(".a2a:all_to_all")]
    assert [n.comm_bytes for n in a2a] == [2048 // 2 * moe.top_k * SPEC.hidden * 2] * 2
    assert all(n.axes == ("ep",) for n in a2a)
    # no TP collective between dispatch and combine, in either pass
    for nodes in (folded.forward, folded.backward):
        names = [n.name for n in nodes]
        lo = min(i for i, x in enumerate(names) if "dispatch" in x)
        hi = max(i for i, x in enumerate(names) if "combine" in x)
        assert not [n.name for n in nodes[lo:hi] if n.kind == NodeKind.COLL and "tp" in n.axes]
    # expert GEMMs: 32 local experts x (1024 tokens x 8 / 32 = 256 rows), full expert width
    g = next(n for n in folded.forward if n.name.endswith("experts.gate_proj"))
    assert g.gemm == (32, 256, moe.expert_ffn, SPEC.hidden)


def test_expert_gradients_are_not_reduced_over_tp():
    """Megatron all-reduces TP-partial weight gradients (norms under SP, the router) once per step;
    with folding an expert's gradient is already complete on its rank, so only the dense ones count."""
    folded = _moe(plan(tp=2, dp=2, ep=4, etp=1))
    moe = SPEC.moe
    # what is left: the router (h x e, fp32 grads), the two layer norms and Qwen3's q/k norms (head
    # dim 128 each); one local expert projection alone would be 32 x h x f x 4 bytes
    router_and_norms = (SPEC.hidden * moe.num_experts + 2 * SPEC.hidden + 2 * 128) * 4
    assert folded.extra["tp_partial_grad_bytes"] <= router_and_norms
    assert moe.num_experts // 4 * SPEC.hidden * moe.expert_ffn * 4 > 100 * router_and_norms


def test_best_plan_searches_expert_parallelism_for_moe_models():
    """best-plan's layout space gains ep and expert TP (plain or folded) for an MoE model only, every
    enumerated MoE layout passes the plan rules, and the closed-form screen's peak memory of EP
    layouts tracks the simulator's (the screen prunes by memory before simulating)."""
    import numpy as np

    from tensorstage import api
    from tensorstage.explore.bestplan import layout_space, screen_layouts
    from tensorstage.explore.fastpath import screen
    from tensorstage.hardware.system import load_system

    dense = layout_space("llama3-8b", "dgx-h100-superpod", 16, 64, 2048)
    assert "ep" not in dense.names and "etp" not in dense.names
    moe = layout_space("qwen3-30b-a3b", "dgx-h100-superpod", 16, 64, 2048)
    assert {"ep", "etp"} <= set(moe.names)
    tasks, _, _ = screen_layouts(moe)
    plans = [t.plan for t in tasks]
    assert any(p.get("etp") == 1 and p["tp"] > 1 and p["ep"] > p["dp"] for p in plans)  # folded, ep > dp
    cases = [(2, 8, 16, 1), (1, 16, 16, None), (2, 8, 8, None)]
    cols = {"tp": np.array([c[0] for c in cases]), "dp": np.array([c[1] for c in cases]), "pp": 1,
            "ep": np.array([c[2] for c in cases]), "etp": np.array([c[3] for c in cases], dtype=object),
            "sp": np.array([c[0] > 1 for c in cases]), "seq": 2048, "global_batch": 64, "micro_batch": 1,
            "zero": 1, "recompute": "selective", "dtype": "bf16"}
    fast = screen("qwen3-30b-a3b", load_system("dgx-h100-superpod", 16), cols)["peak_memory_bytes"]
    for (tp, dp, ep, etp), f in zip(cases, fast, strict=True):
        full = api.simulate("qwen3-30b-a3b", "dgx-h100-superpod", api.make_plan(
            tp=tp, dp=dp, pp=1, ep=ep, etp=etp, sp=tp > 1, seq=2048, global_batch=64, micro_batch=1, zero=1,
            recompute="selective")).result.peak_memory_bytes
        assert f == pytest.approx(full, rel=0.15), (tp, dp, ep, etp)


@pytest.mark.parametrize("kw", [dict(tp=2, dp=2, ep=4), dict(tp=2, dp=1, pp=2, ep=2), dict(tp=2, dp=2, cp=2, ep=8)])
def test_folding_conserves_model_flops(kw):
    """Summed over all ranks, a folded plan does the one-GPU plan's model FLOPs exactly: folding moves
    experts and tokens between ranks, never adds or drops model math."""
    from pathlib import Path

    from tensorstage import api

    model = str(Path(__file__).parent / "data" / "models" / "tiny-moe.yaml")
    one = api.simulate(model, "dgx-h100-superpod", api.make_plan(
        tp=1, pp=1, dp=1, cp=1, seq=128, global_batch=16, micro_batch=1, zero=0, recompute="none", sp=False),
        full=True).result
    folded = api.simulate(model, "dgx-h100-superpod", api.make_plan(
        seq=128, global_batch=16, micro_batch=1, sp=True, etp=1, **{"pp": 1, **kw})).result
    total = sum(c.ranks * c.model_flops for c in folded.classes)
    assert total == pytest.approx(sum(c.ranks * c.model_flops for c in one.classes), rel=1e-9)
