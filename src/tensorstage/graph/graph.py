"""`build_graph`: one symbolic graph of a model for a phase, and its costs.

The graph is embedding + one :class:`~tensorstage.graph.ir.Block` per *layer kind* (dense, moe,
mla_dense, mla_moe) + head (final norm, LM head, loss). ``layer_kinds[i]`` names the kind of layer
``i``; a 126-layer dense model holds one layer block, used 126 times, so building and evaluating it
costs the same as for one layer. Iterate :meth:`Graph.execution` for the ops of every layer in
execution order (what schedules and lowering consume).

Costs are sympy expressions; :meth:`Graph.costs` evaluates them either numerically (compiled once
per block with ``sympy.lambdify``, vectorized: pass numpy arrays as bindings to evaluate thousands
of design points in one call) or exactly (``exact=True``: sympy integers, for checks against
closed forms).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import sympy as sp

from tensorstage.errors import SpecError
from tensorstage.graph.autodiff import backward
from tensorstage.graph.builder import Builder
from tensorstage.graph.dims import FREE_SYMBOLS, SYMBOLS, base_dim_sizes, dtype_bytes
from tensorstage.graph.ir import CATEGORIES, Block, Op, Tensor
from tensorstage.graph.layers import LayerConfig, embedding, head, transformer_layer
from tensorstage.graph.optimizer import main_grad_copy_dtype, optimizer_ops
from tensorstage.graph.options import GraphOptions
from tensorstage.model.spec import ModelSpec

#: Metric names of :meth:`Graph.costs`: ``<category>_<quantity>`` plus block-level memory metrics.
QUANTITIES = ("flops", "vector_flops", "bytes")
OP_QUANTITIES = ("flops", "vector_flops", "bytes_read", "bytes_written")
METRICS: tuple[str, ...] = (
    *(f"{c}_{q}" for c in CATEGORIES for q in QUANTITIES),
    "activation_bytes",
    "params",
    "kv_cache_bytes_per_token",
)


def spec_bindings(spec: ModelSpec, options: GraphOptions) -> dict[str, float]:
    """Numeric values of the model-architecture symbols (unused ones bound to 1)."""
    vals: dict[str, float] = {name: 1 for name in FREE_SYMBOLS}
    vals["w"] = spec.sliding_window or 1
    vals.update(
        h=spec.hidden,
        nh=spec.num_heads,
        nkv=spec.kv_heads,
        dh=spec.dim_head,
        f=spec.ffn,
        v=spec.vocab,
        p=spec.max_seq,
    )
    if spec.moe is not None:
        m = spec.moe
        cf = options.capacity_factor or m.capacity_factor or 1.0
        vals.update(
            e=m.num_experts,
            k=m.top_k,
            fe=m.expert_ffn,
            fs=max(1, m.shared_experts * m.shared_ffn_each),
            cf=cf,
        )
    if spec.mla is not None:
        a = spec.mla
        vals.update(
            ql=max(1, a.q_lora_rank),
            kvl=a.kv_lora_rank,
            dr=a.qk_rope_head_dim,
            dn=a.qk_nope_head_dim,
            dv=a.v_head_dim,
        )
        vals["nkv"] = spec.num_heads
    return vals


@dataclass
class CostReport:
    """Evaluated costs: per block kind (one instance), per layer index, and step totals.

    Values are floats / numpy arrays (numeric mode) or exact sympy numbers (``exact=True``).
    ``totals`` multiply each block by how often it runs (layers by their count).
    """

    per_block: dict[str, dict[str, Any]]
    counts: dict[str, int]
    totals: dict[str, Any]
    layer_kinds: list[str] = field(default_factory=list)

    def per_layer(self, metric: str) -> list[Any]:
        """``metric`` for each layer index, in order."""
        return [self.per_block[k][metric] for k in self.layer_kinds]

    def total_flops(self) -> Any:
        """Matrix FLOPs of every category executed in the step (forward, backward, recompute)."""
        return sum(self.totals[f"{c}_flops"] for c in CATEGORIES)


@dataclass
class Graph:
    """A model's symbolic tensor graph for one phase (see module docstring)."""

    spec: ModelSpec
    options: GraphOptions
    sizes: dict[str, sp.Expr]
    embedding: Block
    layers: dict[str, Block]
    layer_kinds: list[str]
    head: Block
    bindings: dict[str, float]
    _compiled: dict[str, Any] = field(default_factory=dict, repr=False)

    # --- structure --------------------------------------------------------------------------
    def blocks(self) -> dict[str, Block]:
        """Every distinct block by name: ``embedding``, layer kinds, ``head``."""
        return {"embedding": self.embedding, **self.layers, "head": self.head}

    def counts(self) -> dict[str, int]:
        """How many times each block runs per step."""
        out = {"embedding": 1}
        for kind in self.layers:
            out[kind] = self.layer_kinds.count(kind)
        out["head"] = 1
        return out

    def execution(self) -> Iterator[tuple[int | None, Block, Op]]:
        """(layer index or None, block, op) in execution order for one micro-batch, then the
        optimizer step: forward through all layers, backward in reverse (each layer's recompute
        ops first), then optimizer ops of every block instance."""
        order = [(None, self.embedding)] + [(i, self.layers[k]) for i, k in enumerate(self.layer_kinds)]
        order.append((None, self.head))
        for idx, blk in order:
            for op in blk.forward:
                yield idx, blk, op
        for idx, blk in reversed(order):
            for op in (*blk.recompute, *blk.backward):
                yield idx, blk, op
        for idx, blk in order:
            for op in blk.optimizer:
                yield idx, blk, op

    def weights(self) -> list[tuple[str, Tensor]]:
        """Every weight tensor of the model with its qualified name (layers expanded)."""
        out = [(t.name, t) for t in self.embedding.weights]
        for i, kind in enumerate(self.layer_kinds):
            out += [(f"layers.{i}.{t.name}", t) for t in self.layers[kind].weights]
        out += [(t.name, t) for t in self.head.weights]
        return out

    def param_count(self) -> int:
        """Total weight elements (evaluated with the spec's sizes)."""
        total = sum(
            self.evaluate(blk.param_count) * n
            for blk, n in ((b, self.counts()[name]) for name, b in self.blocks().items())
        )
        return int(total)

    # --- evaluation -------------------------------------------------------------------------
    def _bind(self, bindings: Mapping[str, Any] | None) -> dict[str, Any]:
        vals = dict(self.bindings)
        for key, val in (bindings or {}).items():
            if key not in SYMBOLS:
                raise SpecError("bindings", f"unknown dimension {key!r}", FREE_SYMBOLS)
            vals[key] = val
        return vals

    def evaluate(self, expr: sp.Expr, bindings: Mapping[str, Any] | None = None) -> Any:
        """Exact value of one expression (sympy number; ints come back as Python ints)."""
        vals = self._bind(bindings)
        val = sp.sympify(expr).xreplace({SYMBOLS[k]: sp.nsimplify(v) for k, v in vals.items()})
        return int(val) if getattr(val, "is_Integer", False) else val

    def block_exprs(self, blk: Block) -> dict[str, sp.Expr]:
        """The closed-form expression of every metric of one block instance."""
        acc: dict[str, list[sp.Expr]] = {m: [] for m in METRICS}
        for op in blk.all_ops():
            acc[f"{op.category}_flops"].append(op.flops)
            acc[f"{op.category}_vector_flops"].append(op.vector_flops)
            acc[f"{op.category}_bytes"].append(op.bytes_read + op.bytes_written)
        out = {m: sp.Add(*v) for m, v in acc.items()}
        out["activation_bytes"] = blk.activation_bytes
        out["params"] = blk.param_count
        out["kv_cache_bytes_per_token"] = blk.kv_cache_bytes_per_token
        return out

    def _compile(self, name: str) -> Any:
        fn = self._compiled.get(name)
        if fn is None:
            exprs = self.block_exprs(self.blocks()[name])
            args = [SYMBOLS[s] for s in FREE_SYMBOLS]
            fn = sp.lambdify(args, [exprs[m] for m in METRICS], "numpy", cse=True)
            self._compiled[name] = fn
        return fn

    def costs(self, bindings: Mapping[str, Any] | None = None, exact: bool = False) -> CostReport:
        """Evaluate every metric per block and in total.

        ``bindings`` maps free symbols (at least ``b`` and ``s``; ``c`` in decode) to numbers or
        numpy arrays (broadcast together: one call evaluates many design points).
        """
        vals = self._bind(bindings)
        counts = self.counts()
        per_block: dict[str, dict[str, Any]] = {}
        if exact:
            for name, blk in self.blocks().items():
                exprs = self.block_exprs(blk)
                per_block[name] = {m: self.evaluate(e, bindings) for m, e in exprs.items()}
        else:
            args = [np.asarray(vals[s], dtype=np.float64) for s in FREE_SYMBOLS]
            shape = np.broadcast_shapes(*(a.shape for a in args))
            for name in self.blocks():
                res = self._compile(name)(*args)
                per_block[name] = {
                    m: np.broadcast_to(np.asarray(r, dtype=np.float64), shape) if shape else float(r)
                    for m, r in zip(METRICS, res, strict=True)
                }
        totals = {m: sum(per_block[n][m] * c for n, c in counts.items()) for m in METRICS}
        return CostReport(per_block, counts, totals, list(self.layer_kinds))

    def op_costs(self, block: str, bindings: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Per-op ``flops``, ``vector_flops``, ``bytes_read``, ``bytes_written`` of one block instance.

        Arrays follow ``blocks()[block].all_ops()`` order (shape ``(n_ops, *bindings shape)``);
        compiled once per block, so lowering can cost every op of a layer in one call.
        """
        key = f"ops:{block}"
        fn = self._compiled.get(key)
        ops = self.blocks()[block].all_ops()
        if fn is None:
            exprs = [getattr(op, q) for q in OP_QUANTITIES for op in ops]
            fn = sp.lambdify([SYMBOLS[s] for s in FREE_SYMBOLS], exprs, "numpy", cse=True)
            self._compiled[key] = fn
        vals = self._bind(bindings)
        args = [np.asarray(vals[s], dtype=np.float64) for s in FREE_SYMBOLS]
        shape = np.broadcast_shapes(*(a.shape for a in args))
        flat = [np.broadcast_to(np.asarray(r, dtype=np.float64), shape) for r in fn(*args)]
        n = len(ops)
        return {
            q: np.stack(flat[i * n : (i + 1) * n]) if n else np.zeros((0, *shape))
            for i, q in enumerate(OP_QUANTITIES)
        }

    def kv_cache_bytes_per_token(self) -> int:
        """KV-cache bytes per token per sequence, all layers (0 outside prefill/decode graphs)."""
        return int(sum(self.evaluate(self.layers[k].kv_cache_bytes_per_token) for k in self.layer_kinds))


# --- building ---------------------------------------------------------------------------------


def _layer_kind(spec: ModelSpec, i: int) -> str:
    base = "moe" if spec.is_moe_layer(i) else "dense"
    if spec.mla is not None:
        return f"mla_{base}"
    if spec.sliding_window and i in spec.sliding_window_layers:
        return f"{base}_swa"
    return base


def _unique(ts: list[Tensor]) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for t in ts:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _as_recompute(ops: list[Op]) -> list[Op]:
    return [
        Op(
            f"{op.name}.recompute",
            op.kind,
            "recompute",
            op.inputs,
            op.outputs,
            op.flops,
            op.vector_flops,
            op.bytes_read,
            op.bytes_written,
            op.einsum,
            (),
            dict(op.attrs),
        )
        for op in ops
    ]


#: Megatron-Core recompute_modules whose checkpoint discards the module's output too (its consumer's
#: saved copy is recomputed, "output-discarding checkpointing"); the others keep their output saved
OUTPUT_DISCARDING = ("moe_act", "layernorm", "mla_up_proj")
_MLA_UP = ("attn.q_b_proj", "attn.q_rope", "attn.k_rope", "attn.kv_b_proj_k", "attn.kv_b_proj_v", "attn.k_concat")


def recompute_module(op: Op) -> str | None:
    """The Megatron-Core ``recompute_modules`` entry an op of a layer belongs to (``None``: none).

    By op name, as the layer builders name them: ``core_attn`` the ops marked ``attn_core``;
    ``layernorm`` the two pre-norms (``input_layernorm``, ``pre_mlp_layernorm``); ``mla_up_proj``
    MLA's up-projections with their RoPE and key assembly; ``moe_act`` the experts' activation and
    GLU product; ``shared_experts`` ``moe.shared.*``; ``moe`` the rest of ``moe.*``; ``mlp`` the
    dense MLP (``mlp.*`` but its residual add)."""
    name = op.name
    if op.attrs.get("attn_core"):
        return "core_attn"
    if name in ("input_norm", "post_attention_norm"):
        return "layernorm"
    if name in _MLA_UP:
        return "mla_up_proj"
    if name in ("moe.experts.act", "moe.experts.gated", "moe.experts.prob_scale"):
        return "moe_act"
    if name.startswith("moe.shared."):
        return "shared_experts"
    if name.startswith("moe.") and name != "moe.shared_add":
        return "moe"
    if name.startswith("mlp.") and name != "mlp.residual":
        return "mlp"
    return None


def apply_recompute(forward: list[Op], inputs: list[Tensor], policy: str,
                    modules: tuple[str, ...] = ()) -> tuple[list[Tensor], list[Op]]:
    """Saved tensors and recompute ops of a layer under ``policy``.

    * ``none``: everything the forward ops save.
    * ``selective``: the ops of the chosen ``modules`` (:func:`recompute_module`; default
      ``core_attn``, Korthikanti et al. 2022 and Megatron-Core's default) keep only their inputs and
      are re-run before backward. ``moe`` also covers ``moe_act`` and ``shared_experts`` (they are
      part of the MoE layer). For the output-discarding modules (:data:`OUTPUT_DISCARDING`) the
      consumers' saved copies of their outputs are dropped too (Megatron's CheckpointWithoutOutput:
      the output is recomputed into the same storage before the consumer's backward); for the
      others the output stays saved where a consumer saves it.
    * ``full``: only the layer input is kept; the whole layer forward is re-run.
    """
    if policy == "full":
        return list(inputs), _as_recompute(forward)
    if policy == "none":
        return _unique([t for op in forward for t in op.saved]), []
    chosen = set(modules or ("core_attn",))
    if "moe" in chosen:
        chosen |= {"moe_act", "shared_experts"}
    module = {id(op): recompute_module(op) for op in forward}
    core = [op for op in forward if module[id(op)] in chosen]
    rest = [op for op in forward if module[id(op)] not in chosen]
    produced = {id(t) for op in core for t in op.outputs}
    discarded = {id(t) for op in core if module[id(op)] in OUTPUT_DISCARDING for t in op.outputs}
    core_inputs = [t for op in core for t in op.inputs if id(t) not in produced and t.requires_grad]
    saved = [t for op in rest for t in op.saved if id(t) not in discarded] + [
        t for op in core for t in op.saved if id(t) not in produced
    ]
    return _unique(saved + core_inputs), _as_recompute(core)


def _finish_block(
    bld: Builder,
    name: str,
    kind: str,
    inputs: list[Tensor],
    out: Tensor,
    options: GraphOptions,
    grad_dtype: str,
    recompute: str,
    modules: tuple[str, ...] = (),
) -> Block:
    fwd = list(bld.ops)
    if options.phase != "train":
        return Block(
            name, kind, fwd, [], [], list(bld.weights), [], inputs, list(bld.kv_cache), outputs=[out]
        )
    seed = bld.tensor(f"{out.name}.grad", out.dims, "fp32" if not out.dims else bld.act_dtype, "gradient")
    bwd, _ = backward(bld, fwd, {id(out): seed}, grad_dtype)
    saved, rec = apply_recompute(fwd, inputs, recompute, modules)
    return Block(
        name, kind, fwd, rec, bwd, list(bld.weights), saved, inputs, list(bld.kv_cache), outputs=[out]
    )


def build_graph(spec: ModelSpec, phase: str = "train", options: GraphOptions | None = None) -> Graph:
    """Build the symbolic graph of ``spec`` for ``phase`` (overrides ``options.phase``)."""
    opts = GraphOptions(**{**(options.__dict__ if options else {}), "phase": phase})
    opts.validate()
    prec = opts.precision_policy()
    sizes = base_dim_sizes(phase)
    causal_scale = sp.Rational(1, 2) if opts.attention_flops == "causal_half" else sp.Integer(1)
    cfg = LayerConfig(
        phase,
        opts.attention_impl,
        opts.causal,
        opts.dropout,
        opts.kv_dtype or prec.act_dtype,
        opts.norm_stats,
    )
    bindings = spec_bindings(spec, opts)

    def builder(prefix: str = "") -> Builder:
        return Builder(
            sizes,
            prec.act_dtype,
            prec.param_dtype,
            prec.compute_dtype,
            mask_dtype=opts.dropout_mask_dtype,
            causal_scale=causal_scale,
            prefix=prefix,
            megatron_kernels=opts.megatron_fusions,
            fused_gate_up=opts.megatron_fusions if opts.fused_gate_up is None else opts.fused_gate_up,
        )

    bld = builder()
    table, emb_out = embedding(bld, spec, cfg)
    emb_blk = _finish_block(bld, "embedding", "embedding", [], emb_out, opts, prec.grad_dtype, "none")

    kinds = [_layer_kind(spec, i) for i in range(spec.num_layers)]
    dropless = opts.capacity_factor is None and (spec.moe is None or spec.moe.capacity_factor is None)
    layers: dict[str, Block] = {}
    for kind in dict.fromkeys(kinds):
        bld = builder()
        x = bld.tensor("hidden_in", "b s h", requires_grad=True)
        kind_cfg = replace(cfg, window=kind.endswith("_swa"))
        y = transformer_layer(
            bld,
            x,
            spec,
            kind_cfg,
            "moe" in kind.split("_"),
            float(bindings["cf"]),
            opts.routing_skew,
            dropless,
        )
        layers[kind] = _finish_block(bld, kind, kind, [x], y, opts, prec.grad_dtype, opts.recompute,
                                     opts.recompute_modules)

    bld = builder()
    x = bld.tensor("hidden_final", "b s h", requires_grad=True)
    out = head(bld, x, spec, cfg, table if spec.tied_embeddings else None, opts.loss_dtype)
    head_blk = _finish_block(bld, "head", "head", [x], out, opts, prec.grad_dtype, "none")

    graph = Graph(spec, opts, sizes, emb_blk, layers, kinds, head_blk, bindings)
    if phase == "train":
        for blk in graph.blocks().values():
            blk.optimizer = optimizer_ops(blk.weights, opts, prec)
    return graph


def state_bytes_per_param(options: GraphOptions) -> dict[str, int]:
    """Bytes per parameter of model state under the options' precision and optimizer.

    ``grad_copy``: the fp32 copy of 16-bit gradients Megatron's mixed-precision optimizer steps on
    (:func:`~tensorstage.graph.optimizer.main_grad_copy_dtype`; sharded like the master weights).
    Megatron-LM's own table (``docs/user-guide/features/dist_optimizer.md``): fp16 parameters and
    gradients 20 bytes (4 + 16/d distributed), bf16 with fp32 gradients 18 (6 + 12/d), fp32 16."""
    prec = options.precision_policy()
    n_states = {"adamw": 2, "adam": 2, "sgd": 1 if options.sgd_momentum else 0}[options.optimizer]
    copy = main_grad_copy_dtype(options, prec)
    return {
        "param": dtype_bytes(prec.param_dtype),
        "grad": dtype_bytes(prec.grad_dtype),
        "master": dtype_bytes(prec.master_dtype) if prec.master_dtype else 0,
        "optimizer_states": n_states * dtype_bytes(prec.state_dtype),
        "grad_copy": dtype_bytes(copy) if copy else 0,
    }
