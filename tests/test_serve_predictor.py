"""Iteration-cost predictor: identities that follow from the parallel layouts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tensorstage.graph import GraphOptions, build_graph
from tensorstage.hardware.system import load_system
from tensorstage.lower.blocks import lower_blocks
from tensorstage.model.resolve import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind
from tensorstage.serve import ServingPlan
from tensorstage.serve.serving import build_predictor

SYSTEM = load_system("dgx-h100-superpod")


def test_attention_dp_of_a_dense_model_is_replicas_in_lockstep():
    """Dense model, attention-DP over 2 GPUs, 2N requests = one GPU with N of them (no communication)."""
    spec = resolve_model("llama3.1-8b")
    one = build_predictor(spec, SYSTEM, ServingPlan(tp=1))
    two = build_predictor(spec, SYSTEM, ServingPlan(tp=2, attention_dp=True))
    ctx = np.array([100, 700, 2500, 33])
    a = one.iteration([], [], ctx, 4).total_s
    b = two.iteration([], [], np.concatenate([ctx, ctx]), 8).total_s
    assert b == pytest.approx(a, rel=1e-12)
    pa = one.iteration([300, 40], [0, 200], [], 1).total_s
    pb = two.iteration([300, 40, 300, 40], [0, 200, 0, 200], [], 2).total_s
    assert pb == pytest.approx(pa, rel=1e-12)
    assert two.kv_bytes_per_token() == one.kv_bytes_per_token() / 2
    assert two.weight_bytes_per_device() == one.weight_bytes_per_device()


def test_tp_communication_is_the_lowering_all_reduces():
    """TP 4: per step of T tokens, the predictor's collectives are the block lowering's all-reduces
    (two per layer + the vocab-parallel embedding) of T x hidden x 2 bytes each."""
    spec = resolve_model("llama2-70b")
    pred = build_predictor(spec, SYSTEM, ServingPlan(tp=4))
    kinds = [k for k, *_ in pred._comm]
    assert kinds.count(CollKind.ALL_REDUCE) == len(kinds) == 3
    T = 777
    total = sum(b0 + b1 * T for _, b0, b1, _ in pred._comm)
    assert total == pytest.approx((2 * spec.num_layers + 1) * T * spec.hidden * 2)


def test_attention_dp_moe_splits_experts_and_adds_all_to_alls():
    spec = resolve_model("qwen3-30b-a3b")
    tp1 = build_predictor(spec, SYSTEM, ServingPlan(tp=1))
    dp4 = build_predictor(spec, SYSTEM, ServingPlan(tp=4, attention_dp=True))
    assert {k for k, *_ in dp4._comm} == {CollKind.ALL_TO_ALL}
    g = build_graph(spec, "prefill", GraphOptions())
    expert = sum(g.evaluate(t.numel) for t in g.layers["moe"].weights if t.dims and t.dims[0] == "e")
    expert_bytes = expert * spec.num_layers * 2
    assert dp4.weight_bytes_per_device() == pytest.approx(tp1.weight_bytes_per_device() - expert_bytes * 3 / 4)
    plan = ParallelPlan(tp=1, dp=4, ep=4, phase="prefill", seq=512, micro_batch=1, global_batch=4)
    assert lower_blocks(g, plan)  # the plan the predictor reads its all-to-alls from is valid


def test_moe_expert_gemms_are_grouped_with_each_experts_rows():
    """MoE experts in a serving step: one grouped GEMM per projection over the local experts, each
    expert multiplying step tokens x top_k / experts rows (balanced), timed with the measured
    grouped-GEMM efficiency (the same node the training lowering emits)."""
    from tensorstage.sim.compute import GROUPED_OP

    spec = resolve_model("qwen3-30b-a3b")
    moe = spec.moe
    for plan, local in ((ServingPlan(tp=2), moe.num_experts), (ServingPlan(tp=4, attention_dp=True), moe.num_experts // 4)):
        pred = build_predictor(spec, SYSTEM, plan)
        grouped = [t for t in pred._layer_terms["moe"] if t.kind == GROUPED_OP]
        assert len(grouped) == 2  # the experts' fused gate/up (w13) and down projections
        for t in grouped:
            assert t.gemm_nk[0] == local and t.routed == pytest.approx(moe.top_k / moe.num_experts)
        t = grouped[0]
        tokens = 4096
        rows = round(tokens * t.routed)
        kt = pred.compute.kernels
        dense = pred.compute.time_s(t.flops0 + t.flops1 * tokens, t.bytes0 + t.bytes1 * tokens, "matmul",
                                    (t.gemm_nk[0], rows, t.gemm_nk[1], t.gemm_nk[2]))
        eff = kt.grouped_gemm_efficiency(rows, min(t.gemm_nk[1], t.gemm_nk[2]))
        launch = pred.compute.launch_s
        assert pred._op_time(t, tokens) - launch == pytest.approx((dense - launch) / eff)


def test_small_moe_steps_read_only_the_picked_experts_weights():
    """One decode token picks top_k experts: the step reads those experts' weights, not all of them
    (balanced routing: an expert is active with probability 1 - (1 - top_k/experts)^tokens)."""
    from tensorstage.sim.compute import GROUPED_OP

    spec = resolve_model("qwen3-30b-a3b")
    moe = spec.moe
    pred = build_predictor(spec, SYSTEM, ServingPlan(tp=1))
    t = next(x for x in pred._layer_terms["moe"] if x.kind == GROUPED_OP)
    weights = moe.num_experts * spec.hidden * 2 * moe.expert_ffn * 2  # every expert's fused gate/up, bf16
    assert t.bytes0 == pytest.approx(weights, rel=1e-9)
    hbm = pred.compute.hbm_Bps
    picked = moe.top_k / moe.num_experts * weights  # top_k experts' weights
    one = pred._op_time(t, 1) - pred.compute.launch_s
    assert picked / hbm <= one <= 1.5 * picked / hbm  # weight-read bound, within the grouped efficiency
    # many tokens touch every expert: the whole weight set is read
    many = 1 - (1 - moe.top_k / moe.num_experts) ** 512
    assert many > 0.999
    assert pred._op_time(t, 512) - pred.compute.launch_s >= weights / hbm


def test_per_query_head_decode_reads_cost_what_mha_reads_cost():
    """``gqa_kv_reuse`` off (TensorRT-LLM's masked-MHA generation kernel, one thread block per query
    head): a GQA model's decode attention reads its KV once per query head, which is exactly the
    traffic of the same model with one KV head per query head. Prefill, the token-linear work and
    the KV cache's size do not change."""
    from tensorstage.serve import load_profile

    spec = resolve_model("llama2-70b")  # 64 query heads, 8 KV heads
    mha = spec.model_copy(update={"num_kv_heads": None})
    plan = ServingPlan(engine=load_profile("static"), tp=2, weight_dtype="fp8", kv_dtype="fp8")
    shared = build_predictor(spec, SYSTEM, plan)
    per_head = build_predictor(spec, SYSTEM, replace(plan, engine=load_profile("static", gqa_kv_reuse=False)))
    as_mha = build_predictor(mha, SYSTEM, plan)
    ctx = np.array([129.0, 900.0, 2047.0, 4000.0])
    assert per_head.attention_s([], [], ctx) == pytest.approx(as_mha.attention_s([], [], ctx), rel=1e-12)
    big = np.full(256, 2000.0)  # bandwidth-bound: the K/V reads dominate
    assert per_head.attention_s([], [], big)[0] > 4 * shared.attention_s([], [], big)[0]
    assert per_head.attention_s([512], [0], np.array([])) == shared.attention_s([512], [0], np.array([]))
    assert per_head.linear_s(64, 64) == shared.linear_s(64, 64)
    assert per_head.kv_bytes_per_token() == shared.kv_bytes_per_token() == as_mha.kv_bytes_per_token() / 8


def test_fused_projections_follow_the_engine():
    """Every engine runs q, k and v as one GEMM; vLLM (MergedColumnParallelLinear) also runs gate and
    up as one, TensorRT-LLM's 0.5-0.7 TRT engines (the ``static`` profile) as two. Same FLOPs and
    weight bytes either way; a view of the fused output launches no kernel."""
    from tensorstage.serve import load_profile

    spec = resolve_model("llama3.1-8b")
    f, h, tp = spec.ffn, spec.hidden, 2
    q_width = (spec.num_heads + 2 * spec.kv_heads) * spec.dim_head // tp
    preds = {name: build_predictor(spec, SYSTEM, ServingPlan(engine=load_profile(name), tp=tp))
             for name in ("vllm", "static")}
    shapes = {name: [t.gemm_nk for t in p._layer_terms["dense"] if t.gemm_nk] for name, p in preds.items()}
    assert shapes["vllm"] == [(1, q_width, h), (1, h, spec.num_heads * spec.dim_head // tp), (1, 2 * f // tp, h),
                              (1, h, f // tp)]
    assert shapes["static"] == [(1, q_width, h), (1, h, spec.num_heads * spec.dim_head // tp), (1, f // tp, h),
                                (1, f // tp, h), (1, h, f // tp)]
    for m in (1, 64, 4096):
        flops = {name: sum(t.flops0 + t.flops1 * m for t in p._layer_terms["dense"]) for name, p in preds.items()}
        assert flops["vllm"] == pytest.approx(flops["static"], rel=1e-12)
    assert preds["vllm"].weight_bytes_per_device() == preds["static"].weight_bytes_per_device()
    assert not [t for t in preds["vllm"]._layer_terms["dense"] if t.kind == "layout" and t.flops0 == t.bytes0 == 0
                and t.flops1 == t.bytes1 == 0]


@pytest.mark.parametrize(("tp", "group"), [(1, 8), (4, 8), (8, 8), (16, 4), (32, 2)])
def test_per_query_head_reads_use_the_rank_s_own_group(tp: int, group: int):
    """Without KV reuse a rank reads its KV once per *local* query head: TP gives each rank nh/tp
    query heads and max(1, nkv/tp) KV heads (replicated beyond nkv), so Llama-3.1-70B (64 / 8) reads
    8x up to TP 8, 4x at TP 16 and 2x at TP 32."""
    from tensorstage.serve import load_profile

    spec = resolve_model("llama3.1-70b")
    plan = ServingPlan(engine=load_profile("static"), tp=tp, weight_dtype="fp8", kv_dtype="fp8")
    on = build_predictor(spec, SYSTEM, plan)
    off = build_predictor(spec, SYSTEM, replace(plan, engine=load_profile("static", gqa_kv_reuse=False)))
    slope = [sum(fb.coef[1] for _, _, fb in p._dc_attn["dense"]) for p in (on, off)]
    assert slope[1] == pytest.approx(group * slope[0], rel=1e-12)
