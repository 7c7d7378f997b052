"""Closed-form parameter counts of a :class:`ModelSpec`.

Why closed forms: memory, optimizer-state and FLOP estimates all start from "how many weights",
and a formula over the spec answers that instantly for a 1T-parameter model. The tests rebuild
every preset as real PyTorch modules on the ``meta`` device and check these sums match exactly.

Conventions (the same as the Hugging Face implementations of the supported families):

* attention: Q/K/V projections (``qkv_bias`` adds their biases), output projection
  (``out_bias``), ``qk_norm`` adds one norm of width ``head_dim`` for queries and one for keys
  (shared over heads, as in Qwen3), ``attn_sinks`` adds one learned logit per query head
  (GPT-OSS);
* MLA (DeepSeek-V2/V3): ``q_a``/``q_b`` low-rank query path with a norm on the rank-``q_lora_rank``
  latent (or one full query projection when ``q_lora_rank`` is 0), ``kv_a`` down-projection to
  ``kv_lora_rank + qk_rope_head_dim`` with a norm on the ``kv_lora_rank`` latent, ``kv_b``
  up-projection to ``heads * (qk_nope_head_dim + v_head_dim)``, output projection from
  ``heads * v_head_dim``; ``qkv_bias`` adds biases to ``q_a`` and ``kv_a`` (as HF does), ``out_bias``
  to the output projection;
* MLP: two matrices for GELU/ReLU, three for gated activations (SwiGLU/GeGLU); ``mlp_bias`` adds
  a bias to each matrix;
* MoE layer: router ``hidden x num_experts`` (+ bias with ``router_bias``), ``num_experts`` routed
  MLPs of width ``expert_ffn`` and ``shared_experts`` always-on MLPs of width ``shared_ffn_each``;
  ``expert_bias`` adds biases to routed and shared experts; layers in ``moe.dense_layers`` carry
  a dense MLP of width ``ffn`` instead;
* norms: two per layer (before attention, before the MLP) plus the final norm; layernorm has
  weight and bias, rmsnorm only a weight; a parallel block has ``parallel_norms`` per layer;
* embeddings: token table ``vocab x hidden``, learned positions ``max_seq x hidden``, and an
  LM head ``vocab x hidden`` unless ``tied_embeddings``; ``embed_norm`` adds one norm after the
  token embedding (BLOOM), counted with the norms; ALiBi positions have no parameters.

"Active" parameters are those a single token touches: everything except the routed experts not
selected, i.e. non-expert weights + ``top_k`` routed experts + all shared experts per MoE layer.
The embedding table counts as active (it is read, one row per token); model cards differ on
this, so :attr:`ParamCounts.embedding` is reported separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tensorstage.model.spec import ModelSpec


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer layer of a given kind (dense or MoE)."""

    attention: int
    norms: int
    mlp: int  # dense MLP (0 in an MoE layer)
    router: int
    routed_experts: int  # all routed experts of the layer
    routed_expert_each: int  # one routed expert
    shared_experts: int

    @property
    def total(self) -> int:
        return (
            self.attention + self.norms + self.mlp + self.router + self.routed_experts + self.shared_experts
        )


@dataclass(frozen=True)
class ParamCounts:
    """Parameter totals of a model, split the ways memory and FLOP models need them."""

    total: int
    active: int  # per token: non-expert + top_k routed + shared experts
    embedding: int  # token table + learned positions
    lm_head: int  # 0 when tied to the embedding
    final_norm: int
    dense_layer: LayerParams | None  # one layer with a dense MLP (None if every layer is MoE)
    moe_layer: LayerParams | None  # one MoE layer (None for dense models)
    num_dense_layers: int
    num_moe_layers: int
    attention: int  # summed over layers
    mlp: int  # dense MLPs summed over layers
    router: int
    routed_experts: int
    shared_experts: int
    norms: int  # per-layer norms summed over layers, plus the final norm

    @property
    def non_embedding(self) -> int:
        """Total without the token table, positions and LM head (the convention of many model cards)."""
        return self.total - self.embedding - self.lm_head

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready) including the derived ``non_embedding``."""
        data = asdict(self)
        data["non_embedding"] = self.non_embedding
        for key in ("dense_layer", "moe_layer"):
            layer = getattr(self, key)
            if layer is not None:
                data[key]["total"] = layer.total
        return data


def _norm_params(spec: ModelSpec, width: int) -> int:
    return 2 * width if spec.norm == "layernorm" else width


def _linear(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def attention_params(spec: ModelSpec) -> int:
    """Weights of one attention block (projections, qk-norm, sinks), without the pre-norm."""
    h = spec.hidden
    if spec.mla is not None:
        m = spec.mla
        qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            q = (
                _linear(h, m.q_lora_rank, spec.qkv_bias)
                + _norm_params(spec, m.q_lora_rank)
                + _linear(m.q_lora_rank, spec.num_heads * qk_head, False)
            )
        else:
            q = _linear(h, spec.num_heads * qk_head, False)
        kv = (
            _linear(h, m.kv_lora_rank + m.qk_rope_head_dim, spec.qkv_bias)
            + _norm_params(spec, m.kv_lora_rank)
            + _linear(m.kv_lora_rank, spec.num_heads * (m.qk_nope_head_dim + m.v_head_dim), False)
        )
        out = _linear(spec.num_heads * m.v_head_dim, h, spec.out_bias)
        total = q + kv + out
    else:
        q_width = spec.num_heads * spec.dim_head
        kv_width = spec.kv_heads * spec.dim_head
        total = (
            _linear(h, q_width, spec.qkv_bias)
            + 2 * _linear(h, kv_width, spec.qkv_bias)
            + _linear(q_width, h, spec.out_bias)
        )
        if spec.qk_norm:
            total += 2 * _norm_params(spec, spec.dim_head)
    if spec.attn_sinks:
        total += spec.num_heads
    return total


def mlp_params(spec: ModelSpec, width: int, bias: bool) -> int:
    """One feed-forward block of inner width ``width`` (2 matrices, or 3 when gated)."""
    h = spec.hidden
    if spec.gated:
        return 2 * _linear(h, width, bias) + _linear(width, h, bias)
    return _linear(h, width, bias) + _linear(width, h, bias)


def _layer(spec: ModelSpec, moe_layer: bool) -> LayerParams:
    attention = attention_params(spec)
    # a parallel block with one shared norm (GPT-J, PaLM) has one norm per layer, not two
    norms = (spec.parallel_norms if spec.parallel_block else 2) * _norm_params(spec, spec.hidden)
    if not moe_layer or spec.moe is None:
        return LayerParams(attention, norms, mlp_params(spec, spec.ffn, spec.mlp_bias), 0, 0, 0, 0)
    moe = spec.moe
    router = _linear(spec.hidden, moe.num_experts, moe.router_bias)
    each = mlp_params(spec, moe.expert_ffn, moe.expert_bias)
    shared = moe.shared_experts * mlp_params(spec, moe.shared_ffn_each, moe.expert_bias)
    return LayerParams(attention, norms, 0, router, moe.num_experts * each, each, shared)


def param_counts(spec: ModelSpec) -> ParamCounts:
    """Closed-form parameter counts of ``spec`` (exact element counts, not estimates)."""
    n_moe = spec.num_moe_layers
    n_dense = spec.num_layers - n_moe
    dense = _layer(spec, False) if n_dense else None
    moe = _layer(spec, True) if n_moe else None

    embedding = spec.vocab * spec.hidden
    if spec.positions == "learned":
        embedding += spec.max_seq * spec.hidden
    lm_head = 0 if spec.tied_embeddings else spec.vocab * spec.hidden
    final_norm = _norm_params(spec, spec.hidden)
    embed_norm = _norm_params(spec, spec.hidden) if spec.embed_norm else 0  # BLOOM: counted in norms

    def summed(attr: str) -> int:
        return sum(n * getattr(layer, attr) for n, layer in ((n_dense, dense), (n_moe, moe)) if layer)

    layers_total = summed("total")
    total = embedding + lm_head + final_norm + embed_norm + layers_total
    inactive = 0
    if moe is not None and spec.moe is not None:
        inactive = n_moe * (spec.moe.num_experts - spec.moe.top_k) * moe.routed_expert_each
    return ParamCounts(
        total=total,
        active=total - inactive,
        embedding=embedding,
        lm_head=lm_head,
        final_norm=final_norm,
        dense_layer=dense,
        moe_layer=moe,
        num_dense_layers=n_dense,
        num_moe_layers=n_moe,
        attention=summed("attention"),
        mlp=summed("mlp"),
        router=summed("router"),
        routed_experts=summed("routed_experts"),
        shared_experts=summed("shared_experts"),
        norms=summed("norms") + final_norm + embed_norm,
    )
