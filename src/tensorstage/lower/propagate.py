"""Tensor-parallel placement propagation over a block's op lists (Megatron-LM rules).

Why a propagation pass instead of a table of "collective after op X": every block builder (dense,
GQA, MLA, MoE, embedding, head) gets its TP / sequence-parallel collectives from the same few rules,
and the collectives are exactly the placement changes :func:`~tensorstage.parallel.placement.redistribute`
prices. Only the ``"tp"`` mesh axis is propagated here; context and expert parallelism are handled
by the block lowering (ring / all-gather of K/V, EP all-to-all), which knows their structure.

Rules (one placement per tensor on the TP axis):

* weights: :func:`~tensorstage.parallel.apply.tp_column` / ``tp_row`` (Shard of the first TP dim,
  else Replicate; vocabulary tables Shard("v"));
* residual stream ("home"): Replicate, or Shard of the sequence dim with sequence parallelism;
* einsum: DTensor's matmul rule (:func:`~tensorstage.parallel.placement.contract`); when the
  operands do not combine (a sequence shard meeting a head-sharded weight), sequence-sharded or
  Partial operands are redistributed to Replicate first (SP all-gather before column-parallel);
* other ops: a head-sharded input (``nkv``/``nh``/``f``/``fe``/``fs``/``v``) puts the op in the head
  region: inputs lacking the head dim must be Replicate; else a sequence-sharded input puts it in the
  sequence-parallel region (each tensor sharded on its own sequence dim: ``s``, ``sk`` or the routed
  token dim ``t``); else a Partial input is reduced to home (all-reduce, or reduce-scatter with SP),
  except an ``add`` of Partials only, which stays Partial (gradient accumulation), and an op marked
  ``on_partial_sum`` (the parallel block's branch dropout, whose mask the TP group shares);
* outputs lacking the sharded dim of a reduction (norm weight grads, bias grads) come out Partial.

``avail`` records placements a tensor already has (a tensor gathered once for Q is reused by K
and V, as Megatron's fused QKV; a Partial reduced once is reused). Backward starts from the forward's
``avail`` minus the SP all-gathers when ``sp_regather`` (Megatron saves only the sequence shard
and all-gathers it again for the weight gradient; DTensor keeps the gathered input).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tensorstage.errors import SpecError
from tensorstage.graph.ir import Op, Tensor
from tensorstage.lower.op_roles import is_expert_weight
from tensorstage.parallel.apply import TP_DIMS, tp_column, vocab_parallel_embedding
from tensorstage.parallel.placement import REPLICATE, Partial, Placement, Shard, contract

SEQ_DIMS = ("s", "sk", "skw", "t")
HEAD_DIMS = TP_DIMS
#: op kinds that sum over their inputs' leading dims (a sharded summed dim makes the output Partial)
REDUCE_KINDS = ("reduce", "scatter_add")


def seq_dim(t: Tensor) -> str | None:
    """The sequence-like dim of ``t`` (query tokens, keys, or routed tokens), if any."""
    return next((d for d in SEQ_DIMS if d in t.dims), None)


def is_seq(p: Placement) -> bool:
    return isinstance(p, Shard) and p.dim in SEQ_DIMS


def is_head(p: Placement) -> bool:
    return isinstance(p, Shard) and p.dim in HEAD_DIMS


def key(p: Placement) -> str:
    return str(p)


def weight_placement(w: Tensor) -> Placement:
    """TP placement of a weight: vocabulary tables and column/row weights Shard their TP dim."""
    if "v" in w.dims:
        return vocab_parallel_embedding(w.dims)["tp"]
    return tp_column(w.dims).get("tp", REPLICATE)


@dataclass
class Change:
    """One placement change of ``tensor`` the next op needs (``src`` -> ``dst``)."""

    tensor: Tensor
    src: Placement
    dst: Placement


@dataclass
class Placed:
    """An op with the TP changes it needs before running and where its inputs/outputs end up."""

    op: Op
    changes: list[Change]
    inputs: list[Placement]
    outputs: list[Placement]

    @property
    def seq_sharded(self) -> bool:
        """True when the op runs on a sequence shard (sequence-parallel region)."""
        return any(is_seq(p) for p in (*self.inputs, *self.outputs))


@dataclass
class Propagator:
    """Placement state of one block across its forward, recompute and backward passes."""

    sp: bool
    #: MoE without expert parallelism: TP communication of the MoE layer on whole tokens (``b*s*h``),
    #: not on the ``top_k`` times larger routed slots: gather the tokens before routing (SP; Megatron's
    #: all-gather token dispatcher) and reduce after the combine (vLLM's and TensorRT-LLM's fused MoE).
    #: With expert parallelism the slot-level protocol of Megatron's all-to-all dispatcher stays.
    moe_tp_on_tokens: bool = False
    #: Megatron's MoE parallel folding (expert TP 1 under TP > 1): the TP ranks are part of the EP
    #: group, so every rank holds whole experts of its own; expert weights and their gradients are
    #: local on the ``tp`` axis (Replicate: no TP split, no TP reduction), routed tokens stay on the
    #: rank's sequence shard (the all-to-all over EP, emitted by the lowering, moves them)
    folded: bool = False
    place: dict[int, Placement] = field(default_factory=dict)
    avail: dict[int, set[str]] = field(default_factory=dict)
    tensors: dict[int, Tensor] = field(default_factory=dict)

    # --- placements ---------------------------------------------------------------------------
    def home(self, t: Tensor) -> Placement:
        """Placement of the residual stream for ``t``'s shape: Shard(seq) with SP, else Replicate."""
        d = seq_dim(t)
        return Shard(d) if self.sp and d is not None else REPLICATE

    def get(self, t: Tensor) -> Placement:
        p = self.place.get(id(t))
        if p is None:
            p = self._default(t)
            self.set(t, p)
        return p

    def set(self, t: Tensor, p: Placement) -> None:
        self.place[id(t)] = p
        self.avail[id(t)] = {key(p)}
        self.tensors[id(t)] = t

    def _default(self, t: Tensor) -> Placement:
        if self.folded and is_expert_weight(t):
            return REPLICATE
        if t.role in ("weight", "weight_grad"):
            return weight_placement(t)
        head = next((d for d in HEAD_DIMS if d in t.dims), None)
        if head is not None:
            return Shard(head)
        if t.role in ("input", "index", "mask"):
            return REPLICATE
        return self.home(t)

    def need(self, t: Tensor, p: Placement, out: list[Change]) -> None:
        """Record the change of ``t`` to ``p`` unless ``t`` already has it."""
        have = self.avail.setdefault(id(t), {key(self.get(t))})
        if key(p) in have:
            return
        out.append(Change(t, self.get(t), p))
        have.add(key(p))

    def backward_view(self, sp_regather: bool) -> None:
        """Before the backward pass: forget SP all-gathers (Megatron re-gathers for weight grads)."""
        if not sp_regather:
            return
        for tid, have in self.avail.items():
            base = self.place[tid]
            # routed tokens gathered by the MoE dispatcher are saved gathered by the expert GEMMs
            if is_seq(base) and base.dim != "t":  # type: ignore[union-attr]
                have.discard(key(REPLICATE))

    def forget(self, tensors: Iterable[Tensor]) -> None:
        """Drop extra placements of ``tensors`` (a recompute pass re-runs their producers)."""
        for t in tensors:
            if id(t) in self.place:
                self.avail[id(t)] = {key(self.place[id(t)])}

    # --- rules --------------------------------------------------------------------------------
    def run(self, op: Op) -> Placed:
        """Placements for one op; records its outputs' placements."""
        if op.kind == "einsum":
            return self._einsum(op)
        special: dict[str, Callable[[Op], Placed]] = {
            "gather": self._gather,
            "scatter_add": self._scatter_add,
        }
        if op.kind in special:
            return special[op.kind](op)
        if op.kind == "cross_entropy" and op.category == "fwd":
            return self._cross_entropy(op)
        return self._pointwise(op)

    def _finish(self, op: Op, changes: list[Change], ins: list[Placement], outs: list[Placement]) -> Placed:
        if self.folded:  # a local expert's gradient sums rows routed from the whole EP group: complete here
            outs = [REPLICATE if is_expert_weight(t) else p for t, p in zip(op.outputs, outs, strict=True)]
        for t, p in zip(op.outputs, outs, strict=True):
            self.set(t, p)
        return Placed(op, changes, ins, outs)

    def _einsum(self, op: Op) -> Placed:
        a, b = op.inputs
        lhs, rhs = op.einsum.split("->")  # type: ignore[union-attr]
        da, db = (tuple(x.split()) for x in lhs.split(","))
        do = tuple(rhs.split())
        pa, pb = self.get(a), self.get(b)
        changes: list[Change] = []
        try:
            out = contract(da, {"tp": pa}, db, {"tp": pb}, do).get("tp", REPLICATE)
        except SpecError:
            na = REPLICATE if (is_seq(pa) or isinstance(pa, Partial)) else pa
            nb = REPLICATE if (is_seq(pb) or isinstance(pb, Partial)) else pb
            out = contract(da, {"tp": na}, db, {"tp": nb}, do).get("tp", REPLICATE)
            for t, p, n in ((a, pa, na), (b, pb, nb)):
                if n != p:
                    self.need(t, n, changes)
            pa, pb = na, nb
        return self._finish(op, changes, [pa, pb], [out])

    def _gather(self, op: Op) -> Placed:
        table, ids = op.inputs
        pt = self.get(table)
        changes: list[Change] = []
        self.need(ids, REPLICATE, changes)
        out = Partial() if is_head(pt) else REPLICATE
        return self._finish(op, changes, [pt, REPLICATE], [out])

    def _scatter_add(self, op: Op) -> Placed:
        gy, ids = op.inputs
        table = op.grad_of.inputs[0] if op.grad_of is not None else None
        pt = self.get(table) if table is not None else REPLICATE
        changes: list[Change] = []
        self.need(ids, REPLICATE, changes)
        pg = self.get(gy)
        if is_head(pt):  # vocab-parallel table: every rank scatters all tokens in its vocab range
            self.need(gy, REPLICATE, changes)
            return self._finish(op, changes, [REPLICATE, REPLICATE], [pt])
        out = Partial() if is_seq(pg) else REPLICATE
        return self._finish(op, changes, [pg, REPLICATE], [out])

    def _cross_entropy(self, op: Op) -> Placed:
        logits, targets = op.inputs
        pl = self.get(logits)
        changes: list[Change] = []
        if is_seq(pl) or isinstance(pl, Partial):
            pl = REPLICATE
            self.need(logits, pl, changes)
        self.need(targets, REPLICATE, changes)
        # loss: Replicate after the vocab-parallel max/sum all-reduces; log-softmax like the logits
        return self._finish(op, changes, [pl, REPLICATE], [REPLICATE, pl])

    def _linear_in_partial(self, op: Op, ps: list[Placement]) -> Placed | None:
        """The MoE combine (gate-weighted scatter-add of expert outputs to tokens), its gate gradient
        (a dot product with the expert outputs) and the dispatch's backward (scatter-add of the slot
        gradients to their tokens) are linear in the expert-side tensor: with
        TP-sharded experts those stay partial sums and the output is the partial one, so the TP
        reduction moves to the token-level result (``b*s*h``, after the combine, as vLLM's and
        TensorRT-LLM's fused MoE and Megatron's token dispatcher reduce) instead of the ``top_k``
        times larger expert outputs. The other inputs (gates, indices, ``dy``) are gathered whole."""
        if not self.moe_tp_on_tokens:
            return None
        scatter = op.kind == "combine"  # forward combine, or the dispatch's backward (slots -> tokens)
        gate_grad = op.kind == "reduce" and op.grad_of is not None and op.grad_of.kind == "combine"
        if not (scatter or gate_grad):
            return None
        ye = op.inputs[0] if scatter else op.grad_of.inputs[0]  # type: ignore[union-attr]
        idx = next((i for i, t in enumerate(op.inputs) if t is ye), None)
        if idx is None or not isinstance(ps[idx], Partial):
            return None
        changes: list[Change] = []
        new_ps: list[Placement] = []
        for i, (t, p) in enumerate(zip(op.inputs, ps, strict=True)):
            if i == idx or t.role == "weight":
                new_ps.append(p)
                continue
            if p != REPLICATE:
                self.need(t, REPLICATE, changes)
            new_ps.append(REPLICATE)
        outs: list[Placement] = [Partial() if j == 0 else REPLICATE for j in range(len(op.outputs))]
        return self._finish(op, changes, new_ps, outs)

    def _pointwise(self, op: Op) -> Placed:
        ins = list(op.inputs)
        ps = [self.get(t) for t in ins]
        acts = [(t, p) for t, p in zip(ins, ps, strict=True) if t.role != "weight"]
        head = next((p.dim for _, p in acts if is_head(p)), None)
        changes: list[Change] = []

        def want_seq(t: Tensor) -> Placement:
            d = seq_dim(t)
            return Shard(d) if d is not None else REPLICATE

        linear = self._linear_in_partial(op, ps)
        if linear is not None:
            return linear
        if op.kind in ("dispatch", "permute") and self.moe_tp_on_tokens:
            # tokens -> slots (forward) or dy -> slot gradients (backward): on whole tokens
            for t, p in zip(ins, ps, strict=True):
                if t.role != "weight" and p != REPLICATE:
                    self.need(t, REPLICATE, changes)
            return self._finish(op, changes, [REPLICATE] * len(ins), [REPLICATE] * len(op.outputs))
        if op.grad_of is not None and op.grad_of.attrs.get("on_partial_sum"):
            # backward of the parallel block's branch dropout runs where its forward ran, on the full
            # sequence: one gather of the gradient serves both branches (GPT-NeoX gpt_j_residual)
            target, mode = (lambda t: REPLICATE), "rep"  # noqa: E731
        elif head is not None:
            target: Callable[[Tensor], Placement] = lambda t: Shard(head) if head in t.dims else REPLICATE  # noqa: E731
            mode = "head"
        elif any(is_seq(p) for _, p in acts):
            target, mode = want_seq, "seq"
        elif any(isinstance(p, Partial) for _, p in acts):
            if op.kind == "add" and all(isinstance(p, Partial) for _, p in acts):
                return self._finish(op, [], ps, [Partial() for _ in op.outputs])
            if op.attrs.get("on_partial_sum") and all(isinstance(p, Partial) for _, p in acts):
                # dropout with a mask shared by the TP group is linear: it stays Partial (parallel block)
                outs_p = [REPLICATE if o.role == "mask" else Partial() for o in op.outputs]
                return self._finish(op, [], ps, outs_p)
            target, mode = (want_seq, "seq") if self.sp else ((lambda t: REPLICATE), "rep")
        else:
            target, mode = (lambda t: REPLICATE), "rep"
        if mode == "seq" and op.kind not in REDUCE_KINDS and any(seq_dim(o) is None for o in op.outputs):
            target, mode = (lambda t: REPLICATE), "rep"  # e.g. select_last on a sequence shard: gather
        new_ps = []
        for t, p in zip(ins, ps, strict=True):
            if t.role == "weight":
                new_ps.append(p)
                continue
            q = target(t)
            if q != p:
                self.need(t, q, changes)
            new_ps.append(q)
        outs: list[Placement] = []
        for o in op.outputs:
            q = target(o)
            if mode == "head" and head not in o.dims:
                q = Partial()  # summed over the sharded heads (gradient of a head-broadcast input)
            elif mode == "seq" and seq_dim(o) is None and op.kind in REDUCE_KINDS:
                q = Partial()
            outs.append(q)
        return self._finish(op, changes, new_ps, outs)
