"""Reference PyTorch decoders built from a ModelSpec, written independently of ``params.py``.

The modules mirror the Hugging Face implementations of the supported families (Llama/Mistral/
Qwen/Mixtral/DeepSeek-V3/GPT-OSS/GPT-2/GPT-NeoX) closely enough that their parameter tensors have
the same shapes: separate q/k/v/o projections, per-head-dim q/k norms, attention sinks, MLA
low-rank paths with their norms, gated/ungated MLPs, MoE routers with stacked expert weights
(as GPT-OSS stores them) and shared experts. They also run forward, so a tiny instance on CPU
proves the shapes compose into a working model.

Counting on the ``meta`` device allocates nothing, so even 671B models are cheap; to stay fast
we build one layer of each distinct kind and multiply by how many layers have that kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorstage.model.spec import ModelSpec


def make_norm(spec: ModelSpec, dim: int) -> nn.Module:
    if spec.norm == "layernorm":
        return nn.LayerNorm(dim)  # weight + bias
    return nn.RMSNorm(dim)  # weight only


class Attention(nn.Module):
    """GQA/MHA attention with optional biases, per-head q/k norm and per-head sink logits."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_heads = spec.num_heads
        self.n_kv = spec.num_kv_heads or spec.num_heads
        self.d = spec.head_dim or spec.hidden // spec.num_heads
        self.q_proj = nn.Linear(spec.hidden, self.n_heads * self.d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden, self.n_kv * self.d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden, self.n_kv * self.d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.d, spec.hidden, bias=spec.out_bias)
        self.q_norm = make_norm(spec, self.d) if spec.qk_norm else None
        self.k_norm = make_norm(spec, self.d) if spec.qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if spec.attn_sinks else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.d)
        k = self.k_proj(x).view(b, s, self.n_kv, self.d)
        v = self.v_proj(x).view(b, s, self.n_kv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rep = self.n_heads // self.n_kv
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        out = _causal_attention(q, k, v, self.sinks)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.d))


class MLAttention(nn.Module):
    """DeepSeek-V3 multi-head latent attention (q/kv low-rank paths, shared RoPE key)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        m = spec.mla
        assert m is not None
        self.m, self.n_heads = m, spec.num_heads
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            self.q_a_proj = nn.Linear(spec.hidden, m.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = make_norm(spec, m.q_lora_rank)
            self.q_b_proj = nn.Linear(m.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(spec.hidden, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            spec.hidden, m.kv_lora_rank + m.qk_rope_head_dim, bias=spec.qkv_bias
        )
        self.kv_a_layernorm = make_norm(spec, m.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            m.kv_lora_rank, self.n_heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * m.v_head_dim, spec.hidden, bias=spec.out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, h = self.m, self.n_heads
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if m.q_lora_rank else self.q_proj(x)
        q = q.view(b, s, h, m.qk_nope_head_dim + m.qk_rope_head_dim)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, h, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(b, s, h, m.qk_rope_head_dim)], dim=-1)
        # pad v to the q/k head width so one attention kernel serves both, then cut it back
        out = _causal_attention(q, k, F.pad(v, (0, q.shape[-1] - m.v_head_dim)), None)[..., : m.v_head_dim]
        return self.o_proj(out.reshape(b, s, h * m.v_head_dim))


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention over (b, s, heads, d) tensors; sinks add one extra logit per head."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    if sinks is not None:
        sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, width: int, bias: bool) -> None:
        super().__init__()
        self.gated = spec.activation in ("swiglu", "geglu")
        self.act = (
            F.silu if spec.activation == "swiglu" else (F.relu if spec.activation == "relu" else F.gelu)
        )
        self.up_proj = nn.Linear(spec.hidden, width, bias=bias)
        self.gate_proj = nn.Linear(spec.hidden, width, bias=bias) if self.gated else None
        self.down_proj = nn.Linear(width, spec.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(hidden)


class Experts(nn.Module):
    """All routed experts of a layer as stacked weights (E, in, out), as GPT-OSS checkpoints store them."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        moe = spec.moe
        assert moe is not None
        e, h, f = moe.num_experts, spec.hidden, moe.expert_ffn
        self.gated = spec.activation in ("swiglu", "geglu")
        self.f = f
        up = 2 * f if self.gated else f
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, up))
        self.down_proj = nn.Parameter(torch.empty(e, f, h))
        self.gate_up_bias = nn.Parameter(torch.zeros(e, up)) if moe.expert_bias else None
        self.down_bias = nn.Parameter(torch.zeros(e, h)) if moe.expert_bias else None

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.gate_up_proj[i]
        if self.gate_up_bias is not None:
            y = y + self.gate_up_bias[i]
        y = F.silu(y[..., : self.f]) * y[..., self.f :] if self.gated else F.gelu(y)
        y = y @ self.down_proj[i]
        return y + self.down_bias[i] if self.down_bias is not None else y


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        moe = spec.moe
        assert moe is not None
        self.top_k = moe.top_k
        self.router = nn.Linear(spec.hidden, moe.num_experts, bias=moe.router_bias)
        self.experts = Experts(spec)
        width = moe.shared_expert_ffn or moe.expert_ffn
        self.shared = nn.ModuleList(MLP(spec, width, moe.expert_bias) for _ in range(moe.shared_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = torch.topk(torch.softmax(self.router(x), dim=-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e in idx[..., slot].unique().tolist():
                mask = (idx[..., slot] == e).unsqueeze(-1)
                out = out + mask * weights[..., slot : slot + 1] * self.experts.expert(e, x)
        for mlp in self.shared:
            out = out + mlp(x)
        return out


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, moe_layer: bool) -> None:
        super().__init__()
        self.input_norm = make_norm(spec, spec.hidden)
        self.attn = MLAttention(spec) if spec.mla is not None else Attention(spec)
        # a parallel block with one shared norm (GPT-J, PaLM) has no second norm
        shared = spec.parallel_block and spec.parallel_norms == 1
        self.post_attention_norm = None if shared else make_norm(spec, spec.hidden)
        self.mlp = MoE(spec) if moe_layer else MLP(spec, spec.ffn, spec.mlp_bias)
        self.parallel = spec.parallel_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:  # x + attn(norm(x)) + mlp(norm'(x))
            a_in = self.input_norm(x)
            m_in = a_in if self.post_attention_norm is None else self.post_attention_norm(x)
            return x + self.attn(a_in) + self.mlp(m_in)
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_attention_norm(x))


def layer_kinds(spec: ModelSpec) -> list[bool]:
    """Per layer: True if its feed-forward is an MoE block (from ``moe.dense_layers``)."""
    dense = set(spec.moe.dense_layers) if spec.moe is not None else set(range(spec.num_layers))
    return [i not in dense for i in range(spec.num_layers)]


class Decoder(nn.Module):
    """A whole decoder; ``build_layers=False`` keeps only embeddings, final norm and head."""

    def __init__(self, spec: ModelSpec, build_layers: bool = True) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden)
        self.embed_positions = (
            nn.Embedding(spec.max_seq, spec.hidden) if spec.positions == "learned" else None
        )
        self.embed_norm = make_norm(spec, spec.hidden) if spec.embed_norm else None  # BLOOM
        kinds = layer_kinds(spec) if build_layers else []
        self.layers = nn.ModuleList(Block(spec, k) for k in kinds)
        self.norm = make_norm(spec, spec.hidden)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(torch.arange(tokens.shape[1]))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def numel(module: nn.Module) -> int:
    """Distinct parameter elements (``parameters()`` yields a tied weight once)."""
    return sum(p.numel() for p in module.parameters())


def reference_param_count(spec: ModelSpec) -> int:
    """Parameters of the reference model on ``meta``: shell + one layer per kind times its count."""
    with torch.device("meta"):
        total = numel(Decoder(spec, build_layers=False))
        kinds = layer_kinds(spec)
        for kind in set(kinds):
            total += kinds.count(kind) * numel(Block(spec, kind))
    return total


def reference_active_count(spec: ModelSpec) -> int:
    """Parameters one token touches: all but the (num_experts - top_k) unchosen routed experts."""
    total = reference_param_count(spec)
    if spec.moe is None:
        return total
    with torch.device("meta"):
        per_expert = numel(Experts(spec)) // spec.moe.num_experts
    n_moe = sum(layer_kinds(spec))
    return total - n_moe * (spec.moe.num_experts - spec.moe.top_k) * per_expert
