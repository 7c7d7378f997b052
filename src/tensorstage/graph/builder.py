"""Op constructors: each forward op kind with its cost rule and what it saves for backward.

A :class:`Builder` records forward ops of one block. Cost rules (all symbolic):

* ``einsum``: FLOPs = 2 x product of the sizes of every distinct dim in the spec (2 per
  multiply-add), times ``flops_scale`` (0.5 for causal attention scores/PV under the
  ``causal_half`` convention). Saves the operands its backward needs.
* elementwise (``unary``/``mul``/``add``/``rope``), ``norm``, ``softmax``, ``dropout``: no matrix
  FLOPs; ``vector_flops`` = a small per-element constant (documented at each constructor). What
  they save mirrors PyTorch autograd: gelu/silu save their input, mul saves both operands, add
  saves nothing, softmax saves its output, dropout saves its mask, norms save input + per-token
  statistics (fp32), fused RMSNorm saves input + rstd.
* ``attention`` (flash, fused): FLOPs = 2*b*s*sk*nh*(dq + dv) forward; backward recomputes the
  scores inside the kernel: 2*b*s*sk*nh*(3*dq + 2*dv) (the convention of
  ``torch.utils.flop_counter`` for SDPA backward). Saves q, k, v, output and the fp32 log-sum-exp.

Bytes read/written are the sizes of inputs/outputs by dtype (one pass, no cache model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from tensorstage.graph.ir import Op, Tensor

Z = sp.Integer(0)


@dataclass
class Builder:
    """Records the forward ops of one block; tensor sizes come from ``sizes`` (dim name -> expr)."""

    sizes: dict[str, sp.Expr]
    act_dtype: str
    param_dtype: str
    compute_dtype: str = "bf16"
    stats_dtype: str = "fp32"
    mask_dtype: str = "bool"
    causal_scale: sp.Expr = sp.Rational(1, 2)
    ops: list[Op] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    kv_cache: list[Tensor] = field(default_factory=list)
    prefix: str = ""
    # Megatron-LM's own kernels where they differ from eager PyTorch (GraphOptions.megatron_fusions):
    # the fused SwiGLU/GeGLU (:meth:`glu`) and the multi-pass vocab-parallel cross-entropy
    # (:meth:`cross_entropy`)
    megatron_kernels: bool = False
    # gate and up of a gated MLP as one GEMM (GraphOptions.fused_gate_up)
    fused_gate_up: bool = False

    # --- tensors ----------------------------------------------------------------------------
    def numel(self, dims: tuple[str, ...]) -> sp.Expr:
        """Element count of a tensor with these dims."""
        return sp.Mul(*(self.sizes[d] for d in dims)) if dims else sp.Integer(1)

    def tensor(
        self,
        name: str,
        dims: tuple[str, ...] | str,
        dtype: str | None = None,
        role: str = "activation",
        requires_grad: bool = False,
    ) -> Tensor:
        """A new tensor (``dims`` may be a space-separated string)."""
        dims_t = tuple(dims.split()) if isinstance(dims, str) else tuple(dims)
        return Tensor(
            self.prefix + name, dims_t, dtype or self.act_dtype, role, self.numel(dims_t), requires_grad
        )

    def weight(self, name: str, dims: str) -> Tensor:
        """A trainable weight (param dtype), registered on the block."""
        t = self.tensor(name, dims, self.param_dtype, "weight", True)
        self.weights.append(t)
        return t

    def _op(
        self,
        name: str,
        kind: str,
        inputs: tuple[Tensor, ...],
        outputs: tuple[Tensor, ...],
        flops: sp.Expr = Z,
        vector_flops: sp.Expr = Z,
        einsum: str | None = None,
        saved: tuple[Tensor, ...] = (),
        **attrs: object,
    ) -> Op:
        op = Op(
            self.prefix + name,
            kind,
            "fwd",
            inputs,
            outputs,
            flops,
            vector_flops,
            sp.Add(*(t.nbytes for t in inputs)),
            sp.Add(*(t.nbytes for t in outputs)),
            einsum,
            saved,
            dict(attrs),
        )
        self.ops.append(op)
        return op

    @staticmethod
    def _rg(*ts: Tensor) -> bool:
        return any(t.requires_grad for t in ts)

    # --- matmul-like ------------------------------------------------------------------------
    def einsum(
        self,
        name: str,
        spec: str,
        a: Tensor,
        b: Tensor,
        out: str | None = None,
        flops_scale: sp.Expr = sp.Integer(1),
        **attrs: object,
    ) -> Tensor:
        """``out = einsum(spec, a, b)``; spec over dim names, e.g. ``"b s h, h f -> b s f"``."""
        lhs, rhs = spec.split("->")
        in_dims = [tuple(x.split()) for x in lhs.split(",")]
        out_dims = tuple(rhs.split())
        if in_dims[0] != a.dims or in_dims[1] != b.dims:
            raise ValueError(f"einsum {name}: spec {spec} does not match {a.dims} and {b.dims}")
        all_dims = tuple(dict.fromkeys([*in_dims[0], *in_dims[1], *out_dims]))
        flops = 2 * self.numel(all_dims) * flops_scale
        y = self.tensor(out or name, out_dims, requires_grad=self._rg(a, b))
        saved = tuple(t for t, other in ((a, b), (b, a)) if other.requires_grad)
        self._op(
            name,
            "einsum",
            (a, b),
            (y,),
            flops=flops,
            einsum=spec,
            saved=saved,
            flops_scale=flops_scale,
            compute_dtype=self.compute_dtype,
            **attrs,
        )
        return y

    def linear(
        self, name: str, x: Tensor, w_dims: str, out_dims: str, bias: bool = False, **attrs: object
    ) -> Tensor:
        """``x @ W (+ bias)``: weight dims ``w_dims`` contract x's last dims; bias over the new dims."""
        w = self.weight(f"{name}.weight", w_dims)
        spec = f"{' '.join(x.dims)}, {w_dims} -> {out_dims}"
        y = self.einsum(name, spec, x, w, **attrs)
        if bias:
            kept = [d for d in w_dims.split() if d in out_dims.split()]
            bvec = self.weight(f"{name}.bias", " ".join(kept))
            y = self.add(f"{name}.bias_add", y, bvec, **attrs)
        return y

    # --- elementwise ------------------------------------------------------------------------
    def unary(self, name: str, fn: str, x: Tensor, vflops_per_elem: int = 1, **attrs: object) -> Tensor:
        """Pointwise activation (gelu/silu/relu/...): saves its input (as PyTorch does)."""
        y = self.tensor(name, x.dims, requires_grad=x.requires_grad)
        self._op(
            name,
            "unary",
            (x,),
            (y,),
            vector_flops=vflops_per_elem * x.numel,
            saved=(x,) if x.requires_grad else (),
            fn=fn,
            **attrs,
        )
        return y

    def mul(self, name: str, a: Tensor, b: Tensor, **attrs: object) -> Tensor:
        """Elementwise product (b may broadcast): saves the operand each input's grad needs."""
        y = self.tensor(name, a.dims, requires_grad=self._rg(a, b))
        saved = tuple(t for t, other in ((a, b), (b, a)) if other.requires_grad)
        self._op(name, "mul", (a, b), (y,), vector_flops=a.numel, saved=saved, **attrs)
        return y

    def glu(self, name: str, fn: str, gate: Tensor, up: Tensor, scale: Tensor | None = None,
            **attrs: object) -> Tensor:
        """Fused gated activation ``fn(gate) * up`` (Megatron-Core's ``bias_swiglu_impl`` /
        Transformer Engine's swiglu): one kernel reads both halves and writes the product; it saves
        only its inputs and recomputes ``fn(gate)`` in backward, so the activation output that eager
        ``silu`` + ``mul`` keep (one ``b*s*f`` tensor more) is never stored. FLOPs as unfused.

        ``scale`` (MoE experts, Megatron-Core's ``weighted_bias_swiglu_impl``): each row is
        multiplied by its routing probability in the same kernel, which saves the probabilities too."""
        ins = (gate, up) if scale is None else (gate, up, scale)
        y = self.tensor(name, gate.dims, requires_grad=self._rg(*ins))
        saved = ins if y.requires_grad else ()
        vf = (2 if scale is None else 3) * gate.numel
        self._op(name, "glu", ins, (y,), vector_flops=vf, saved=saved, fn=fn, **attrs)
        return y

    def add(self, name: str, a: Tensor, b: Tensor, **attrs: object) -> Tensor:
        """Elementwise sum (b may broadcast, e.g. a bias): saves nothing."""
        y = self.tensor(name, a.dims, requires_grad=self._rg(a, b))
        self._op(name, "add", (a, b), (y,), vector_flops=a.numel, **attrs)
        return y

    def rope(self, name: str, x: Tensor, **attrs: object) -> Tensor:
        """Rotary embedding ``x*cos + rot(x)*sin``: the cos/sin tables are constants, nothing saved."""
        y = self.tensor(name, x.dims, requires_grad=x.requires_grad)
        self._op(name, "rope", (x,), (y,), vector_flops=3 * x.numel, **attrs)
        return y

    def layout(
        self,
        name: str,
        x: Tensor,
        dims: str,
        fn: str,
        extra: tuple[Tensor, ...] = (),
        copy: bool = True,
        **attrs: object,
    ) -> Tensor:
        """Data movement without arithmetic (repeat_kv, concat, rename s->sk for KV, split).

        ``copy=False`` marks a view: it moves no bytes.
        """
        y = self.tensor(name, dims, dtype=x.dtype, requires_grad=self._rg(x, *extra))
        op = self._op(name, "layout", (x, *extra), (y,), fn=fn, copy=copy, **attrs)
        if not copy:
            op.bytes_read = Z
            op.bytes_written = Z
        return y

    # --- reductions -------------------------------------------------------------------------
    def norm(
        self,
        name: str,
        x: Tensor,
        kind: str,
        bias: bool | None = None,
        count_stats: bool = True,
        **attrs: object,
    ) -> Tensor:
        """LayerNorm (weight+bias, saves input + mean + rstd) or RMSNorm (weight, saves input + rstd)."""
        last = x.dims[-1]
        w = self.weight(f"{name}.weight", last)
        ins = [x, w]
        if kind == "layernorm" and bias is not False:
            ins.append(self.weight(f"{name}.bias", last))
        stats_dims = x.dims[:-1]
        n_stats = 2 if kind == "layernorm" else 1
        stats = [
            self.tensor(f"{name}.{s}", stats_dims, self.stats_dtype)
            for s in (("mean", "rstd") if n_stats == 2 else ("rstd",))
        ]
        y = self.tensor(name, x.dims, requires_grad=True)
        saved = (x, *stats) if count_stats else (x,)
        self._op(
            name,
            "norm",
            tuple(ins),
            (y,),
            vector_flops=(4 if n_stats == 2 else 3) * x.numel,
            saved=saved,
            fn=kind,
            **attrs,
        )
        return y

    def softmax(self, name: str, x: Tensor, extra: tuple[Tensor, ...] = (), **attrs: object) -> Tensor:
        """Softmax over the last dim (scale and causal mask fused): saves its output."""
        y = self.tensor(name, x.dims, requires_grad=self._rg(x, *extra))
        self._op(name, "softmax", (x, *extra), (y,), vector_flops=5 * x.numel, saved=(y,), **attrs)
        return y

    def dropout(self, name: str, x: Tensor, **attrs: object) -> Tensor:
        """Dropout: saves its mask (``mask_dtype``: 1-byte bool on GPUs/Megatron)."""
        mask = self.tensor(f"{name}.mask", x.dims, self.mask_dtype, "mask")
        y = self.tensor(name, x.dims, requires_grad=x.requires_grad)
        self._op(name, "dropout", (x,), (y, mask), vector_flops=2 * x.numel, saved=(mask,), **attrs)
        return y

    # --- attention --------------------------------------------------------------------------
    def flash_attention(
        self,
        name: str,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        q_heads: tuple[str, ...],
        sinks: Tensor | None = None,
        scale: sp.Expr | None = None,
        **attrs: object,
    ) -> Tensor:
        """Fused attention core (flash): never materializes the sk x s scores.

        ``scale`` is the fraction of query-key pairs computed (default: the causal convention).
        """
        b, s, dq, dv, sk = q.dims[0], q.dims[1], q.dims[-1], v.dims[-1], k.dims[1]
        if scale is None:
            scale = self.causal_scale if causal else sp.Integer(1)
        core = self.numel((b, s, sk, *q_heads))
        flops = 2 * core * (self.sizes[dq] + self.sizes[dv]) * scale
        out = self.tensor(name, (b, s, *q_heads, dv), requires_grad=self._rg(q, k, v))
        lse = self.tensor(f"{name}.lse", (b, *q_heads, s), self.stats_dtype)
        ins = (q, k, v) if sinks is None else (q, k, v, sinks)
        self._op(
            name,
            "attention",
            ins,
            (out, lse),
            flops=flops,
            vector_flops=5 * core * scale,
            saved=(q, k, v, out, lse),
            causal=causal,
            flops_scale=scale,
            q_heads=q_heads,
            attn_core=True,
            compute_dtype=self.compute_dtype,
            **attrs,
        )
        return out

    # --- embedding and loss -----------------------------------------------------------------
    def gather(self, name: str, table: Tensor, ids: Tensor, **attrs: object) -> Tensor:
        """Embedding lookup: one table row per id; saves the ids (as ``nn.Embedding``)."""
        y = self.tensor(name, (*ids.dims, table.dims[-1]), requires_grad=table.requires_grad)
        self._op(name, "gather", (table, ids), (y,), saved=(ids,), **attrs)
        # a lookup reads only the rows it uses, not the whole table
        self.ops[-1].bytes_read = y.nbytes + ids.nbytes
        return y

    def cross_entropy(self, name: str, logits: Tensor, targets: Tensor, loss_dtype: str) -> Tensor:
        """Mean token cross-entropy: saves log-softmax (``loss_dtype``) and targets, like PyTorch.

        With :attr:`megatron_kernels`, the bytes are those of Megatron-LM's vocab-parallel
        cross-entropy (``tensor_parallel/cross_entropy.py``, unfused: every Megatron run before
        ``--cross-entropy-loss-fusion``), which makes one pass per step over the ``loss_dtype``
        logits ``F`` after casting the ``L`` logits: cast (read L, write F), max (read F), subtract
        the max (read F, write F), exp in place (read F, write F), sum (read F), divide in place (read
        F, write F): reads ``L + 5F``, writes ``4F``. Backward (:func:`autodiff._vjp_cross_entropy`):
        scale the saved softmax in place (read F, write F), cast back (read F, write L)."""
        logp = self.tensor(f"{name}.log_softmax", logits.dims, loss_dtype)
        loss = self.tensor(name, (), "fp32", requires_grad=True)
        op = self._op(
            name,
            "cross_entropy",
            (logits, targets),
            (loss, logp),
            vector_flops=6 * logits.numel,
            saved=(logp, targets),
            **({"passes": "megatron"} if self.megatron_kernels else {}),
        )
        if self.megatron_kernels:
            op.bytes_read = logits.nbytes + 5 * logp.nbytes + targets.nbytes
            op.bytes_written = 4 * logp.nbytes + loss.nbytes
        return loss

    # --- mixture of experts -----------------------------------------------------------------
    def topk(self, name: str, probs: Tensor, **attrs: object) -> tuple[Tensor, Tensor]:
        """Top-k selection over experts: gates (b s k) and int64 ids; saves the ids."""
        lead = probs.dims[:-1]
        gates = self.tensor(f"{name}.gates", (*lead, "k"), requires_grad=probs.requires_grad)
        ids = self.tensor(f"{name}.ids", (*lead, "k"), "int64", "index")
        self._op(name, "topk", (probs,), (gates, ids), vector_flops=probs.numel, saved=(ids,), **attrs)
        return gates, ids

    def dispatch(
        self,
        name: str,
        x: Tensor,
        ids: Tensor,
        capacity_factor: float,
        routing_skew: float,
        dropless: bool = True,
        **attrs: object,
    ) -> tuple[Tensor, Tensor]:
        """Permute tokens to experts: ``x (b s h) -> xe (e t h)``, t = cf*b*s*k/e tokens per expert.

        Saves the int64 token index of every routed slot (``index_select`` keeps it). Dropless
        routing (cf = 1) computes exactly b*s*k token-expert pairs; a capacity factor pads every
        expert to cf x the mean. The hottest expert receives ``routing_skew`` x the mean load
        (capped at the capacity when not dropless): attrs ``mean_expert_tokens`` and
        ``hot_expert_tokens`` (symbolic) let an expert-parallel pass size its slowest rank; totals
        do not depend on the skew.
        """
        mean = self.sizes["t"] / capacity_factor
        hot_factor = routing_skew if dropless else min(routing_skew, capacity_factor)
        attrs = {"mean_expert_tokens": mean, "hot_expert_tokens": hot_factor * mean, **attrs}
        tok = self.tensor(f"{name}.token_index", ("e", "t"), "int64", "index")
        xe = self.tensor(name, ("e", "t", x.dims[-1]), requires_grad=x.requires_grad)
        self._op(
            name,
            "dispatch",
            (x, ids),
            (xe, tok),
            saved=(tok,),
            capacity_factor=capacity_factor,
            routing_skew=routing_skew,
            **attrs,
        )
        return xe, tok

    def permute_gates(self, name: str, gates: Tensor, tok: Tensor, **attrs: object) -> Tensor:
        """The routing probabilities in slot order, ``gates (b s k) -> (e t)``, as Megatron-Core's
        dispatcher permutes ``probs`` with the tokens (``permuted_probs``); saves the slot index."""
        ge = self.tensor(name, ("e", "t"), requires_grad=gates.requires_grad)
        self._op(name, "permute", (gates, tok), (ge,), vector_flops=Z, saved=(tok,), **attrs)
        return ge

    def combine(
        self, name: str, ye: Tensor, gates: Tensor | None, tok: Tensor, like: Tensor, **attrs: object
    ) -> Tensor:
        """Weight expert outputs by their gates and scatter-add back to tokens.

        Saves the expert outputs, the per-slot gate values (e t), the token index and the int64
        slot permutation that gathered the gates (a permute-based dispatcher's ``sorted_indices``).
        ``gates=None``: the probabilities were applied inside the experts (Megatron-Core's scaled
        activation), so the combine is a plain scatter-add that saves only the token index.
        """
        if gates is None:
            y = self.tensor(name, like.dims, requires_grad=ye.requires_grad)
            self._op(name, "combine", (ye, tok), (y,), vector_flops=ye.numel, saved=(tok,), **attrs)
            return y
        ge = self.tensor(f"{name}.slot_gates", ("e", "t"), requires_grad=gates.requires_grad)
        perm = self.tensor(f"{name}.slot_index", ("e", "t"), "int64", "index")
        y = self.tensor(name, like.dims, requires_grad=self._rg(ye, gates))
        self._op(
            name,
            "combine",
            (ye, gates, tok),
            (y, ge, perm),
            vector_flops=2 * ye.numel,
            saved=(ye, ge, tok, perm),
            **attrs,
        )
        return y
