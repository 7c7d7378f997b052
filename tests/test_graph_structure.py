"""Structure of the graph: autodiff split, phases, recompute, optimizer bytes, MoE capacity, errors.

Expected values are closed forms written here (weight-grad FLOPs = 2 x tokens x matmul weights;
decode attention = 4*b*nh*dh*c per layer; Megatron 18 / ZeRO 16 bytes per parameter from
public_cases.yaml F-MEGATRON-BYTES / F-ADAM-ZERO), not outputs of the code under test.
"""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.graph import GraphOptions, build_graph, state_bytes_per_param
from tensorstage.model.spec import ModelSpec, MoESpec

LLAMA = ModelSpec(
    name="llama-ish",
    num_layers=3,
    hidden=512,
    num_heads=8,
    num_kv_heads=2,
    ffn=1536,
    vocab=1000,
    max_seq=4096,
)
MOE = ModelSpec(
    name="moe-ish",
    num_layers=2,
    hidden=256,
    num_heads=4,
    ffn=512,
    vocab=500,
    moe=MoESpec(num_experts=8, top_k=2, expert_ffn=128, shared_experts=1),
)


def _layer_matmul_params(spec: ModelSpec) -> int:
    h, dh, nh, nkv, f = spec.hidden, spec.dim_head, spec.num_heads, spec.kv_heads, spec.ffn
    return h * nh * dh + 2 * h * nkv * dh + nh * dh * h + 3 * h * f


def test_weight_and_input_grads_are_separate_ops() -> None:
    g = build_graph(LLAMA, "train")
    layer = g.layers["dense"]
    fwd_einsums = [op for op in layer.forward if op.kind == "einsum"]
    for op in fwd_einsums:
        grads = [b for b in layer.backward if b.grad_of is op and b.kind == "einsum"]
        weights = [t for t in op.inputs if t.role == "weight"]
        assert len(grads) == sum(t.requires_grad for t in op.inputs)
        assert sum(b.category == "bwd_weight" for b in grads) == len(weights)
        for b in grads:
            assert b.einsum is not None and b.flops == op.flops
            if b.category == "bwd_weight":
                assert b.outputs[0].role == "weight_grad" and b.outputs[0].dtype == "fp32"


def test_weight_grad_flops_equal_two_tokens_params() -> None:
    b, s = 2, 1024
    rep = build_graph(LLAMA, "train").costs({"b": b, "s": s}, exact=True)
    assert rep.per_block["dense"]["bwd_weight_flops"] == 2 * b * s * _layer_matmul_params(LLAMA)
    assert rep.per_block["head"]["bwd_weight_flops"] == 2 * b * s * LLAMA.hidden * LLAMA.vocab


def test_decode_and_prefill_have_no_backward_and_count_kv() -> None:
    b, c = 4, 3000
    dec = build_graph(LLAMA, "decode")
    rep = dec.costs({"b": b, "c": c}, exact=True)
    h, nh, dh = LLAMA.hidden, LLAMA.num_heads, LLAMA.dim_head
    per_layer = 2 * b * _layer_matmul_params(LLAMA) + 4 * b * nh * dh * c  # no causal halving for 1 token
    assert rep.per_block["dense"]["fwd_flops"] == per_layer
    assert rep.per_block["head"]["fwd_flops"] == 2 * b * h * LLAMA.vocab
    for cat in ("bwd_input", "bwd_weight", "recompute", "optimizer"):
        assert rep.totals[f"{cat}_flops"] == 0 and rep.totals[f"{cat}_bytes"] == 0
    assert rep.totals["activation_bytes"] == 0
    # the step reads the whole cache of c tokens: K and V, nkv heads, bf16
    kv_read = sum(g_op.bytes_read for g_op in dec.layers["dense"].forward if g_op.kind == "attention")
    assert dec.evaluate(kv_read, {"b": b, "c": c}) >= b * c * 2 * LLAMA.kv_heads * dh * 2
    pre = build_graph(LLAMA, "prefill").costs({"b": b, "s": 512}, exact=True)
    assert pre.per_block["head"]["fwd_flops"] == 2 * b * h * LLAMA.vocab  # last position only


def test_execution_order() -> None:
    g = build_graph(LLAMA, "train", GraphOptions(recompute="full"))
    seq = list(g.execution())
    cats = [op.category for _, _, op in seq]
    assert cats[0] == "fwd" and cats[-1] == "optimizer"
    layer_of_bwd = [i for i, _, op in seq if i is not None and op.category in ("recompute", "bwd_input")]
    assert layer_of_bwd == sorted(layer_of_bwd, reverse=True)
    first = {}
    for i, _, op in seq:
        if i is not None:
            first.setdefault((i, op.category), len(first))
    for i in range(LLAMA.num_layers):
        assert first[(i, "recompute")] < first[(i, "bwd_input")]


def test_model_state_bytes_per_param() -> None:
    """Megatron-LM's table (docs/user-guide/features/dist_optimizer.md, non-distributed optimizer):
    fp16 parameters with fp16 gradients 20, bf16 with fp32 gradients 18, fp32 16 bytes per parameter;
    ZeRO's K = 12 accounting (16-bit gradients, a fused step with no fp32 gradient copy) 16."""
    assert sum(state_bytes_per_param(GraphOptions(precision="bf16")).values()) == 18  # Megatron
    assert sum(state_bytes_per_param(GraphOptions(precision="fp16")).values()) == 20  # Megatron, fp16 grads
    assert sum(state_bytes_per_param(GraphOptions(precision="fp16", grad_dtype="fp32")).values()) == 18
    assert sum(state_bytes_per_param(GraphOptions(precision="bf16", grad_dtype="bf16",
                                                  optimizer_impl="fused")).values()) == 16  # ZeRO
    assert sum(state_bytes_per_param(GraphOptions(precision="fp32")).values()) == 16  # w, g, m, v
    g = build_graph(LLAMA, "train", GraphOptions(optimizer_impl="fused"))
    rep = g.costs({"b": 1, "s": 128}, exact=True)
    # fused AdamW step: read g(4) + master(4) + m(4) + v(4), write master, m, v (12) + bf16 param (2)
    assert rep.totals["optimizer_bytes"] == 30 * g.param_count()


def test_moe_capacity_factor_scales_expert_flops() -> None:
    b, s = 2, 256
    base = build_graph(MOE, "train").costs({"b": b, "s": s}, exact=True)
    padded = build_graph(MOE, "train", GraphOptions(capacity_factor=1.25)).costs({"b": b, "s": s}, exact=True)
    m = MOE.moe
    expert_fwd = 2 * 3 * b * s * m.top_k * MOE.hidden * m.expert_ffn
    assert padded.per_block["moe"]["fwd_flops"] - base.per_block["moe"]["fwd_flops"] == expert_fwd // 4


@pytest.mark.parametrize(
    ("field", "kw"),
    [
        ("phase", {"phase": "serve"}),
        ("recompute", {"recompute": "some"}),
        ("attention_impl", {"attention_impl": "sparse"}),
        ("precision", {"precision": "int4"}),
        ("optimizer", {"optimizer": "lion"}),
        ("routing_skew", {"routing_skew": 0.5}),
    ],
)
def test_bad_options_raise_spec_error(field: str, kw: dict) -> None:
    phase = kw.pop("phase", "train")
    with pytest.raises(SpecError) as exc:
        build_graph(LLAMA, phase, GraphOptions(**kw))
    assert exc.value.field == field


def test_unknown_binding_raises_spec_error() -> None:
    with pytest.raises(SpecError) as exc:
        build_graph(LLAMA, "train").costs({"batch": 1})
    assert exc.value.field == "bindings" and "'batch'" in str(exc.value)
    assert {"b", "s"} <= set(exc.value.allowed)  # the dimensions one may bind are listed


def test_routing_skew_sizes_hot_expert_not_totals() -> None:
    b, s = 2, 256
    mean = b * s * MOE.moe.top_k / MOE.moe.num_experts
    base = build_graph(MOE, "train")
    skewed = build_graph(MOE, "train", GraphOptions(routing_skew=3.0))
    capped = build_graph(MOE, "train", GraphOptions(routing_skew=3.0, capacity_factor=1.5))
    bind = {"b": b, "s": s}
    assert base.costs(bind, exact=True).totals == skewed.costs(bind, exact=True).totals
    for g, hot in ((base, mean), (skewed, 3 * mean), (capped, 1.5 * mean)):
        op = next(o for o in g.layers["moe"].forward if o.kind == "dispatch")
        assert float(g.evaluate(op.attrs["hot_expert_tokens"], bind)) == hot
        assert float(g.evaluate(op.attrs["mean_expert_tokens"], bind)) == mean


SWA = ModelSpec(
    name="swa-ish",
    num_layers=2,
    hidden=256,
    num_heads=4,
    ffn=512,
    vocab=500,
    sliding_window=128,
    sliding_window_layers=(0,),
)


def test_sliding_window_attention_flops() -> None:
    b, s, w, nh, dh = 2, 1024, 128, 4, 64
    for conv, pairs in (("causal_half", s * w - w * w // 2), ("full", s * w)):
        g = build_graph(SWA, "train", GraphOptions(attention_flops=conv, attention_impl="flash"))
        assert g.layer_kinds == ["dense_swa", "dense"]
        rep = g.costs({"b": b, "s": s}, exact=True)
        diff = rep.per_block["dense"]["fwd_flops"] - rep.per_block["dense_swa"]["fwd_flops"]
        full_pairs = s * s // 2 if conv == "causal_half" else s * s
        assert diff == 2 * b * nh * (full_pairs - pairs) * 2 * dh  # QK^T + PV
    # decode: a window layer reads min(c, w) cached tokens, a full layer all c
    dec = build_graph(SWA, "decode").costs({"b": b, "c": 1000}, exact=True)
    diff = dec.per_block["dense"]["fwd_flops"] - dec.per_block["dense_swa"]["fwd_flops"]
    assert diff == 4 * b * nh * dh * (1000 - w)
    short = build_graph(SWA, "decode").costs({"b": b, "c": 100}, exact=True)
    assert short.per_block["dense"]["fwd_flops"] == short.per_block["dense_swa"]["fwd_flops"]


def test_sliding_window_vectorized_equals_exact() -> None:
    import numpy as np

    g = build_graph(SWA, "train")
    b, s = np.array([1, 2, 4]), np.array([64, 1024, 4096])  # below and above the window
    vec = g.costs({"b": b, "s": s}).totals["fwd_flops"]
    for i in range(3):
        assert vec[i] == float(g.costs({"b": int(b[i]), "s": int(s[i])}, exact=True).totals["fwd_flops"])
