"""Block lowering: every block of the graph sharded for one rank, one micro-batch.

:func:`lower_blocks` turns ``Graph + ParallelPlan`` into one :class:`BlockLowering` per block
(embedding, each layer kind, head): node chains for forward, recompute and backward with the
model-parallel collectives inserted, the optimizer step of the TP/EP-local weights, and per-rank
memory facts. Costs come from the graph's own symbolic costs (:meth:`Graph.op_costs`, one
vectorized call per block over a handful of binding variants), never from a second cost model.

Per-rank bindings (b = ``plan.micro_batch``, s = ``plan.seq``, c = ``plan.kv_len``):

* **TP**: ``nh``, ``nkv``, ``f``, ``fe``, ``fs`` divided by ``tp``; ``v`` is Megatron's padded
  vocabulary divided by ``tp``. Weights without those dims (norms, router, MLA down-projections,
  learned positions) are replicated and have none of them, so one binding serves every op.
* **SP**: ops the placement propagation (:mod:`tensorstage.lower.propagate`) puts on a sequence
  shard run on ``s / (cp * tp)``; column-/row-parallel matmuls and attention on ``s / cp``.
* **CP**: every op runs on ``s / cp`` local tokens, except the attention core (ops marked
  ``attn_core`` and their gradients), which attends the local queries to *all* keys: with
  Megatron's causal load balancing (2*cp chunks, rank i holds chunks i and 2cp-1-i) each rank does
  exactly 1/cp of the full causal work, so the core is costed as the unsharded op / cp. **Bytes
  convention**: the core's bytes are also the unsharded op's / cp — local Q, output, scores and
  the *local* K/V chunk; K/V arriving from other ranks are counted as communication only.
  Decode: the cache of ``c`` tokens is split, ``c -> c / cp``; the partial outputs and fp32
  log-sum-exp are all-gathered over ``cp`` after the core (flash-decoding style combine).
* **EP**: ops touching routed tokens (dim ``t``) or expert weights use ``e -> e / ep``. Since
  ``t = cf*b*s*k/e``, ``e*t`` stays the rank's tokens x k: the local ``e/ep`` experts each receive
  ``ep*t`` rows from the whole EP group. With dropless routing and ``ep > 1`` the expert compute,
  routed activations and TP gathers of routed rows are scaled by ``routing_skew`` (the busiest
  rank, which every rank of a symmetric Program waits for); ``model_flops`` use the mean.

Collectives (ASTRA-sim ``comm_bytes``): TP/SP ones come from placement changes priced by
:func:`~tensorstage.parallel.placement.redistribute` — Megatron's f/g all-reduces, SP's
all-gather before column-parallel and reduce-scatter after row-parallel, and (``sp_regather``,
default, Megatron) one more backward all-gather of each column-parallel input for its weight
gradient, which DTensor avoids by saving the gathered input (``sp_regather=False``).
Vocab-parallel embedding: all-reduce (reduce-scatter with SP) of the Partial lookup; vocab-parallel
cross-entropy: three fp32 all-reduces of b*s values (:func:`vocab_parallel_cross_entropy`); the LM
head's input gradient is all-reduced (reduce-scattered with SP). MoE: with TP an all-gather of
the received rows over ``tp`` (SP) before the expert-TP matmuls and a reduce-scatter after them
(placement changes of the routed tensors); without SP (Megatron requires SP for MoE+TP) the
tokens are replicated over TP and the expert outputs / input grads are all-reduced instead.

Emission that follows one external protocol lives in its own module, called from :meth:`BlockLowerer._pass`
at fixed points around each op (the order of the calls there is the order of the nodes):

* :mod:`tensorstage.lower.context_parallel` — CP ``ring`` / ``allgather`` K/V exchange around the
  attention core and the decode CP combine;
* :mod:`tensorstage.lower.expert_parallel` — MoE counts / dispatch / combine all-to-alls over ``ep``;
* :mod:`tensorstage.lower.embedding_sp` — Megatron's learned-position embedding under SP;
* :mod:`tensorstage.lower.op_roles` — the op/tensor predicates (attention core, K/V, experts) the
  three share with the costing here.

Dependencies (:mod:`tensorstage.lower.chain`): by default each node waits for the one before it
(TP collectives block the stream, as measured Megatron layer times behave);
``overlap_tp_comm=True`` gives data-flow dependencies instead, which let Megatron's asynchronous
backward collectives (input-gradient all-reduce / reduce-scatter during the weight-gradient GEMM,
SP re-gather during the input-gradient GEMM) overlap. The CP ring always overlaps. Saved bytes
follow Megatron (the SP shard of a column-parallel input, not DTensor's gathered copy) for either
``sp_regather`` value. Tokens per rank: decode has no sequence to split, so SP is off in decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil, prod

import numpy as np
import sympy as sp

from tensorstage.graph.dims import FREE_SYMBOLS, SYMBOLS, dtype_bytes
from tensorstage.graph.graph import Graph
from tensorstage.graph.ir import Block, Op, Tensor
from tensorstage.lower.chain import NodeList
from tensorstage.lower.context_parallel import ContextParallelEmitter
from tensorstage.lower.embedding_sp import LearnedPositionSP
from tensorstage.lower.expert_parallel import ExpertParallelEmitter
from tensorstage.lower.megatron_fusion import fuse_megatron_block
from tensorstage.lower.op_roles import (
    expert_side,
    final_grad,
    gemm_dims,
    is_core,
    is_expert_gemm,
    is_expert_weight,
    reads_kv,
    to_int,
    uses_experts,
)
from tensorstage.lower.propagate import Change, Placed, Propagator, is_head, is_seq, seq_dim
from tensorstage.lower.recompute_memory import EXTRA_KEY as RECOMPUTE_BYTES_KEY
from tensorstage.lower.recompute_memory import recomputed_saved
from tensorstage.lower.steps import BlockLowering, LocalWeight, StepNode
from tensorstage.parallel.apply import vocab_parallel_cross_entropy
from tensorstage.parallel.placement import (
    REPLICATE,
    Collective,
    Partial,
    Placement,
    Shard,
    TensorLayout,
    redistribute,
)
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import NodeKind
from tensorstage.sim.compute import GROUPED_OP

#: dims tensor parallelism divides in the per-rank bindings (``v`` is handled with vocab padding)
TP_SYMBOLS = ("nh", "nkv", "f", "fe", "fs")
#: graph op kind -> ``op`` label of a COMP node, in the simulator's vocabulary
#: (:data:`tensorstage.sim.compute.VECTOR_OPS` run at vector peak; matmul and attention at tensor peak)
_KIND_LABEL = {
    "einsum": "matmul",
    "attention": "attention",
    "norm": "norm",
    "softmax": "softmax",
    "cross_entropy": "cross_entropy",
    "gather": "gather",
    "scatter_add": "gather",
    "add": "elementwise",
    "mul": "elementwise",
    "unary": "elementwise",
    "glu": "elementwise",
    "rope": "elementwise",
    "dropout": "elementwise",
    "layout": "elementwise",
    "reduce": "elementwise",
    "scatter": "elementwise",
    "kv_write": "elementwise",
    "topk": "topk",
    "dispatch": "dispatch",
    "combine": "combine",
    "permute": "gather",
}


def op_label(kind: str) -> str:
    """The ``op`` label of a COMP node for graph op kind ``kind`` (what the compute model is asked)."""
    return _KIND_LABEL.get(kind, "elementwise")


def lower_blocks(
    graph: Graph, plan: ParallelPlan, sp_regather: bool = True, overlap_tp_comm: bool = False
) -> dict[str, BlockLowering]:
    """Shard every block of ``graph`` under ``plan`` for one rank and one micro-batch.

    ``sp_regather``: Megatron's SP linear layers all-gather their input again in backward for the
    weight gradient (True, default); DTensor saves the gathered input instead (False).
    ``overlap_tp_comm``: dependencies let model-parallel collectives overlap independent compute as
    Megatron's async handles allow (see :mod:`tensorstage.lower.chain`); default False: they block
    the stream. The CP ring always overlaps its transfers with the attention chunks.
    ``graph.options.megatron_fusions`` merges Megatron's fused element-wise kernels
    (:mod:`tensorstage.lower.megatron_fusion`).
    """
    ctx = _Context.make(graph, plan, sp_regather, overlap_tp_comm)
    out = {name: BlockLowerer(ctx, name, blk).lower() for name, blk in graph.blocks().items()}
    if graph.options.megatron_fusions:
        out = {name: fuse_megatron_block(b) for name, b in out.items()}
    return out


# --- per-graph context ---------------------------------------------------------------------------------
@dataclass
class _Context:
    graph: Graph
    plan: ParallelPlan
    sp_regather: bool
    overlap: bool
    tp: int
    cp: int
    ep: int
    sp: bool
    phase: str
    act_bytes: int
    load_factor: float  # busiest-rank expert load / mean (dropless routing with ep > 1)
    dropless: bool
    global_sizes: dict[str, float]  # dim sizes over the TP group (not TP-divided), local to CP (s/cp)
    full_s_sizes: dict[str, float]  # same with the full sequence (attention-core tensors)
    _size_fn: object = field(repr=False, default=None)

    @staticmethod
    def make(graph: Graph, plan: ParallelPlan, sp_regather: bool, overlap: bool = False) -> _Context:
        tp, cp = plan.tp, plan.cp
        phase = graph.options.phase
        spec = graph.spec
        sp_on = plan.sp and tp > 1 and phase != "decode"  # one new token cannot be sequence-split
        moe = spec.moe
        dropless = graph.options.capacity_factor is None and (moe is None or moe.capacity_factor is None)
        lf = graph.options.routing_skew if (dropless and plan.ep > 1) else 1.0
        names = list(graph.sizes)
        size_fn = sp.lambdify([SYMBOLS[s] for s in FREE_SYMBOLS], [graph.sizes[n] for n in names], "numpy")
        ctx = _Context(
            graph,
            plan,
            sp_regather,
            overlap,
            tp,
            cp,
            plan.ep,
            sp_on,
            phase,
            dtype_bytes(graph.options.precision_policy().act_dtype),
            float(lf),
            dropless,
            {},
            {},
            size_fn,
        )
        base = ctx.base_bindings()
        ctx.global_sizes = ctx._sizes(names, {**base, "s": plan.seq / cp})
        ctx.full_s_sizes = ctx._sizes(names, {**base, "s": plan.seq})
        return ctx

    def _sizes(self, names: list[str], vals: dict[str, float]) -> dict[str, float]:
        res = self._size_fn(*[vals[s] for s in FREE_SYMBOLS])  # type: ignore[misc]
        return {n: float(np.asarray(r)) for n, r in zip(names, res, strict=True)}

    def base_bindings(self) -> dict[str, float]:
        """Spec bindings with the run's b, s, c and the padded vocabulary (nothing divided)."""
        vals = dict(self.graph.bindings)
        vals["b"] = self.plan.micro_batch
        vals["s"] = self.plan.seq
        vals["c"] = self.plan.kv_len / self.cp
        vals["v"] = self.plan.padded_vocab(self.graph.spec.vocab)
        return vals

    def local_bindings(self) -> dict[str, float]:
        """Base bindings with the TP dims divided (what one rank computes on)."""
        vals = self.base_bindings()
        for name in TP_SYMBOLS:
            if name == "fe" and self.plan.folded:
                continue  # MoE parallel folding: experts are whole (expert TP 1)
            vals[name] = vals[name] / self.tp
        vals["v"] = vals["v"] / self.tp
        return vals


def fp8_saved_inputs(blk: Block) -> dict[int, int]:
    """Saved activations a linear layer keeps in FP8 under FP8 training: ``{id(tensor): 1}`` when only
    linear layers save it (its FP8 copy alone), ``{id(tensor): 2}`` when another op saves it too
    (the 16-bit tensor plus the FP8 copy).

    Why: Transformer Engine's ``Linear`` / ``LayerNormLinear`` / ``GroupedLinear`` save the quantized
    input they multiplied for the weight gradient, one byte per element, unless
    ``save_original_input`` is set (default False; TE docs, "FP8 memory usage" and
    ``transformer_engine/pytorch/module/linear.py``). A linear is an einsum with a weight operand;
    materialized attention products (no weight) keep their 16-bit inputs.
    """
    savers: dict[int, list[bool]] = {}
    for op in blk.forward:
        linear = op.kind == "einsum" and any(t.role == "weight" for t in op.inputs)
        for t in op.saved:
            if t.role == "weight":
                continue
            seen = savers.setdefault(id(t), [False, False])
            seen[0 if linear and t in op.inputs else 1] = True
    return {k: (1 if not other else 2) for k, (lin, other) in savers.items() if lin}


# --- per-block lowering --------------------------------------------------------------------------------
class BlockLowerer:
    """Lowers one block: placements, per-op variant choice, node emission, memory facts."""

    def __init__(self, ctx: _Context, name: str, blk: Block) -> None:
        self.ctx = ctx
        self.name = name
        self.blk = blk
        self.prop = Propagator(ctx.sp, moe_tp_on_tokens=ctx.ep == 1, folded=ctx.plan.folded)
        c = ctx
        self.s_divs = sorted({1, c.cp, c.cp * c.tp})
        self.e_divs = sorted({1, c.ep})
        self.variants = [(sd, ed) for sd in self.s_divs for ed in self.e_divs]
        self.ops = blk.all_ops()
        self.index = {id(op): i for i, op in enumerate(self.ops)}
        self.costs = self._op_costs()
        self._sizes_cache: dict[tuple[int, int], dict[str, float]] = {}
        self.model_flops = 0.0
        self.cp_emit = ContextParallelEmitter(self)
        self.ep_emit = ExpertParallelEmitter(self)
        self.embedding_sp = LearnedPositionSP(self)
        # the LM head (Megatron's output_layer, not a TE module) and the embedding stay 16-bit
        fp8 = ctx.graph.options.precision == "fp8" and blk.kind not in ("embedding", "head")
        self.fp8_saved = fp8_saved_inputs(blk) if fp8 else {}

    # --- costs -----------------------------------------------------------------------------------
    def _op_costs(self) -> dict[str, np.ndarray]:
        vals = self.ctx.local_bindings()
        sds = np.array([v[0] for v in self.variants], dtype=np.float64)
        eds = np.array([v[1] for v in self.variants], dtype=np.float64)
        vals["s"] = self.ctx.plan.seq / sds
        vals["e"] = vals["e"] / eds
        return self.ctx.graph.op_costs(self.name, vals)

    def _cost(self, op: Op, seq_sharded: bool) -> tuple[float, float, float, float]:
        """(matrix flops, vector flops, bytes, load factor) of ``op`` on this rank."""
        c = self.ctx
        scale = 1.0
        if is_core(op) and c.phase != "decode":
            sd = 1
            scale = 1.0 / c.cp
        else:
            sd = c.cp * c.tp if seq_sharded else c.cp
        ed = c.ep if uses_experts(op) else 1
        j = self.variants.index((sd, ed))
        i = self.index[id(op)]
        co = self.costs
        lf = c.load_factor if expert_side(op) else 1.0
        nbytes = co["bytes_read"][i, j] + co["bytes_written"][i, j]
        return co["flops"][i, j] * scale, co["vector_flops"][i, j] * scale, nbytes * scale, lf

    # --- sizes -----------------------------------------------------------------------------------
    def shape(self, t: Tensor) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Shape of ``t`` over the TP group (local to CP/EP), routed ``e t`` merged into ``t``."""
        c = self.ctx
        sizes = c.full_s_sizes if ("s" in t.dims and "sk" in t.dims) else c.global_sizes
        dims = list(t.dims)
        vals = [sizes[d] for d in dims]
        if "e" in dims and "t" in dims:
            ie, it = dims.index("e"), dims.index("t")
            vals[it] = vals[it] * vals[ie] * c.load_factor
            del dims[ie], vals[ie]
        if "s" in t.dims and "sk" in t.dims and c.phase != "decode":
            i = dims.index("s")
            vals[i] = vals[i] / c.cp
        return tuple(to_int(v) for v in vals), tuple(dims)

    def local_bytes(self, t: Tensor, p: Placement) -> int:
        shape, dims = self.shape(t)
        shape_l = list(shape)
        if isinstance(p, Shard) and p.dim in dims:
            i = dims.index(p.dim)
            shape_l[i] = ceil(shape_l[i] / self.ctx.tp)
        return prod(shape_l) * dtype_bytes(t.dtype)

    def _collectives(self, ch: Change) -> list[Collective]:
        shape, dims = self.shape(ch.tensor)
        pl = () if ch.src == REPLICATE else (("tp", ch.src),)
        layout = TensorLayout(shape, dtype_bytes(ch.tensor.dtype), pl, (("tp", self.ctx.tp),), dims)
        dst = {} if ch.dst == REPLICATE else {"tp": ch.dst}
        return redistribute(layout, dst)

    # --- nodes -----------------------------------------------------------------------------------
    def _variant_sizes(self, sd: int, ed: int) -> dict[str, float]:
        """Every dim's per-rank size in binding variant ``(sd, ed)`` (TP dims divided, s / sd, e / ed)."""
        key = (sd, ed)
        cache = self._sizes_cache
        if key not in cache:
            vals = self.ctx.local_bindings()
            vals["s"] = self.ctx.plan.seq / sd
            vals["e"] = vals["e"] / ed
            cache[key] = self.ctx._sizes(list(self.ctx.graph.sizes), vals)
        return cache[key]

    def _gemm(self, op: Op, seq_sharded: bool) -> tuple[int, int, int, int] | None:
        """``(batch, m, n, k)`` of a two-operand einsum on this rank: batch dims are in both inputs and
        the output, m in the first input and the output, n in the second and the output, k in both
        inputs only (the contraction). ``None`` for other ops. Sizes are the same per-rank binding
        variant the op's cost uses; the CP attention core keeps its local queries (``s / cp``)."""
        if op.kind == "attention":
            return self._attention_gemm(op)
        dims = gemm_dims(op)
        if dims is None:
            return None
        c = self.ctx
        core = is_core(op) and c.phase != "decode"
        sd = 1 if core else (c.cp * c.tp if seq_sharded else c.cp)
        ed = c.ep if uses_experts(op) else 1
        sizes = self._variant_sizes(sd, ed)

        def size(dims: set[str]) -> int:
            v = 1.0
            for d in dims:
                v *= sizes[d] / (c.cp if core and d == "s" else 1)
            return max(1, to_int(v))

        b, m, n, k = dims
        return (size(b), size(m), size(n), size(k))

    def _attention_gemm(self, op: Op) -> tuple[int, int, int, int] | None:
        """A fused attention core's QK^T shape ``(batch*query heads, q_len, kv_len, head_dim)`` on this
        rank (the measured attention tables key on it, :mod:`tensorstage.sim.kernels`): the forward reads
        ``(q, k, v, ...)``, its gradient ``(dO, q, k, v, ...)``; local queries ``s / cp`` as in
        :meth:`_gemm`, heads over TP."""
        ins = op.inputs[1:] if op.grad_of is not None else op.inputs
        if len(ins) < 2 or len(ins[0].dims) < 3 or len(ins[1].dims) < 2:
            return None
        q, k = ins[0], ins[1]
        c = self.ctx
        sizes = self._variant_sizes(1, 1)
        cp = c.cp if c.phase != "decode" else 1

        def size(dims: tuple[str, ...]) -> int:
            v = 1.0
            for d in dims:
                v *= sizes[d] / (cp if d == "s" else 1)
            return max(1, to_int(v))

        return (size((q.dims[0], *q.dims[2:-1])), size((q.dims[1],)), size((k.dims[1],)), size((q.dims[-1],)))

    def comp(self, op: Op, placed: Placed, category: str, parts: int = 1) -> StepNode:
        mf, vf, nb, lf = self._cost(op, placed.seq_sharded)
        if category in ("fwd", "bwd_input", "bwd_weight"):
            self.model_flops += mf
        # materialized QK^T / PV are plain batched matmuls; an MoE expert GEMM is grouped
        label = GROUPED_OP if is_expert_gemm(op) else op_label(op.kind)
        return StepNode(
            op.name,
            NodeKind.COMP,
            category,
            label,
            flops=to_int((mf + vf) * lf / parts),
            tensor_bytes=to_int(nb * lf / parts),
            gemm=self._gemm(op, placed.seq_sharded) if parts == 1 else self._chunk_gemm(op, parts),
        )

    def _chunk_gemm(self, op: Op, parts: int) -> tuple[int, int, int, int] | None:
        """One of ``parts`` CP ring chunks of an attention core: the local queries against ``1/parts``
        of the keys (other ops split into parts carry no shape)."""
        g = self._attention_gemm(op) if op.kind == "attention" else None
        return None if g is None else (g[0], g[1], max(1, g[2] // parts), g[3])

    def coll(self, name: str, coll: Collective, category: str,
             route: tuple[int, int, int] | None = None) -> StepNode:
        return StepNode(
            f"{name}:{coll.kind.name.lower()}",
            NodeKind.COLL,
            category,
            "comm",
            comm=coll.kind,
            comm_bytes=coll.comm_bytes,
            axes=coll.axes,
            route=route,
        )

    def changes(self, nl: NodeList, changes: list[Change], category: str) -> None:
        for ch in changes:
            for coll in self._collectives(ch):
                nl.comm(self.coll(ch.tensor.name, coll, category), ch.tensor)

    def _pass(self, ops: list[Op], backward: bool) -> NodeList:
        c = self.ctx
        nl = NodeList(overlap=c.overlap, pipelined=c.overlap and c.sp and c.plan.tp_comm_overlap, tp=c.tp)
        # core ops that read the keys/values (not e.g. an attention-sink weight gradient)
        core_ops = [
            op
            for op in ops
            if is_core(op)
            and any(reads_kv(t) for t in op.inputs)
            and not any(t.role == "weight_grad" for t in op.outputs)
        ]
        first_core = core_ops[0] if core_ops else None
        last_core = core_ops[-1] if core_ops else None
        decode_last_kv = None
        if c.phase == "decode":
            readers = [op for op in ops if any(d in t.dims for t in op.inputs for d in ("sk", "skw"))]
            decode_last_kv = readers[-1] if readers else None
        split_core = len(core_ops) == 1 and core_ops[0].kind == "attention"  # one fused kernel
        ringed = c.plan.cp_mode == "ring" and split_core
        for op in ops:
            if backward:
                self.embedding_sp.grad_gather(nl, op)
                self._prefetch_regather(nl, op)
            placed = self.prop.run(op)
            cat = op.category
            self.changes(nl, placed.changes, cat)
            self.ep_emit.before(nl, op, cat, backward)
            ce = op.kind == "cross_entropy" and op.category == "fwd" and c.tp > 1
            ce_colls = vocab_parallel_cross_entropy(self.tokens(), c.tp) if ce else []
            if ce_colls:
                nl.comm(self.coll(f"{op.name}.max", ce_colls[0], cat), op.inputs[0])
            cp_core = c.cp > 1 and c.phase != "decode" and op is first_core
            if cp_core and ringed:
                self.cp_emit.ring(nl, op, placed, cat, backward)
            else:
                if cp_core:
                    self.cp_emit.before(nl, op, cat, backward)
                nl.comp(self.comp(op, placed, cat), op)
            if c.cp > 1 and c.phase != "decode" and op is last_core and not ringed:
                self.cp_emit.after(nl, op, cat, backward)
            for i, coll in enumerate(ce_colls[1:]):
                nl.comm(self.coll(f"{op.name}.sum{i}", coll, cat), op.outputs[0])
            self.ep_emit.after(nl, op, cat)
            if op is decode_last_kv and c.cp > 1:
                self.cp_emit.decode_combine(nl, op, placed, cat)
            if not backward:
                self.embedding_sp.reduce(nl, op, cat)
        return nl

    def _prefetch_regather(self, nl: NodeList, op: Op) -> None:
        """Megatron issues the SP re-gather of a column-parallel input before that layer's
        input-gradient GEMM (it overlaps it); the weight-gradient GEMM then waits for it."""
        lin = op.grad_of
        if not (self.ctx.sp and self.ctx.sp_regather and lin is not None and op.category == "bwd_input"):
            return
        if lin.kind != "einsum" or not any(t.role == "weight" for t in lin.inputs):
            return
        x = lin.inputs[0]
        w = lin.inputs[1]
        if x.role == "weight" or not is_head(self.prop.get(w)) or not is_seq(self.prop.get(x)):
            return
        changes: list[Change] = []
        self.prop.need(x, REPLICATE, changes)
        self.changes(nl, changes, "bwd_weight")

    def tokens(self) -> int:
        """Tokens of one micro-batch on this rank's CP shard (full TP group)."""
        c = self.ctx
        s = 1 if c.phase == "decode" else c.plan.seq // c.cp
        return c.plan.micro_batch * s

    # --- the block -------------------------------------------------------------------------------
    def lower(self) -> BlockLowering:
        c = self.ctx
        blk = self.blk
        prop = self.prop
        for x in blk.inputs:
            prop.set(x, prop.home(x))
        fwd = self._pass(blk.forward, backward=False)
        outputs_home = []
        for o in blk.outputs:
            target = prop.home(o) if seq_dim(o) is not None and not is_head(prop.get(o)) else prop.get(o)
            changes: list[Change] = []
            prop.need(o, target, changes)
            self.changes(fwd, changes, "fwd")
            outputs_home.append((o, target))
        recompute: list[StepNode] = []
        if blk.recompute:
            prop.forget(t for op in blk.recompute for t in op.outputs)
            saved_model = self.model_flops
            recompute = self._pass(blk.recompute, backward=False).nodes
            self.model_flops = saved_model
        prop.backward_view(c.sp_regather)
        bwd = self._pass(blk.backward, backward=True)
        for x in blk.inputs:
            g = final_grad(blk, x)
            if g is not None:
                changes = []
                prop.need(g, prop.home(x), changes)
                self.changes(bwd, changes, "bwd_input")
        forward, backward = _tail_last(fwd), _tail_last(bwd)
        weights = [self._local_weight(w) for w in blk.weights]
        optimizer = [self._optimizer_node(op) for op in blk.optimizer]
        saved = sum(self._saved_bytes(t) for t in blk.saved if t.role != "weight")
        out_bytes = sum(self.local_bytes(o, p) for o, p in outputs_home)
        extra: dict[str, object] = {
            "tp_partial_grad_bytes": self._partial_grad_bytes(),
            RECOMPUTE_BYTES_KEY: sum(self._saved_bytes(t) for t in recomputed_saved(blk)),
            "sp": c.sp,
            "sp_regather": c.sp_regather,
        }
        return BlockLowering(
            block=self.name,
            forward=forward,
            recompute=recompute,
            backward=backward,
            optimizer=optimizer,
            weights=weights,
            saved_bytes=saved,
            output_bytes=out_bytes,
            model_flops=to_int(self.model_flops),
            kv_cache_bytes=self._kv_cache_bytes(),
            extra=extra,
        )

    def _saved_bytes(self, t: Tensor) -> int:
        full = self.local_bytes(t, self.prop.get(t))
        copies = self.fp8_saved.get(id(t))
        if copies is None:
            return full
        elems = full // dtype_bytes(t.dtype)
        return elems if copies == 1 else full + elems  # the FP8 copy alone, or beside the 16-bit one

    def _local_weight(self, w: Tensor) -> LocalWeight:
        p = self.prop.get(w)
        expert = is_expert_weight(w)
        n = 1
        for d in w.dims:
            v = to_int(self.ctx.global_sizes[d])
            if isinstance(p, Shard) and p.dim == d:
                v = ceil(v / self.ctx.tp)
            if expert and d == "e":
                v = ceil(v / self.ctx.ep)
            n *= v
        return LocalWeight(w.name, w.dims, n, expert)

    def _optimizer_node(self, op: Op) -> StepNode:
        wname = op.attrs.get("weight")
        w = next((t for t in self.blk.weights if t.name == wname), None)
        ed = self.ctx.ep if (w is not None and is_expert_weight(w)) else 1
        j = self.variants.index((self.ctx.cp, ed))
        i = self.index[id(op)]
        co = self.costs
        flops = co["flops"][i, j] + co["vector_flops"][i, j]
        nbytes = co["bytes_read"][i, j] + co["bytes_written"][i, j]
        return StepNode(
            op.name, NodeKind.COMP, "optimizer", "optimizer", flops=to_int(flops), tensor_bytes=to_int(nbytes)
        )

    def _partial_grad_bytes(self) -> int:
        """Weight-gradient bytes left Partial over TP (SP norm weights, router, row biases):
        Megatron all-reduces them over TP once per step (``finalize_model_grads``)."""
        total = 0
        for w in self.blk.weights:
            g = final_grad(self.blk, w)
            if g is not None and isinstance(self.prop.get(g), Partial) and self.ctx.tp > 1:
                total += self.local_bytes(g, REPLICATE)
        return total

    def _kv_cache_bytes(self) -> int:
        c = self.ctx
        if c.phase == "train" or not self.blk.kv_cache:
            return 0
        per_token = 0
        for t in self.blk.kv_cache:
            head = next((d for d in ("nkv", "nh") if d in t.dims), None)
            per_token += self.local_bytes(t, Shard(head) if head else REPLICATE)
        b = c.plan.micro_batch
        if c.phase == "prefill":
            return b * (c.plan.seq // c.cp) * per_token
        tokens = c.plan.kv_len
        if self.name.endswith("_swa") and c.graph.spec.sliding_window:
            tokens = min(tokens, c.graph.spec.sliding_window)
        return b * ceil(tokens / c.cp) * per_token


def _tail_last(nl: NodeList) -> list[StepNode]:
    """The pass's nodes, ending with a node that depends on everything still unawaited.

    The assembly treats a list's last node as its exit; an asynchronous collective that nothing
    in the list consumes (the last backward all-reduce overlapping a weight-gradient GEMM, a CP
    SEND) must still finish before the block counts as done, so a zero-cost join node is added
    when the last node does not already cover every other node.
    """
    nodes = nl.nodes
    if not nodes:
        return nodes
    covered = [False] * len(nodes)
    covered[-1] = True
    for i in range(len(nodes) - 1, -1, -1):
        if covered[i]:
            for d in nodes[i].deps or ():
                covered[d] = True
    loose = [i for i, ok in enumerate(covered) if not ok and nodes[i].kind != NodeKind.SEND]
    if not loose:
        return nodes
    last = nodes[-1]
    join = StepNode(f"{last.name}.join", NodeKind.COMP, last.category, "elementwise")
    nl.add(join, [len(nodes) - 1, *loose])
    return nl.nodes


__all__ = ["lower_blocks"]
