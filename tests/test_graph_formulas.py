"""The graph against published closed forms (public_cases.yaml), evaluated exactly.

* Narayanan et al. 2021 (F-FLOPS-ITER): F = 72*B*s*L*h^2*(1 + s/(6h) + V/(12*L*h)) without
  recompute, 96*B*s*L*h^2*(1 + s/(6h) + V/(16*L*h)) with full recompute. The formula counts
  matmuls only (our ``flops``), attention over the full s x s (``attention_flops="full"``), an MLP
  of width 4h, backward = 2x forward (so materialized attention: a flash kernel's backward also
  recomputes QK^T, 2.5x), and the LM head (forward + backward, never recomputed); embeddings,
  biases and norms carry no matmul FLOPs. Biases / positions / tying therefore do not change it.
* Korthikanti et al. 2022 (F-ACT-MEM): activation bytes per layer sbh(34 + 5as/h), selective
  recompute 34sbh, full recompute 2sbh, for Megatron GPT: 16-bit activations, 1-byte dropout
  masks, materialized softmax, LayerNorm saving only its input (``norm_stats=False``).
* F-KV-CACHE: KV-cache bytes per token for Llama-2-70B, Llama-3.1-8B and DeepSeek-V3 (MLA).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from tensorstage.graph import GraphOptions, build_graph
from tensorstage.model.spec import MLASpec, ModelSpec, MoESpec
from tests.support import megatron_gpt, public_cases


def _cases() -> dict:
    return public_cases()


def _narayanan_models() -> list[dict]:
    out = []
    for case in _cases()["cases"]:
        if case["id"].startswith("TRAIN-NARAYANAN21"):
            m = case["model"]
            out.append(
                {
                    "id": case["id"],
                    "L": m["layers"],
                    "h": m["hidden"],
                    "a": m["heads"],
                    "V": m["vocab"],
                    "s": m["seq_len"],
                    "B": case["parallel"]["global_batch"],
                }
            )
    assert out, "no Narayanan cases found"
    return out


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_narayanan_flops_per_iteration_exact(recompute: str) -> None:
    for m in _narayanan_models():
        L, h, V, s, B = m["L"], m["h"], m["V"], m["s"], m["B"]
        if recompute == "none":
            expect = 72 * B * s * L * h**2 * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * L * h))
        else:
            expect = 96 * B * s * L * h**2 * (1 + Fraction(s, 6 * h) + Fraction(V, 16 * L * h))
        g = build_graph(
            megatron_gpt(L, h, m["a"], V, s),
            "train",
            GraphOptions(attention_flops="full", attention_impl="materialized", recompute=recompute),
        )
        rep = g.costs({"b": B, "s": s}, exact=True)
        assert rep.total_flops() == expect, m["id"]


def test_causal_half_convention_halves_only_attention_core() -> None:
    spec = megatron_gpt(2, 256, 4, 1000, 512)
    full = build_graph(spec, "train", GraphOptions(attention_flops="full")).costs(
        {"b": 1, "s": 512}, exact=True
    )
    half = build_graph(spec, "train", GraphOptions(attention_flops="causal_half")).costs(
        {"b": 1, "s": 512}, exact=True
    )
    L, h, s = 2, 256, 512
    # forward attention core: QK^T + PV = 4*b*s^2*h non-causal per layer; flash bwd = 2.5x fwd
    core_fwd = 4 * s * s * h * L
    assert full.totals["fwd_flops"] - half.totals["fwd_flops"] == core_fwd // 2
    assert full.totals["bwd_input_flops"] - half.totals["bwd_input_flops"] == Fraction(5, 2) * core_fwd // 2


def _megatron_gpt(h: int = 1024, a: int = 16) -> ModelSpec:
    return megatron_gpt(4, h, a, 50304, 2048)


MEGATRON_OPTS = {
    "attention_impl": "materialized",
    "dropout": True,
    "dropout_mask_dtype": "bool",
    "precision": "bf16",
    "norm_stats": False,
}


@pytest.mark.parametrize(
    ("recompute", "formula"),
    [
        ("none", lambda s, b, h, a: s * b * h * (34 + Fraction(5 * a * s, h))),
        ("selective", lambda s, b, h, a: 34 * s * b * h),
        ("full", lambda s, b, h, a: 2 * s * b * h),
    ],
)
def test_korthikanti_activation_bytes_per_layer_exact(recompute: str, formula) -> None:
    for h, a in ((1024, 16), (4096, 32)):
        g = build_graph(_megatron_gpt(h, a), "train", GraphOptions(recompute=recompute, **MEGATRON_OPTS))
        for s, b in ((2048, 1), (4096, 2)):
            got = g.costs({"b": b, "s": s}, exact=True).per_layer("activation_bytes")
            assert all(x == formula(s, b, h, a) for x in got)


def test_recompute_changes_executed_flops_not_model_flops() -> None:
    spec = _megatron_gpt()
    base = build_graph(spec, "train", GraphOptions(**MEGATRON_OPTS)).costs({"b": 1, "s": 2048}, exact=True)
    full = build_graph(spec, "train", GraphOptions(recompute="full", **MEGATRON_OPTS)).costs(
        {"b": 1, "s": 2048}, exact=True
    )
    sel = build_graph(spec, "train", GraphOptions(recompute="selective", **MEGATRON_OPTS)).costs(
        {"b": 1, "s": 2048}, exact=True
    )
    layer = base.per_block["dense"]
    assert full.per_block["dense"]["recompute_flops"] == layer["fwd_flops"]
    # selective recomputes QK^T and PV only: 4*b*s^2*h/2 (causal) per layer
    assert sel.per_block["dense"]["recompute_flops"] == 4 * 2048**2 * 1024 // 2
    for rep in (full, sel):
        assert rep.totals["fwd_flops"] == base.totals["fwd_flops"]
        assert rep.totals["bwd_weight_flops"] == base.totals["bwd_weight_flops"]


LLAMA2_70B = ModelSpec(
    name="llama-2-70b",
    num_layers=80,
    hidden=8192,
    num_heads=64,
    num_kv_heads=8,
    ffn=28672,
    vocab=32000,
    max_seq=4096,
)
LLAMA31_8B = ModelSpec(
    name="llama-3.1-8b",
    num_layers=32,
    hidden=4096,
    num_heads=32,
    num_kv_heads=8,
    ffn=14336,
    vocab=128256,
    max_seq=131072,
)
DEEPSEEK_V3 = ModelSpec(
    name="deepseek-v3",
    num_layers=61,
    hidden=7168,
    num_heads=128,
    ffn=18432,
    vocab=129280,
    max_seq=4096,
    moe=MoESpec(num_experts=256, top_k=8, expert_ffn=2048, shared_experts=1, dense_layers=(0, 1, 2)),
    mla=MLASpec(
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128
    ),
)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_kv_cache_bytes_per_token(phase: str) -> None:
    checks = next(f for f in _cases()["formulas"] if f["id"] == "F-KV-CACHE")["checks"]
    expect = {c["model"].split()[0]: c["expect_bytes_per_token"] for c in checks}
    assert set(expect) == {"Llama-2-70B", "Llama-3.1-8B", "DeepSeek-V3"}
    for name, spec, prec in (
        ("Llama-2-70B", LLAMA2_70B, "fp16"),
        ("Llama-3.1-8B", LLAMA31_8B, "bf16"),
        ("DeepSeek-V3", DEEPSEEK_V3, "bf16"),
    ):
        g = build_graph(spec, phase, GraphOptions(precision=prec))
        assert g.kv_cache_bytes_per_token() == expect[name], name
        rep = g.costs({"b": 1, "s": 1, "c": 1000})
        assert rep.totals["kv_cache_bytes_per_token"] == expect[name]


def _dense_params(spec: ModelSpec) -> int:
    """Independent closed form for Llama/GPT-style dense models (HF conventions)."""
    h, f, V, L = spec.hidden, spec.ffn, spec.vocab, spec.num_layers
    dh, nh, nkv = spec.dim_head, spec.num_heads, spec.kv_heads
    ln = 2 if spec.norm == "layernorm" else 1
    attn = h * nh * dh + 2 * h * nkv * dh + nh * dh * h
    attn += (nh * dh + 2 * nkv * dh) if spec.qkv_bias else 0
    attn += h if spec.out_bias else 0
    mlp = (3 if spec.gated else 2) * h * f + ((2 * f + h if spec.gated else f + h) if spec.mlp_bias else 0)
    emb = V * h + (spec.max_seq * h if spec.positions == "learned" else 0)
    head = 0 if spec.tied_embeddings else V * h
    return L * (attn + mlp + 2 * ln * h) + ln * h + emb + head


def test_param_counts_match_closed_forms() -> None:
    for spec in (
        LLAMA2_70B,
        LLAMA31_8B,
        megatron_gpt(3, 96, 4, 500, 64),
        megatron_gpt(2, 64, 4, 100, 32).model_copy(update={"tied_embeddings": False}),
    ):
        assert build_graph(spec, "train").param_count() == _dense_params(spec), spec.name
    # Narayanan's F-PARAMS-DENSE: 12Lh^2(1 + 13/(12h) + (V+s)/(12Lh)) for tied GPT with biases;
    # the formula leaves out the final LayerNorm (2h), which the model has
    L, h, V, s = 96, 12288, 51200, 2048
    expect = 12 * L * h * h * (1 + Fraction(13, 12 * h) + Fraction(V + s, 12 * L * h))
    assert build_graph(megatron_gpt(L, h, 96, V, s), "train").param_count() == expect + 2 * h


def test_deepseek_v3_params_match_model_card() -> None:
    # model card: 671B main-model parameters (the 14B multi-token-prediction module excluded)
    total = build_graph(DEEPSEEK_V3, "train").param_count()
    assert abs(total - 671e9) / 671e9 < 5e-4


def test_every_preset_matches_model_param_counts() -> None:
    """Graph weights vs the model package's closed forms (checked there against torch meta modules)."""
    from tensorstage.model import get_preset, list_presets, param_counts

    for name in list_presets():
        spec = get_preset(name)
        assert build_graph(spec, "train").param_count() == param_counts(spec).total, name


def test_vectorized_costs_equal_exact() -> None:
    g = build_graph(LLAMA31_8B, "train", GraphOptions(recompute="selective"))
    b = np.array([1, 2, 4])
    s = np.array([1024, 2048, 8192])
    vec = g.costs({"b": b, "s": s})
    for i in range(3):
        ex = g.costs({"b": int(b[i]), "s": int(s[i])}, exact=True)
        for metric in ("fwd_flops", "bwd_weight_flops", "activation_bytes", "optimizer_bytes"):
            assert vec.totals[metric][i] == pytest.approx(float(ex.totals[metric]), rel=1e-12)
