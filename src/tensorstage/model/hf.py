"""Import a Hugging Face ``config.json`` as a :class:`ModelSpec`.

Why: most models people want to study are published as HF checkpoints, and their
``config.json`` already holds every dimension. The mapping is chosen by ``architectures[0]``
(falling back to ``model_type``) and follows the HF ``transformers`` implementation of each
family, so the imported spec has exactly the checkpoint's weights (see ``params.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.fileio import read_text_file
from tensorstage.model.spec import ModelSpec

_MISSING = object()


class _Config:
    """Read-only view of a config dict whose misses become :class:`SpecError` naming the key."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def req(self, key: str) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING or value is None:
            raise SpecError(f"{self.where}.{key}", "required key is missing")
        return value

    def opt(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key, _MISSING)
        return default if value is _MISSING or value is None else value


def _gated_activation(c: _Config) -> str:
    act = str(c.opt("hidden_act", "silu")).lower()
    if act in ("silu", "swish"):
        return "swiglu"
    if act.startswith("gelu"):
        return "geglu"
    raise SpecError(
        f"{c.where}.hidden_act", f"unsupported activation {act!r} for a gated MLP", allowed=("silu", "gelu")
    )


def _plain_activation(c: _Config, key: str) -> str:
    act = str(c.opt(key, "gelu")).lower()
    if act.startswith("gelu"):
        return "gelu"
    if act == "relu":
        return "relu"
    raise SpecError(
        f"{c.where}.{key}", f"unsupported activation {act!r}", allowed=("gelu", "gelu_new", "relu")
    )


def _llama_like(c: _Config, name: str, family: str) -> dict[str, Any]:
    """Fields shared by Llama-style decoders (RMSNorm, RoPE, gated MLP, untied head by default)."""
    attention_bias = bool(c.opt("attention_bias", False))
    return {
        "name": name,
        "family": family,
        "num_layers": c.req("num_hidden_layers"),
        "hidden": c.req("hidden_size"),
        "num_heads": c.req("num_attention_heads"),
        "num_kv_heads": c.opt("num_key_value_heads"),
        "head_dim": c.opt("head_dim"),
        "ffn": c.req("intermediate_size"),
        "vocab": c.req("vocab_size"),
        "max_seq": c.opt("max_position_embeddings", 2048),
        "activation": _gated_activation(c),
        "norm": "rmsnorm",
        "positions": "rope",
        "tied_embeddings": bool(c.opt("tie_word_embeddings", False)),
        "qkv_bias": attention_bias,
        "out_bias": attention_bias,
        "mlp_bias": bool(c.opt("mlp_bias", False)),
    }


def _all_layers_window(c: _Config, spec: dict[str, Any]) -> None:
    window = c.opt("sliding_window")
    if window:
        spec["sliding_window"] = window
        spec["sliding_window_layers"] = tuple(range(spec["num_layers"]))


def _llama(c: _Config, name: str) -> dict[str, Any]:
    return _llama_like(c, name, "llama")


def _mistral(c: _Config, name: str) -> dict[str, Any]:
    spec = _llama_like(c, name, "mistral")
    _all_layers_window(c, spec)
    return spec


def _mixtral(c: _Config, name: str) -> dict[str, Any]:
    spec = _llama_like(c, name, "mixtral")
    _all_layers_window(c, spec)
    spec["moe"] = {
        "num_experts": c.req("num_local_experts"),
        "top_k": c.req("num_experts_per_tok"),
        "expert_ffn": c.req("intermediate_size"),
    }
    return spec


def _qwen_window(c: _Config, spec: dict[str, Any]) -> None:
    # Qwen2/3: layers at index >= max_window_layers use the window, only if use_sliding_window.
    if c.opt("use_sliding_window", False) and c.opt("sliding_window"):
        first = c.opt("max_window_layers", spec["num_layers"])
        spec["sliding_window"] = c.opt("sliding_window")
        spec["sliding_window_layers"] = tuple(range(first, spec["num_layers"]))


def _qwen2(c: _Config, name: str) -> dict[str, Any]:
    spec = _llama_like(c, name, "qwen2")
    spec["qkv_bias"] = True  # Qwen2 hard-codes biases on q/k/v (not on o_proj)
    spec["out_bias"] = False
    _qwen_window(c, spec)
    return spec


def _qwen3(c: _Config, name: str) -> dict[str, Any]:
    spec = _llama_like(c, name, "qwen3")
    spec["head_dim"] = c.opt("head_dim", 128)  # Qwen3Config default
    spec["qk_norm"] = True
    _qwen_window(c, spec)
    return spec


def _qwen3_moe(c: _Config, name: str) -> dict[str, Any]:
    spec = _qwen3(c, name)
    spec["family"] = "qwen3-moe"
    layers = spec["num_layers"]
    step = c.opt("decoder_sparse_step", 1)
    mlp_only = set(c.opt("mlp_only_layers", []))
    # transformers Qwen3MoeDecoderLayer: MoE iff not in mlp_only_layers and (i + 1) % step == 0.
    dense = tuple(i for i in range(layers) if i in mlp_only or (i + 1) % step != 0)
    spec["moe"] = {
        "num_experts": c.req("num_experts"),
        "top_k": c.req("num_experts_per_tok"),
        "expert_ffn": c.req("moe_intermediate_size"),
        "dense_layers": dense,
    }
    return spec


def _deepseek_v3(c: _Config, name: str) -> dict[str, Any]:
    spec = _llama_like(c, name, "deepseek-v3")
    spec["num_kv_heads"] = None  # MLA: every head has its own K/V from the shared latent
    spec["head_dim"] = None
    spec["mla"] = {
        "q_lora_rank": c.opt("q_lora_rank", 0),
        "kv_lora_rank": c.req("kv_lora_rank"),
        "qk_rope_head_dim": c.req("qk_rope_head_dim"),
        "qk_nope_head_dim": c.req("qk_nope_head_dim"),
        "v_head_dim": c.req("v_head_dim"),
    }
    layers = spec["num_layers"]
    first_dense = c.opt("first_k_dense_replace", 0)
    freq = c.opt("moe_layer_freq", 1)
    dense = tuple(i for i in range(layers) if not (i >= first_dense and i % freq == 0))
    shared = c.opt("n_shared_experts", 0)
    spec["moe"] = {
        "num_experts": c.req("n_routed_experts"),
        "top_k": c.req("num_experts_per_tok"),
        "expert_ffn": c.req("moe_intermediate_size"),
        "shared_experts": shared,
        "dense_layers": dense,
        # noaux_tc routing keeps a learned per-expert bias (e_score_correction_bias) in the checkpoint.
        "router_bias": c.opt("topk_method", "noaux_tc") == "noaux_tc",
    }
    groups, topk_groups = int(c.opt("n_group", 1) or 1), int(c.opt("topk_group", 1) or 1)
    if groups > 1 and topk_groups < groups:  # group-limited (node-limited) routing
        spec["moe"].update(route_groups=groups, route_topk_groups=topk_groups)
    return spec


def _gpt_oss(c: _Config, name: str) -> dict[str, Any]:
    spec = _llama_like(c, name, "gpt-oss")
    spec["qkv_bias"] = spec["out_bias"] = bool(c.opt("attention_bias", True))
    spec["attn_sinks"] = True
    layers = spec["num_layers"]
    layer_types = c.opt("layer_types")
    if layer_types is None:  # transformers default: even layers slide, odd layers are full
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if len(layer_types) != layers:
        raise SpecError(f"{c.where}.layer_types", f"has {len(layer_types)} entries for {layers} layers")
    spec["sliding_window"] = c.opt("sliding_window", 128)
    spec["sliding_window_layers"] = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    top_k = c.opt("num_experts_per_tok", c.opt("experts_per_token"))  # older files use the latter
    if top_k is None:
        c.req("num_experts_per_tok")
    spec["moe"] = {
        "num_experts": c.req("num_local_experts"),
        "top_k": top_k,
        "expert_ffn": c.req("intermediate_size"),
        "router_bias": True,
        "expert_bias": True,
    }
    return spec


def _gpt2(c: _Config, name: str) -> dict[str, Any]:
    hidden = c.req("n_embd")
    return {
        "name": name,
        "family": "gpt2",
        "num_layers": c.req("n_layer"),
        "hidden": hidden,
        "num_heads": c.req("n_head"),
        "ffn": c.opt("n_inner", 4 * hidden),
        "vocab": c.req("vocab_size"),
        "max_seq": c.req("n_positions"),
        "activation": _plain_activation(c, "activation_function"),
        "norm": "layernorm",
        "positions": "learned",
        "tied_embeddings": bool(c.opt("tie_word_embeddings", True)),
        "qkv_bias": True,
        "out_bias": True,
        "mlp_bias": True,
    }


def _gpt_neox(c: _Config, name: str) -> dict[str, Any]:
    attention_bias = bool(c.opt("attention_bias", True))
    return {
        "name": name,
        "family": "gpt-neox",
        "num_layers": c.req("num_hidden_layers"),
        "hidden": c.req("hidden_size"),
        "num_heads": c.req("num_attention_heads"),
        "ffn": c.req("intermediate_size"),
        "vocab": c.req("vocab_size"),
        "max_seq": c.opt("max_position_embeddings", 2048),
        "activation": _plain_activation(c, "hidden_act"),
        "norm": "layernorm",
        "positions": "rope",
        "tied_embeddings": bool(c.opt("tie_word_embeddings", False)),
        "qkv_bias": attention_bias,
        "out_bias": attention_bias,
        "mlp_bias": True,
        # GPTNeoXLayer: x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x)) when
        # use_parallel_residual (GPTNeoXConfig default True), two untied norms
        "parallel_block": bool(c.opt("use_parallel_residual", True)),
        **({"parallel_norms": 2} if c.opt("use_parallel_residual", True) else {}),
    }


def _gptj(c: _Config, name: str) -> dict[str, Any]:
    """GPTJBlock: x + attn(ln_1(x)) + mlp(ln_1(x)), one shared LayerNorm; q/k/v/out_proj without
    bias, fc_in/fc_out with bias, rotary on the first ``rotary_dim`` dims of each head (costed on
    the whole head), untied head. The ``lm_head`` bias (``vocab`` values) is not modelled."""
    hidden = c.req("n_embd")
    return {
        "name": name,
        "family": "gptj",
        "num_layers": c.req("n_layer"),
        "hidden": hidden,
        "num_heads": c.req("n_head"),
        "ffn": c.opt("n_inner", 4 * hidden),
        "vocab": c.req("vocab_size"),
        "max_seq": c.opt("n_positions", 2048),
        "activation": _plain_activation(c, "activation_function"),
        "norm": "layernorm",
        "positions": "rope",
        "tied_embeddings": bool(c.opt("tie_word_embeddings", False)),
        "mlp_bias": True,
        "parallel_block": True,
    }


def _bloom(c: _Config, name: str) -> dict[str, Any]:
    """BloomForCausalLM: ALiBi, LayerNorm after the embedding, biases everywhere, GELU 4h MLP,
    head tied to the embedding (BloomForCausalLM ties lm_head to word_embeddings)."""
    # BloomConfig also reads the older spellings n_embed / num_attention_heads / num_hidden_layers
    hidden = c.opt("hidden_size", c.opt("n_embed"))
    heads = c.opt("n_head", c.opt("num_attention_heads"))
    layers = c.opt("n_layer", c.opt("num_hidden_layers"))
    for key, value in (("hidden_size", hidden), ("n_head", heads), ("n_layer", layers)):
        if value is None:
            c.req(key)
    return {
        "name": name,
        "family": "bloom",
        "num_layers": layers,
        "hidden": hidden,
        "num_heads": heads,
        "ffn": 4 * hidden,
        "vocab": c.req("vocab_size"),
        "max_seq": c.opt("seq_length", 2048),
        "activation": "gelu",
        "norm": "layernorm",
        "positions": "alibi",
        "embed_norm": True,
        "tied_embeddings": bool(c.opt("tie_word_embeddings", True)),
        "qkv_bias": True,
        "out_bias": True,
        "mlp_bias": True,
    }


_Importer = Callable[[_Config, str], dict[str, Any]]

# architectures[0] -> (model_type, importer)
ARCHITECTURES: dict[str, tuple[str, _Importer]] = {
    "LlamaForCausalLM": ("llama", _llama),
    "MistralForCausalLM": ("mistral", _mistral),
    "MixtralForCausalLM": ("mixtral", _mixtral),
    "Qwen2ForCausalLM": ("qwen2", _qwen2),
    "Qwen3ForCausalLM": ("qwen3", _qwen3),
    "Qwen3MoeForCausalLM": ("qwen3_moe", _qwen3_moe),
    "DeepseekV3ForCausalLM": ("deepseek_v3", _deepseek_v3),
    "GptOssForCausalLM": ("gpt_oss", _gpt_oss),
    "GPT2LMHeadModel": ("gpt2", _gpt2),
    "GPTNeoXForCausalLM": ("gpt_neox", _gpt_neox),
    "GPTJForCausalLM": ("gptj", _gptj),
    "BloomForCausalLM": ("bloom", _bloom),
}
_BY_MODEL_TYPE: dict[str, _Importer] = {mt: fn for mt, fn in ARCHITECTURES.values()}


def supported_architectures() -> list[str]:
    """The ``architectures`` values this importer understands."""
    return list(ARCHITECTURES)


def spec_from_hf_config(config: dict[str, Any], name: str, where: str = "config.json") -> ModelSpec:
    """Map a parsed HF ``config.json`` dict to a :class:`ModelSpec` called ``name``."""
    if not isinstance(config, dict):
        raise SpecError(where, "expected a JSON object at the top level")
    c = _Config(config, where)
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    importer = ARCHITECTURES[arch][1] if arch in ARCHITECTURES else None
    if importer is None and arch is None:
        importer = _BY_MODEL_TYPE.get(str(config.get("model_type")))
    if importer is None:
        shown = arch if arch is not None else f"(none; model_type {config.get('model_type')!r})"
        raise SpecError(
            f"{where}.architectures", f"unsupported architecture {shown}", allowed=supported_architectures()
        )
    fields = importer(c, name)
    fields["source"] = where
    return ModelSpec.parse(fields, where=where)


def load_hf_config(path: str | Path, name: str | None = None) -> ModelSpec:
    """Read ``path`` (a ``config.json``) and import it; bad JSON is a one-line :class:`SpecError`."""
    p = Path(path)
    text = read_text_file(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(str(p), f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if name is None:
        name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
    return spec_from_hf_config(data, name, where=str(p))
