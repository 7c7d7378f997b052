"""Hugging Face config.json import: fixtures vs presets, published totals, and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorstage.errors import SpecError
from tensorstage.model import get_preset, param_counts
from tensorstage.model.hf import load_hf_config, spec_from_hf_config, supported_architectures

HF = Path(__file__).parent / "data" / "hf"

# fixture file -> preset with the same architecture
FIXTURE_PRESET = {
    "llama2-7b.json": "llama2-7b",
    "llama2-70b.json": "llama2-70b",
    "llama3.1-8b.json": "llama3.1-8b",
    "llama3.1-405b.json": "llama3.1-405b",
    "mixtral-8x7b.json": "mixtral-8x7b",
    "mixtral-8x22b.json": "mixtral-8x22b",
    "qwen3-30b-a3b.json": "qwen3-30b-a3b",
    "qwen3-235b-a22b.json": "qwen3-235b-a22b",
    "deepseek-v3.json": "deepseek-v3",
    "gpt-oss-120b.json": "gpt-oss-120b",
    "bloom-176b.json": "bloom-176b",
}
IGNORED = {"name", "family", "source"}


def _dims(spec) -> dict:
    """Every field that shapes the model, with ``None`` defaults resolved to their meaning."""
    data = {k: v for k, v in spec.model_dump().items() if k not in IGNORED}
    data["num_kv_heads"] = spec.kv_heads
    data["head_dim"] = spec.dim_head if spec.mla is None else None
    return data


@pytest.mark.parametrize(("fixture", "preset"), sorted(FIXTURE_PRESET.items()))
def test_fixture_matches_preset(fixture: str, preset: str) -> None:
    imported = load_hf_config(HF / fixture)
    assert imported.name == fixture.removesuffix(".json")
    assert _dims(imported) == _dims(get_preset(preset))
    assert param_counts(imported).total == param_counts(get_preset(preset)).total


def test_every_supported_architecture_has_a_fixture() -> None:
    seen = {json.loads(p.read_text())["architectures"][0] for p in HF.glob("*.json")}
    assert set(supported_architectures()) <= seen


def _card(value: float, published: float, last_digit: float) -> bool:
    """Model cards round or truncate: accept one unit of the card's last digit."""
    return abs(value - published) <= last_digit + 1e-9


# Fixtures without a preset, against published exact counts or model-card figures.
def test_gpt2_small_exact() -> None:
    # GPT-2 small: 124,439,808 parameters (HF GPT2LMHeadModel.num_parameters(), tied head)
    spec = load_hf_config(HF / "gpt2.json")
    assert spec.tied_embeddings and spec.positions == "learned" and spec.max_seq == 1024
    assert param_counts(spec).total == 124_439_808


def test_gpt_neox_20b_exact() -> None:
    # Black et al. 2022, GPT-NeoX-20B (arXiv 2204.06745): 20,554,567,680 total, 19,934,846,976 non-embedding
    c = param_counts(load_hf_config(HF / "gpt-neox-20b.json"))
    assert c.total == 20_554_567_680
    assert c.non_embedding - c.final_norm == 19_934_846_976  # the paper's figure is the 44 layers alone


def test_qwen25_7b_card() -> None:
    # Qwen/Qwen2.5-7B model card: 7.61B parameters, 6.53B non-embedding; q/k/v biases, no o_proj bias
    spec = load_hf_config(HF / "qwen2.5-7b.json")
    assert spec.qkv_bias and not spec.out_bias and spec.sliding_window is None
    c = param_counts(spec)
    assert _card(c.total / 1e9, 7.61, 0.01)
    assert _card(c.non_embedding / 1e9, 6.53, 0.01)


def test_qwen3_8b_card() -> None:
    # Qwen/Qwen3-8B model card: 8.2B parameters, 6.95B non-embedding
    spec = load_hf_config(HF / "qwen3-8b.json")
    assert spec.qk_norm and spec.dim_head == 128
    c = param_counts(spec)
    assert _card(c.total / 1e9, 8.2, 0.1)
    assert _card(c.non_embedding / 1e9, 6.95, 0.01)


def test_mistral_7b_window() -> None:
    # Mistral-7B-v0.1: 7.24B parameters (HF hub), sliding window 4096 on every layer
    spec = load_hf_config(HF / "mistral-7b.json")
    assert spec.sliding_window == 4096 and spec.sliding_window_layers == tuple(range(32))
    assert _card(param_counts(spec).total / 1e9, 7.24, 0.01)


def test_deepseek_dense_layers_and_mla() -> None:
    spec = load_hf_config(HF / "deepseek-v3.json")
    assert spec.moe is not None and spec.mla is not None
    assert spec.moe.dense_layers == (0, 1, 2) and spec.num_moe_layers == 58
    assert spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim == 576  # F-KV-CACHE: 576 elems/layer/token


def test_gpt_oss_alternating_window() -> None:
    spec = load_hf_config(HF / "gpt-oss-120b.json")
    assert spec.sliding_window == 128
    assert spec.sliding_window_layers == tuple(range(0, 36, 2))
    assert spec.attn_sinks and spec.moe is not None and spec.moe.expert_bias and spec.moe.router_bias


def test_qwen3_moe_mlp_only_and_sparse_step() -> None:
    cfg = json.loads((HF / "qwen3-30b-a3b.json").read_text())
    cfg.update(mlp_only_layers=[0], decoder_sparse_step=2, num_hidden_layers=6)
    spec = spec_from_hf_config(cfg, "x")
    # MoE iff not mlp-only and (i + 1) % 2 == 0 -> layers 1, 3, 5
    assert spec.moe is not None and spec.moe.dense_layers == (0, 2, 4)


def test_model_type_fallback() -> None:
    cfg = json.loads((HF / "llama3.1-8b.json").read_text())
    del cfg["architectures"]
    assert spec_from_hf_config(cfg, "x").num_kv_heads == 8


def test_unsupported_architecture_names_it() -> None:
    cfg = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768}
    with pytest.raises(SpecError) as exc:
        spec_from_hf_config(cfg, "bert")
    text = str(exc.value)
    assert exc.value.field == "config.json.architectures"
    assert "BertForMaskedLM" in text and {"LlamaForCausalLM", "DeepseekV3ForCausalLM"} <= set(exc.value.allowed)
    assert "\n" not in text


def test_missing_key_names_it(tmp_path: Path) -> None:
    cfg = json.loads((HF / "mixtral-8x7b.json").read_text())
    del cfg["num_local_experts"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SpecError) as exc:
        load_hf_config(path)
    assert exc.value.field.endswith("num_local_experts")
    assert "missing" in str(exc.value)


def test_malformed_json_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "hidden_size": 4096,\n  "vocab_size": \n}\n')
    with pytest.raises(SpecError) as exc:
        load_hf_config(path)
    assert exc.value.field == str(path)
    assert "invalid JSON at line 4" in str(exc.value) and "\n" not in str(exc.value)


def test_invalid_value_is_spec_error() -> None:
    cfg = json.loads((HF / "llama2-7b.json").read_text())
    cfg["num_key_value_heads"] = 5  # does not divide 32 heads
    with pytest.raises(SpecError) as exc:
        spec_from_hf_config(cfg, "x")
    assert exc.value.field == "config.json" and "num_kv_heads must divide num_heads" in str(exc.value)
