"""Parameter counts: params.py against independent PyTorch modules and published totals."""

from __future__ import annotations

import pytest
import torch
from torchref_models import Decoder, numel, reference_active_count, reference_param_count

from tensorstage.model import ModelSpec, get_preset, list_presets, param_counts

PRESETS = list_presets()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_total_matches_torch_reference(name: str) -> None:
    """Every preset: closed form == sum(p.numel()) of the meta-device reference (0.5 % bar; exact in fact)."""
    spec = get_preset(name)
    ref = reference_param_count(spec)
    got = param_counts(spec).total
    assert abs(got - ref) <= 0.005 * ref
    assert got == ref


@pytest.mark.parametrize("name", [n for n in PRESETS if get_preset(n).moe is not None])
def test_moe_preset_active_matches_torch_reference(name: str) -> None:
    spec = get_preset(name)
    assert param_counts(spec).active == reference_active_count(spec)


def test_dense_active_equals_total() -> None:
    c = param_counts(get_preset("llama3.1-70b"))
    assert c.active == c.total


def _within_rounding(value: float, published: str) -> bool:
    """True if ``value`` rounds to ``published`` (half a unit of its last digit, plus float slack)."""
    decimals = len(published.split(".")[1]) if "." in published else 0
    return abs(value - float(published)) <= 0.5 * 10**-decimals + 1e-9


# (preset, published total in billions, published active in billions or None, source).
# Where a card's "active" excludes the input token table (a lookup, no FLOPs), we say so below.
PUBLISHED = [
    ("llama2-7b", "6.74", None, "HF hub safetensors size, meta-llama/Llama-2-7b-hf"),
    ("llama2-13b", "13.0", None, "HF hub safetensors size, meta-llama/Llama-2-13b-hf"),
    ("llama2-70b", "69.0", None, "HF hub safetensors size, meta-llama/Llama-2-70b-hf"),
    ("llama3-8b", "8.03", None, "HF hub safetensors size, meta-llama/Meta-Llama-3-8B"),
    ("llama3.1-8b", "8.03", None, "HF hub safetensors size, meta-llama/Llama-3.1-8B"),
    ("llama3-70b", "70.6", None, "HF hub safetensors size, meta-llama/Meta-Llama-3-70B"),
    ("llama3.1-405b", "406", None, "HF hub safetensors size, meta-llama/Llama-3.1-405B"),
    ("mixtral-8x7b", "46.7", "12.9", "Mistral AI, 'Mixtral of experts' blog (46.7B total, 12.9B per token)"),
    ("mixtral-8x22b", "141", "39", "Mistral AI, 'Cheaper, Better, Faster, Stronger' blog (141B, 39B active)"),
    ("qwen3-235b-a22b", "235", "22", "Qwen/Qwen3-235B-A22B model card"),
    ("deepseek-v3", "671", None, "DeepSeek-V3 report arXiv 2412.19437 (671B total)"),
    ("gpt-oss-120b", "116.83", None, "gpt-oss model card arXiv 2508.10925 Table 1"),
    # Narayanan et al. SC21 Table 1 (also public_cases.yaml TRAIN-NARAYANAN21-T1-*)
    ("megatron-1.7b", "1.7", None, "Narayanan SC21 Table 1"),
    ("megatron-3.6b", "3.6", None, "Narayanan SC21 Table 1"),
    ("megatron-7.5b", "7.5", None, "Narayanan SC21 Table 1"),
    ("megatron-18.4b", "18.4", None, "Narayanan SC21 Table 1"),
    ("megatron-39.1b", "39.1", None, "Narayanan SC21 Table 1"),
    ("megatron-76.1b", "76.1", None, "Narayanan SC21 Table 1"),
    ("megatron-145.6b", "145.6", None, "Narayanan SC21 Table 1"),
    ("megatron-310.1b", "310.1", None, "Narayanan SC21 Table 1"),
    ("megatron-529.6b", "529.6", None, "Narayanan SC21 Table 1"),
    ("megatron-1t", "1008.0", None, "Narayanan SC21 Table 1"),
    ("megatron-22b", "22", None, "Korthikanti MLSys23 Table 3"),
    ("megatron-175b", "175", None, "Korthikanti MLSys23 Table 3"),
    ("gpt3-125m", "0.125", None, "GPT-3 paper Table 2.1"),
    ("gpt3-760m", "0.76", None, "GPT-3 paper Table 2.1"),
    ("gpt3-175b", "175", None, "GPT-3 paper Table 2.1"),
]


@pytest.mark.parametrize(("name", "total_b", "active_b", "source"), PUBLISHED)
def test_published_totals(name: str, total_b: str, active_b: str | None, source: str) -> None:
    c = param_counts(get_preset(name))
    assert _within_rounding(c.total / 1e9, total_b), f"{name}: {c.total / 1e9:.3f}B vs {total_b}B ({source})"
    if active_b is not None:
        assert _within_rounding(c.active / 1e9, active_b), (
            f"{name} active {c.active / 1e9:.3f}B vs {active_b}B"
        )


def test_gpt3_labels_within_two_percent() -> None:
    """The GPT-3 paper's size labels are loose (350M is 356M); all are within 2 %."""
    for name, label in [
        ("gpt3-350m", 0.35),
        ("gpt3-1.3b", 1.3),
        ("gpt3-2.7b", 2.7),
        ("gpt3-6.7b", 6.7),
        ("gpt3-13b", 13.0),
    ]:
        total = param_counts(get_preset(name)).total / 1e9
        assert abs(total - label) <= 0.02 * label, (name, total)


def test_moe_active_published() -> None:
    """Active counts from model cards, in each card's own convention."""
    # Qwen3-30B-A3B card: 30.5B total, 3.3B activated, 29.9B non-embedding (3.35B counted with both
    # embedding tables; the card's 3.3 is within 2 %).
    q = param_counts(get_preset("qwen3-30b-a3b"))
    assert _within_rounding(q.total / 1e9, "30.5")
    assert _within_rounding(q.non_embedding / 1e9, "29.9")
    assert abs(q.active / 1e9 - 3.3) <= 0.02 * 3.3
    # DeepSeek-V3: 37B activated; gpt-oss-120b: 5.13B active. Both exclude the input token table
    # (our `active` includes it; `embedding` is that table).
    d = param_counts(get_preset("deepseek-v3"))
    assert _within_rounding((d.active - d.embedding) / 1e9, "37")
    g = param_counts(get_preset("gpt-oss-120b"))
    assert _within_rounding((g.active - g.embedding) / 1e9, "5.13")
    # Qwen3-235B-A22B card: non-embedding 234B
    assert _within_rounding(param_counts(get_preset("qwen3-235b-a22b")).non_embedding / 1e9, "234")


MEGATRON_DIMS = [  # (preset, L, h) of GPT models with V = 51200, s = 2048
    ("megatron-1.7b", 24, 2304),
    ("megatron-3.6b", 30, 3072),
    ("megatron-7.5b", 36, 4096),
    ("megatron-18.4b", 40, 6144),
    ("megatron-39.1b", 48, 8192),
    ("megatron-76.1b", 60, 10240),
    ("megatron-145.6b", 80, 12288),
    ("megatron-310.1b", 96, 16384),
    ("megatron-529.6b", 105, 20480),
    ("megatron-1t", 128, 25600),
    ("megatron-22b", 48, 6144),
    ("megatron-175b", 96, 12288),
]


@pytest.mark.parametrize(("name", "layers", "h"), MEGATRON_DIMS)
def test_f_params_dense_formula(name: str, layers: int, h: int) -> None:
    """F-PARAMS-DENSE (Narayanan SC21 eq. 2): P = 12 L h^2 (1 + 13/(12h) + (V+s)/(12 L h)).

    The formula omits only the final layernorm (2h), so the match is exact up to that term.
    """
    v, s = 51200, 2048
    formula = 12 * layers * h**2 * (1 + 13 / (12 * h) + (v + s) / (12 * layers * h))
    got = param_counts(get_preset(name)).total
    assert abs(got - formula) <= 0.005 * formula
    assert got - round(formula) == 2 * h


def test_f_params_dense_checks_from_public_cases() -> None:
    """The formula's own checks in public_cases.yaml (1008.0B, 529.6B, 145.6B, 174.6B)."""
    for name, billions in [
        ("megatron-1t", "1008.0"),
        ("megatron-529.6b", "529.6"),
        ("megatron-145.6b", "145.6"),
        ("megatron-175b", "174.6"),
    ]:
        assert _within_rounding(param_counts(get_preset(name)).total / 1e9, billions), name


def test_breakdown_sums_to_total() -> None:
    for name in ("deepseek-v3", "gpt-oss-120b", "gpt3-175b", "qwen3-30b-a3b"):
        c = param_counts(get_preset(name))
        parts = c.embedding + c.lm_head + c.attention + c.mlp + c.router + c.routed_experts + c.shared_experts
        assert parts + c.norms == c.total, name


TINY = {
    "gpt": dict(
        num_layers=2,
        hidden=32,
        num_heads=4,
        ffn=128,
        vocab=50,
        max_seq=16,
        activation="gelu",
        norm="layernorm",
        positions="learned",
        tied_embeddings=True,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    ),
    "qwen3-moe": dict(
        num_layers=3,
        hidden=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn=64,
        vocab=50,
        qk_norm=True,
        moe=dict(num_experts=4, top_k=2, expert_ffn=16, dense_layers=[1]),
    ),
    "deepseek-mla": dict(
        num_layers=3,
        hidden=32,
        num_heads=4,
        ffn=64,
        vocab=50,
        mla=dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8),
        moe=dict(num_experts=6, top_k=2, expert_ffn=16, shared_experts=2, dense_layers=[0], router_bias=True),
    ),
    "mla-no-qlora": dict(
        num_layers=1,
        hidden=32,
        num_heads=2,
        ffn=64,
        vocab=50,
        qkv_bias=True,
        out_bias=True,
        mla=dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8),
    ),
    "gpt-oss": dict(
        num_layers=2,
        hidden=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn=24,
        vocab=50,
        qkv_bias=True,
        out_bias=True,
        attn_sinks=True,
        sliding_window=4,
        sliding_window_layers=[0],
        moe=dict(num_experts=4, top_k=2, expert_ffn=24, router_bias=True, expert_bias=True),
    ),
    "neox-relu": dict(
        num_layers=2,
        hidden=32,
        num_heads=4,
        ffn=96,
        vocab=50,
        activation="relu",
        norm="layernorm",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    ),
}


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_models_run_and_match(kind: str) -> None:
    """Full (not per-kind) CPU instantiation runs forward and has exactly the closed-form count."""
    spec = ModelSpec.parse({"name": kind, **TINY[kind]})
    torch.manual_seed(0)
    model = Decoder(spec)
    for p in model.parameters():  # Experts use torch.empty; give every weight finite values
        torch.nn.init.normal_(p, std=0.02)
    logits = model(torch.randint(0, spec.vocab, (2, 8)))
    assert logits.shape == (2, 8, spec.vocab)
    assert torch.isfinite(logits).all()
    assert numel(model) == param_counts(spec).total == reference_param_count(spec)
