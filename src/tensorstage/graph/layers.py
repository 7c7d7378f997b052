"""Block builders: embedding, attention (GQA/MHA and MLA), MLP (GELU / gated), MoE, LM head + loss.

Each function appends forward ops to a :class:`~tensorstage.graph.builder.Builder` and returns the
output tensor. Structure follows the Hugging Face / Megatron implementations of the families the
:class:`~tensorstage.model.spec.ModelSpec` covers (pre-norm residual layers). Dim names used:

* residual stream ``b s h``; query heads are ``nkv g`` (``g = nh/nkv`` queries per KV head) so
  tensor parallelism splits ``nkv`` for GQA and MHA alike; MLA uses ``nh`` with ``dq = dn + dr``;
* keys/values live on ``sk`` (the key length): a zero-cost ``kv_view`` renames ``s -> sk`` in
  training/prefill (where a context-parallel pass gathers K/V); in decode the cache of ``c`` tokens
  is read instead and the new token's K/V are written (``kv_write``);
* ALiBi positions (BLOOM, MPT) add a per-head bias to the materialized scores and have no weights;
* sliding-window layers (``spec.sliding_window_layers``) attend over at most ``w`` keys: their core
  FLOPs scale accordingly and their decode step reads ``skw = min(c, w)`` cached tokens. Their
  KV-cache slot per token is reported like any layer's (a serving model caps it at ``w`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from tensorstage.graph.builder import Builder
from tensorstage.graph.ir import Tensor
from tensorstage.model.spec import ModelSpec


@dataclass(frozen=True)
class LayerConfig:
    """The knobs of a layer build that are not part of the model architecture."""

    phase: str  # train | prefill | decode
    attention_impl: str  # flash | materialized
    causal: bool
    dropout: bool
    kv_dtype: str
    norm_stats: bool  # count per-token norm statistics as saved bytes
    window: bool = False  # sliding-window attention layer (window length: symbol ``w``)


def _norm(bld: Builder, name: str, x: Tensor, spec: ModelSpec, cfg: LayerConfig) -> Tensor:
    return bld.norm(name, x, spec.norm, count_stats=cfg.norm_stats)


def _kv_source(bld: Builder, name: str, x: Tensor, dims_sk: str, cfg: LayerConfig) -> Tensor:
    """K/V (or MLA latent) as the attention reads it: view in train, cache in prefill/decode.

    A sliding-window layer's decode step reads only the last ``min(c, w)`` cached tokens (``skw``).
    """
    if cfg.window and cfg.phase == "decode":
        dims_sk = dims_sk.replace("sk", "skw")
    if cfg.phase == "train":
        return bld.layout(f"{name}.kv_view", x, dims_sk, "kv_view", copy=False)
    per_token = tuple(d for d in x.dims if d not in ("b", "s"))
    bld.kv_cache.append(bld.tensor(f"{name}.cache_slot", per_token, cfg.kv_dtype, "kv_cache"))
    written = bld.tensor(f"{name}.cache_write", x.dims, cfg.kv_dtype, "kv_cache")
    bld._op(f"{name}.kv_write", "kv_write", (x,), (written,))
    if cfg.phase == "prefill":
        return bld.layout(f"{name}.kv_view", x, dims_sk, "kv_view", copy=False)
    return bld.tensor(f"{name}.cache", dims_sk, cfg.kv_dtype, "kv_cache")


def _core_scale(bld: Builder, cfg: LayerConfig, causal: bool) -> sp.Expr:
    """Fraction of the s x sk query-key pairs an attention core computes.

    Causal: 1/2 under ``causal_half`` (s^2/2 pairs), 1 under ``full``. Sliding window of ``w``
    (training/prefill): each query sees W = min(s, w) keys, s*W - W^2/2 pairs under
    ``causal_half`` (the same continuous approximation as s^2/2), s*W under ``full``.
    """
    if not causal:
        return sp.Integer(1)
    if not cfg.window:
        return bld.causal_scale
    s = bld.sizes["s"]
    w_eff = sp.Min(s, bld.sizes["w"])
    if bld.causal_scale == sp.Rational(1, 2):
        return (s * w_eff - w_eff**2 / 2) / s**2
    return w_eff / s


def _core(
    bld: Builder,
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads_q: tuple[str, ...],
    heads_kv: tuple[str, ...],
    spec: ModelSpec,
    cfg: LayerConfig,
    sinks: Tensor | None,
) -> Tensor:
    """Attention core on q (b s Hq dq), k (b sk Hkv dq), v (b sk Hkv dv) -> (b s Hq dv)."""
    causal = cfg.causal and cfg.phase != "decode"  # one query token sees the whole cache
    scale = _core_scale(bld, cfg, causal)
    kd = k.dims[1]  # sk, or skw for a sliding-window layer in decode
    alibi = spec.positions == "alibi"
    if cfg.attention_impl == "flash":
        # the kernel broadcasts KV heads itself: K/V stay at nkv heads. ALiBi: FlashAttention-2's
        # ``alibi_slopes`` adds the bias inside the kernel at no extra matmul work (marked only).
        extra = {"alibi": True} if alibi else {}
        return bld.flash_attention(f"{name}.core", q, k, v, causal, heads_q, sinks, scale=scale, **extra)
    if heads_kv != heads_q and spec.num_heads != spec.kv_heads:
        # eager GQA repeats K/V per query group (HF repeat_kv, Megatron non-flash): saved at nh heads
        k = bld.layout(
            f"{name}.repeat_k", k, " ".join(("b", kd, *heads_q, k.dims[-1])), "repeat_kv", attn_core=True
        )
        v = bld.layout(
            f"{name}.repeat_v", v, " ".join(("b", kd, *heads_q, v.dims[-1])), "repeat_kv", attn_core=True
        )
        heads_kv = heads_q
    hq, hk = " ".join(heads_q), " ".join(heads_kv)
    dq, dv = q.dims[-1], v.dims[-1]
    scores = bld.einsum(
        f"{name}.scores",
        f"b s {hq} {dq}, b {kd} {hk} {dq} -> b {hq} s {kd}",
        q,
        k,
        flops_scale=scale,
        attn_core=True,
        causal=causal,
    )
    if alibi:
        # ALiBi (Press et al. 2022): a per-head linear bias slope_h * key position, broadcast over
        # the batch and the queries (softmax is shift-invariant per row; HF BLOOM's build_alibi_tensor)
        bias = bld.tensor(f"{name}.alibi_bias", (*heads_q, kd), role="input")
        scores = bld.add(f"{name}.alibi", scores, bias, attn_core=True)
    probs = bld.softmax(
        f"{name}.softmax", scores, extra=(sinks,) if sinks is not None else (), attn_core=True
    )
    if cfg.dropout and cfg.phase == "train":
        probs = bld.dropout(f"{name}.attn_dropout", probs, attn_core=True)
    return bld.einsum(
        f"{name}.context",
        f"b {hq} s {kd}, b {kd} {hk} {dv} -> b s {hq} {dv}",
        probs,
        v,
        flops_scale=scale,
        attn_core=True,
        causal=causal,
    )


def attention(bld: Builder, x: Tensor, spec: ModelSpec, cfg: LayerConfig) -> Tensor:
    """GQA/MHA attention: q/k/v projections, optional qk-norm, RoPE, core, output projection."""
    n = "attn"
    bias = spec.qkv_bias
    if bld.megatron_kernels:
        # Megatron's linear_qkv: one GEMM per KV-head group [q x g, k, v] (its input gradient is one
        # GEMM too, so no gradient sums over the input), then views of its output
        qkv = bld.linear(f"{n}.qkv_proj", x, "h nkv gkv dh", "b s nkv gkv dh", bias)
        q = bld.layout(f"{n}.q", qkv, "b s nkv g dh", "split", copy=False)
        k = bld.layout(f"{n}.k", qkv, "b s nkv dh", "split", copy=False)
        v = bld.layout(f"{n}.v", qkv, "b s nkv dh", "split", copy=False)
    else:
        q = bld.linear(f"{n}.q_proj", x, "h nkv g dh", "b s nkv g dh", bias)
        k = bld.linear(f"{n}.k_proj", x, "h nkv dh", "b s nkv dh", bias)
        v = bld.linear(f"{n}.v_proj", x, "h nkv dh", "b s nkv dh", bias)
    if spec.qk_norm:
        q = bld.norm(f"{n}.q_norm", q, "rmsnorm", count_stats=cfg.norm_stats)
        k = bld.norm(f"{n}.k_norm", k, "rmsnorm", count_stats=cfg.norm_stats)
    if spec.positions == "rope":
        q = bld.rope(f"{n}.q_rope", q)
        k = bld.rope(f"{n}.k_rope", k)
    k = _kv_source(bld, f"{n}.k", k, "b sk nkv dh", cfg)
    v = _kv_source(bld, f"{n}.v", v, "b sk nkv dh", cfg)
    sinks = bld.weight(f"{n}.sinks", "nkv g") if spec.attn_sinks else None
    ctx = _core(bld, n, q, k, v, ("nkv", "g"), ("nkv",), spec, cfg, sinks)
    return bld.linear(f"{n}.o_proj", ctx, "nkv g dh h", "b s h", spec.out_bias)


def mla_attention(bld: Builder, x: Tensor, spec: ModelSpec, cfg: LayerConfig) -> Tensor:
    """Multi-head latent attention (DeepSeek-V2/V3).

    Training and prefill up-project the latent to per-head K/V (the naive form); decode uses the
    weight-absorbed form DeepSeek serves with: queries are projected into the latent space and
    attend over the cached latent directly, so a step costs O(c * nh * (kvl + dr)) rather than
    re-expanding the whole cache.
    """
    n = "attn"
    m = spec.mla
    assert m is not None
    if m.q_lora_rank:
        cq = bld.linear(f"{n}.q_a_proj", x, "h ql", "b s ql", spec.qkv_bias)
        cq = bld.norm(f"{n}.q_a_norm", cq, spec.norm, count_stats=cfg.norm_stats)
        q = bld.linear(f"{n}.q_b_proj", cq, "ql nh dq", "b s nh dq")
    else:
        q = bld.linear(f"{n}.q_proj", x, "h nh dq", "b s nh dq")
    q = bld.rope(f"{n}.q_rope", q)  # on the dr part; cost bounded by the full width
    ckv = bld.linear(f"{n}.kv_a_proj", x, "h kvr", "b s kvr", spec.qkv_bias)
    latent = bld.layout(f"{n}.kv_latent", ckv, "b s kvl", "split", copy=False)
    k_pe = bld.layout(f"{n}.k_pe", ckv, "b s dr", "split", copy=False)
    k_pe = bld.rope(f"{n}.k_rope", k_pe)
    latent = bld.norm(f"{n}.kv_a_norm", latent, spec.norm, count_stats=cfg.norm_stats)
    latent = _kv_source(bld, f"{n}.latent", latent, "b sk kvl", cfg)
    k_pe = _kv_source(bld, f"{n}.k_pe", k_pe, "b sk dr", cfg)
    w_uk = bld.weight(f"{n}.kv_b_proj_k.weight", "kvl nh dn")
    w_uv = bld.weight(f"{n}.kv_b_proj_v.weight", "kvl nh dv")
    if cfg.phase == "decode":
        q_nope = bld.layout(f"{n}.q_nope", q, "b s nh dn", "split", copy=False)
        q_pe = bld.layout(f"{n}.q_pe", q, "b s nh dr", "split", copy=False)
        q_lat = bld.einsum(f"{n}.q_absorb", "b s nh dn, kvl nh dn -> b s nh kvl", q_nope, w_uk)
        s_lat = bld.einsum(f"{n}.scores_latent", "b s nh kvl, b sk kvl -> b nh s sk", q_lat, latent)
        s_pe = bld.einsum(f"{n}.scores_rope", "b s nh dr, b sk dr -> b nh s sk", q_pe, k_pe)
        scores = bld.add(f"{n}.scores", s_lat, s_pe)
        probs = bld.softmax(f"{n}.softmax", scores)
        ctx_lat = bld.einsum(f"{n}.context_latent", "b nh s sk, b sk kvl -> b s nh kvl", probs, latent)
        ctx = bld.einsum(f"{n}.v_absorb", "b s nh kvl, kvl nh dv -> b s nh dv", ctx_lat, w_uv)
    else:
        k_nope = bld.einsum(f"{n}.kv_b_proj_k", "b sk kvl, kvl nh dn -> b sk nh dn", latent, w_uk)
        v = bld.einsum(f"{n}.kv_b_proj_v", "b sk kvl, kvl nh dv -> b sk nh dv", latent, w_uv)
        k = bld.layout(f"{n}.k_concat", k_nope, "b sk nh dq", "concat", extra=(k_pe,))
        ctx = _core(bld, n, q, k, v, ("nh",), ("nh",), spec, cfg, None)
    return bld.linear(f"{n}.o_proj", ctx, "nh dv h", "b s h", spec.out_bias)


def mlp(
    bld: Builder,
    x: Tensor,
    spec: ModelSpec,
    width: str,
    name: str = "mlp",
    bias: bool | None = None,
    lead: str = "b s",
    scale: Tensor | None = None,
) -> Tensor:
    """Dense MLP: GELU/ReLU two-matrix or gated (SwiGLU/GeGLU) three-matrix, over width dim ``width``.
    ``scale``: per-row factors applied to the activation output (MoE routing probabilities under
    Megatron-Core's scaled activation); fused into the GLU kernel with Megatron kernels."""
    bias = spec.mlp_bias if bias is None else bias
    w_lead = "e " if lead.startswith("e") else ""
    act = "silu" if spec.activation == "swiglu" else ("relu" if spec.activation == "relu" else "gelu")
    if spec.gated and bld.fused_gate_up:
        # Megatron-Core's linear_fc1 (vLLM's gate_up_proj; the experts' fused w13 / TEGroupedMLP fc1, as
        # the measured fused-MoE layers that calibrate the grouped efficiency run it): gate and up
        # halves in one GEMM, views of its output
        fc1 = bld.linear(f"{name}.fc1", x, f"{w_lead}h two {width}", f"{lead} two {width}", bias)
        # the fused GLU backward writes d[gate; up] as one tensor: no copy into the fc1 gradient
        gate = bld.layout(f"{name}.gate", fc1, f"{lead} {width}", "split", copy=False, grad_in_place=True)
        up = bld.layout(f"{name}.up", fc1, f"{lead} {width}", "split", copy=False, grad_in_place=True)
        hdn = bld.glu(f"{name}.act", act, gate, up, scale)
        scale = None
    elif spec.gated:
        gate = bld.linear(f"{name}.gate_proj", x, f"{w_lead}h {width}", f"{lead} {width}", bias)
        up = bld.linear(f"{name}.up_proj", x, f"{w_lead}h {width}", f"{lead} {width}", bias)
        if bld.megatron_kernels:
            hdn = bld.glu(f"{name}.act", act, gate, up, scale)
            scale = None
        else:
            a = bld.unary(f"{name}.act", act, gate)
            hdn = bld.mul(f"{name}.gated", a, up)
    else:
        up = bld.linear(f"{name}.fc1", x, f"{w_lead}h {width}", f"{lead} {width}", bias)
        hdn = bld.unary(f"{name}.act", act, up)
    if scale is not None:
        hdn = bld.mul(f"{name}.prob_scale", hdn, scale)
    return bld.linear(f"{name}.down_proj", hdn, f"{w_lead}{width} h", f"{lead} h", bias)


def moe(
    bld: Builder,
    x: Tensor,
    spec: ModelSpec,
    capacity_factor: float,
    routing_skew: float,
    dropless: bool = True,
) -> Tensor:
    """Token-choice MoE: router, top-k, dispatch, batched expert MLPs, combine, shared experts.

    Where the routing probabilities multiply follows the kernels: HF / PyTorch weight the expert
    outputs in the combine (which keeps them, ``h`` wide, for the probabilities' gradient);
    Megatron-Core (``bld.megatron_kernels``) permutes the probabilities with the tokens and scales
    the activation inside the experts (``TEGroupedMLP``'s "scaled activation",
    ``weighted_bias_swiglu_impl``), so the combine is a plain scatter-add and only the
    ``fe``-wide activation inputs are kept."""
    m = spec.moe
    assert m is not None
    logits = bld.linear("moe.router", x, "h e", "b s e", m.router_bias)
    probs = bld.softmax("moe.router_softmax", logits)
    gates, ids = bld.topk("moe.topk", probs)
    xe, tok = bld.dispatch("moe.dispatch", x, ids, capacity_factor, routing_skew, dropless)
    if bld.megatron_kernels:
        ge = bld.permute_gates("moe.permuted_probs", gates, tok)
        ye = mlp(bld, xe, spec, "fe", name="moe.experts", bias=m.expert_bias, lead="e t", scale=ge)
        y = bld.combine("moe.combine", ye, None, tok, like=x)
    else:
        ye = mlp(bld, xe, spec, "fe", name="moe.experts", bias=m.expert_bias, lead="e t")
        y = bld.combine("moe.combine", ye, gates, tok, like=x)
    if m.shared_experts:
        ys = mlp(bld, x, spec, "fs", name="moe.shared", bias=m.expert_bias)
        y = bld.add("moe.shared_add", y, ys)
    return y


def transformer_layer(
    bld: Builder,
    x: Tensor,
    spec: ModelSpec,
    cfg: LayerConfig,
    moe_layer: bool,
    capacity_factor: float,
    routing_skew: float,
    dropless: bool = True,
) -> Tensor:
    """Pre-norm layer: x + Drop(Attn(Norm(x))), then + Drop(MLP-or-MoE(Norm(.))); or the parallel
    block of GPT-J / PaLM / GPT-NeoX (:func:`parallel_layer`)."""
    train = cfg.phase == "train"
    if spec.parallel_block:
        return parallel_layer(bld, x, spec, cfg, moe_layer, capacity_factor, routing_skew, dropless)
    a = _norm(bld, "input_norm", x, spec, cfg)
    a = (mla_attention if spec.mla is not None else attention)(bld, a, spec, cfg)
    if cfg.dropout and train:
        a = bld.dropout("attn.out_dropout", a)
    x = bld.add("attn.residual", x, a)
    m = _norm(bld, "post_attention_norm", x, spec, cfg)
    m = moe(bld, m, spec, capacity_factor, routing_skew, dropless) if moe_layer else mlp(bld, m, spec, "f")
    if cfg.dropout and train:
        m = bld.dropout("mlp.out_dropout", m)
    return bld.add("mlp.residual", x, m)


def parallel_layer(
    bld: Builder,
    x: Tensor,
    spec: ModelSpec,
    cfg: LayerConfig,
    moe_layer: bool,
    capacity_factor: float,
    routing_skew: float,
    dropless: bool = True,
) -> Tensor:
    """Parallel block: x + Drop(Attn(Norm(x))) + Drop(MLP(Norm'(x))), Norm' = Norm when
    ``parallel_norms`` is 1 (GPT-J's ``ln_1``, PaLM), its own norm when 2 (GPT-NeoX).

    The branch outputs are summed before the residual add, so under tensor parallelism the two
    row-parallel partial sums are reduced by one all-reduce (PaLM sec. 2; GPT-NeoX's
    ``gpt_j_residual``: dropout per branch on the partial sums, one ``reduce`` after the sum).
    Dropout is marked ``on_partial_sum``: with the TP group's shared RNG state its mask is the
    same on every rank, so it applies to partial sums and the propagation keeps them unreduced.
    """
    train = cfg.phase == "train"
    a_in = _norm(bld, "input_norm", x, spec, cfg)
    m_in = a_in if spec.parallel_norms == 1 else _norm(bld, "post_attention_norm", x, spec, cfg)
    a = (mla_attention if spec.mla is not None else attention)(bld, a_in, spec, cfg)
    m = moe(bld, m_in, spec, capacity_factor, routing_skew, dropless) if moe_layer else mlp(bld, m_in, spec, "f")
    if cfg.dropout and train:
        a = bld.dropout("attn.out_dropout", a, on_partial_sum=True)
        m = bld.dropout("mlp.out_dropout", m, on_partial_sum=True)
    y = bld.add("parallel.branch_sum", a, m)
    return bld.add("mlp.residual", x, y)


def embedding(bld: Builder, spec: ModelSpec, cfg: LayerConfig) -> tuple[Tensor, Tensor]:
    """Token (and learned position) embedding; returns (token table, output)."""
    ids = bld.tensor("input_ids", "b s", "int64", "input")
    table = bld.weight("embed_tokens.weight", "v h")
    y = bld.gather("embed_tokens", table, ids)
    if spec.positions == "learned":
        pos_ids = bld.tensor("position_ids", "s", "int64", "input")
        pos_table = bld.weight("embed_positions.weight", "p h")
        pos = bld.gather("embed_positions", pos_table, pos_ids)
        y = bld.add("embed_add", y, pos)
    if spec.embed_norm:  # BLOOM's word_embeddings_layernorm
        y = _norm(bld, "embed_norm", y, spec, cfg)
    if cfg.dropout and cfg.phase == "train":
        y = bld.dropout("embed_dropout", y)
    return table, y


def head(
    bld: Builder, x: Tensor, spec: ModelSpec, cfg: LayerConfig, table: Tensor | None, loss_dtype: str
) -> Tensor:
    """Final norm, LM head (tied to ``table`` when given) and, in training, cross-entropy loss."""
    y = _norm(bld, "final_norm", x, spec, cfg)
    if cfg.phase == "prefill":  # only the last position's logits are needed to sample
        y = bld.layout("last_token", y, "b one h", "select_last")
    lead = " ".join(y.dims[:-1])
    if table is not None:
        logits = bld.einsum("lm_head", f"{lead} h, v h -> {lead} v", y, table)
    else:
        logits = bld.linear("lm_head", y, "h v", f"{lead} v")
    if cfg.phase != "train":
        return logits
    targets = bld.tensor("labels", "b s", "int64", "input")
    return bld.cross_entropy("loss", logits, targets, loss_dtype)
