"""Parallelisms as small functions that set placements, in the style of torchtitan's ``apply_tp`` /
``apply_fsdp`` and DTensor's ``ColwiseParallel`` / ``RowwiseParallel`` / ``SequenceParallel``.

Contract with the lowering (which owns the graph IR and calls these):

* A tensor is described only by its **dim names** - the graph IR's names (``tensorstage.graph.dims``):
  ``("b", "s", "h")`` for an activation, ``("h", "nkv", "g", "dh")`` for a GQA query projection,
  ``("nkv", "g", "dh", "h")`` for its output projection, ``("h", "f")`` / ``("f", "h")`` for MLP
  weights, ``("e", "h", "fe")`` for routed experts, ``("v", "h")`` / ``("h", "v")`` for embedding
  and head. The TP-split dim of a weight is found by name, the first of :data:`TP_DIMS` it has
  (KV-head groups ``nkv`` before query heads ``nh``, as Megatron shards query groups; then FFN
  widths and vocabulary); pass ``dim=`` to override. A weight with none of them (MLA's low-rank
  down-projections, the MoE router, learned positions, norms) stays Replicate, as in Megatron.
  Column vs row differs only in what the matmul produces: Shard of that dim vs Partial.
* Every function returns :data:`Placements` (mesh axis name -> :class:`Placement`; axes not
  named are Replicate) or a :class:`ParamSharding`, never a modified graph. The lowering builds a
  :class:`~tensorstage.parallel.placement.TensorLayout` from shape + placements, finds op output
  placements with :func:`~tensorstage.parallel.placement.contract`, and inserts the collectives
  :func:`~tensorstage.parallel.placement.redistribute` returns wherever the placement a producer
  gives differs from the placement a consumer needs.
* Axis names are the plan's mesh axes: ``tp``, ``cp``, ``dp``, ``pp``; ``ep``/``edp`` (expert view);
  ``dp_shard``/``dp_replicate`` (hybrid-sharding view). See :meth:`ParallelPlan.mesh`.

Megatron-LM's TP block, expressed with these functions (``sp`` = sequence parallelism)::

    residual  = tp_residual(sp)            # R, or Shard("s") with SP
    x_in      = tp_column_input()          # R: redistribute(residual -> R) = all-gather with SP
    w1        = tp_column(("h", "f"))      # Shard("f")
    y         = contract(x, w1) -> Shard("f")
    w2        = tp_row(("f", "h"))         # Shard("f")
    z         = contract(y, w2) -> Partial   # redistribute(z -> residual) = all-reduce, or
                                             # reduce-scatter with SP
    q         = tp_column(("h", "nkv", "g", "dh"))   # Shard("nkv"); attention stays head-local

Backward follows from the same rules (tests/test_parallel_placement.py derives it and
tests/test_parallel_dtensor.py checks it against DTensor): the gradient of a Replicate input
consumed by a sharded matmul is Partial, so column-parallel input grads are all-reduced (SP:
reduce-scattered) and row-parallel output grads all-gathered under SP. One Megatron detail is a
lowering choice, not a placement rule: with SP, Megatron's linear layer all-gathers its input
*again* in backward to form the weight gradient (it saves only the sequence shard), which adds one
all-gather per column-parallel linear; DTensor saves the gathered input instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import ceil

from tensorstage.errors import SpecError
from tensorstage.parallel.placement import (
    REPLICATE,
    Collective,
    Partial,
    Placement,
    Replicate,
    Shard,
    TensorLayout,
    redistribute,
)
from tensorstage.schedule.program import CollKind

Placements = dict[str, Placement]
SEQ_DIM = "s"
BATCH_DIM = "b"


# --- tensor parallel (Megatron column / row, sequence parallel) ------------------------------------
#: Dims tensor parallelism splits, in order of preference when a tensor has several.
TP_DIMS = ("nkv", "nh", "f", "fe", "fs", "v")


def tp_dim(dims: Sequence[str], dim: str | None = None) -> str | None:
    """The dim TP splits in a tensor with ``dims``: ``dim`` if given (must be one of ``dims``), else
    the first of :data:`TP_DIMS` present, else ``None`` (the tensor is replicated over TP)."""
    if dim is not None:
        if dim not in dims:
            raise SpecError("dim", f"{dim!r} is not a dim of {list(dims)}", dims)
        return dim
    return next((d for d in TP_DIMS if d in dims), None)


def tp_column(weight_dims: Sequence[str], dim: str | None = None, axis: str = "tp") -> Placements:
    """Column-parallel weight (Q/K/V, MLP gate/up, LM head): Shard its TP dim (see :func:`tp_dim`);
    the matmul output is Shard of the same dim. Replicate if it has no TP dim."""
    d = tp_dim(weight_dims, dim)
    return {axis: Shard(d)} if d is not None else {}


def tp_column_bias(bias_dims: Sequence[str], dim: str | None = None, axis: str = "tp") -> Placements:
    """Bias of a column-parallel linear: sharded with the output features."""
    return tp_column(bias_dims, dim, axis)


def tp_row(weight_dims: Sequence[str], dim: str | None = None, axis: str = "tp") -> Placements:
    """Row-parallel weight (attention out-proj, MLP down): Shard its TP dim, which the matmul sums
    over, so the output is Partial over ``axis`` (the bias is added once, after the reduction, and
    stays Replicate)."""
    d = tp_dim(weight_dims, dim)
    return {axis: Shard(d)} if d is not None else {}


def tp_residual(sp: bool, axis: str = "tp", seq_dim: str = SEQ_DIM) -> Placements:
    """The residual stream / norm inputs between TP blocks: Replicate, or Shard(seq) with sequence
    parallelism (Megatron SP: LayerNorm and dropout run on a sequence shard)."""
    return {axis: Shard(seq_dim)} if sp else {}


def tp_column_input(axis: str = "tp") -> Placements:
    """What a column-parallel matmul needs on its input: the whole activation (Replicate)."""
    return {}


def tp_row_output(axis: str = "tp") -> Placements:
    """What a row-parallel matmul produces before its reduction: Partial(sum)."""
    return {axis: Partial()}


def sequence_parallel(act_dims: Sequence[str], axis: str = "tp", seq_dim: str = SEQ_DIM) -> Placements:
    """Activations in a sequence-parallel region (norms, dropout, residual adds): Shard(seq)."""
    if seq_dim not in act_dims:
        raise SpecError("dims", f"sequence parallelism needs a {seq_dim!r} dim, got {list(act_dims)}")
    return {axis: Shard(seq_dim)}


def attention_heads(act_dims: Sequence[str], axis: str = "tp") -> Placements:
    """Per-head attention tensors (Q ``b s nkv g dh``, K/V, scores, context) under TP: Shard on the
    head dim (``nkv``, or ``nh`` for MHA/MLA); attention itself needs no communication."""
    d = next((x for x in ("nkv", "nh") if x in act_dims), None)
    if d is None:
        raise SpecError("dims", f"attention tensor needs a heads dim (nkv or nh), got {list(act_dims)}")
    return {axis: Shard(d)}


def context_parallel(act_dims: Sequence[str], axis: str = "cp") -> Placements:
    """Activations and KV under context parallelism: Shard the query sequence ``s`` (training and
    prefill; ring attention exchanges K/V chunks by send/recv, the all-gather variant gathers K/V
    over ``axis``), or the decode context ``c`` of a KV cache."""
    d = next((x for x in ("s", "c") if x in act_dims), None)
    if d is None:
        raise SpecError("dims", f"context parallelism needs an 's' or 'c' dim, got {list(act_dims)}")
    return {axis: Shard(d)}


# --- vocab parallel embedding, head and cross-entropy ------------------------------------------------
def vocab_parallel_embedding(table_dims: Sequence[str], axis: str = "tp") -> Placements:
    """Embedding table ``("v", "h")`` sharded over the vocabulary; each rank looks up the tokens in
    its range and zeros the rest, so the output is Partial over ``axis`` (then all-reduce, or
    reduce-scatter into the SP region)."""
    return {axis: Shard(_vocab(table_dims))}


def vocab_parallel_embedding_output(axis: str = "tp") -> Placements:
    """Placement of the vocab-parallel embedding lookup's output: Partial(sum)."""
    return {axis: Partial()}


def vocab_parallel_head(weight_dims: Sequence[str], axis: str = "tp") -> Placements:
    """LM head ``("h", "v")`` column-parallel over the vocabulary: logits come out Shard("v")."""
    return {axis: Shard(_vocab(weight_dims))}


def vocab_parallel_cross_entropy(
    tokens: int, tp: int, fused: bool = False, axis: str = "tp"
) -> list[Collective]:
    """Forward collectives of Megatron's vocab-parallel cross-entropy on Shard("v") logits (logits are
    cast to fp32, one value per token each): all-reduce(max) of the logit max, then all-reduce(sum)
    of the target logit and of the exp-sum - two separate all-reduces in
    ``tensor_parallel/cross_entropy.py``, one of the two concatenated with ``fused=True``
    (``fusions/fused_cross_entropy.py``). The backward needs no communication."""
    if tp == 1:
        return []
    one = tokens * 4
    sums = [2 * one] if fused else [one, one]
    return [Collective.make(CollKind.ALL_REDUCE, (axis,), b, tp) for b in [one, *sums]]


# --- data parallel: DDP, ZeRO-1/2/3 (FSDP), hybrid sharding -------------------------------------------
@dataclass(frozen=True)
class ParamSharding:
    """Placements of one parameter and its companions through a training step.

    * ``stored``: the parameter between uses (ZeRO-3: sharded over ``shard_axes``);
    * ``compute``: what forward/backward matmuls read (gathered over the DP axes);
    * ``grad``: the gradient as backward produces it (Partial over every replica axis);
    * ``grad_reduced``: after the gradient reduction (DDP: Replicate; ZeRO>=1: sharded);
    * ``optim``: optimizer states and fp32 master weights.

    Collectives per step: ``redistribute(stored -> compute)`` before forward (and again before
    backward for ZeRO-3, where ``stored != compute``); ``redistribute(grad -> grad_reduced)`` after
    backward (bucketed by the lowering); ``redistribute(optim -> stored)`` after the optimizer step
    (the ZeRO-1/2 parameter all-gather, Megatron's distributed optimizer).
    """

    stored: Placements
    compute: Placements
    grad: Placements
    grad_reduced: Placements
    optim: Placements
    zero: int = 0
    shard_axes: tuple[str, ...] = field(default=())

    def layouts(
        self, mesh: object, shape: Sequence[int], elem_bytes: int, dims: Sequence[str]
    ) -> dict[str, TensorLayout]:
        """The five placements as :class:`TensorLayout` on ``mesh`` (same element size for all;
        callers pass the grad / optimizer element sizes separately where they differ)."""
        names = ("stored", "compute", "grad", "grad_reduced", "optim")
        return {n: TensorLayout.on(mesh, shape, elem_bytes, getattr(self, n), dims) for n in names}

    def step_collectives(
        self,
        mesh: object,
        shape: Sequence[int],
        dims: Sequence[str],
        param_bytes: int,
        grad_bytes: int | None = None,
    ) -> dict[str, list[Collective]]:
        """Collectives of one step for this parameter: ``param_gather`` (per forward, and per backward
        when ZeRO-3), ``grad_reduce`` (once) and ``param_update_gather`` (once, ZeRO-1/2)."""
        grad_bytes = grad_bytes or param_bytes
        stored = TensorLayout.on(mesh, shape, param_bytes, self.stored, dims)
        grad = TensorLayout.on(mesh, shape, grad_bytes, self.grad, dims)
        optim = TensorLayout.on(mesh, shape, param_bytes, self.optim, dims)
        return {
            "param_gather": redistribute(stored, self.compute),
            "grad_reduce": redistribute(grad, self.grad_reduced),
            "param_update_gather": redistribute(optim, self.stored) if self.zero in (1, 2) else [],
        }


def param_sharding(
    weight_dims: Sequence[str],
    zero: int,
    shard_axes: Sequence[str],
    replicate_axes: Sequence[str] = (),
    model_parallel: Mapping[str, Placement] | None = None,
    shard_dim: str | None = None,
) -> ParamSharding:
    """Data-parallel placements of a parameter.

    ``shard_axes``: the DP axes the ZeRO stage shards over (``("cp", "dp")`` by default in a plan -
    CP ranks hold the same weights, as Megatron's dp-cp group; ``("dp_shard",)`` for hybrid
    sharding; ``("edp",)`` for expert weights). ``replicate_axes``: DP axes that keep full replicas
    (hybrid sharding's ``dp_replicate``): gradients are all-reduced across them after the
    reduce-scatter, as torch FSDP2 HSDP does. ``model_parallel``: the TP/EP placements, kept in
    every state. ``shard_dim``: the dim ZeRO splits, default the first (FSDP2 shards dim 0;
    Megatron's distributed optimizer splits the flat buffer - same bytes up to padding).

    ZeRO 0 (DDP): all-reduce grads. ZeRO 1 and 2 (Megatron distributed optimizer): reduce-scatter
    grads, all-gather updated params; 1 and 2 differ only in memory (2 frees the full grad). ZeRO 3
    (FSDP): params stored sharded, all-gathered for forward and backward, grads reduce-scattered.
    """
    if zero not in (0, 1, 2, 3):
        raise SpecError("zero", f"unknown ZeRO stage {zero}", (0, 1, 2, 3))
    mp = dict(model_parallel or {})
    dim = shard_dim or weight_dims[0]
    if dim not in weight_dims:
        raise SpecError("shard_dim", f"{dim!r} is not a dim of {list(weight_dims)}")
    full = dict(mp)
    sharded = mp | {a: Shard(dim) for a in shard_axes}
    grad = mp | {a: Partial() for a in (*shard_axes, *replicate_axes)}
    if zero == 0:
        return ParamSharding(full, full, grad, full, full, 0, tuple(shard_axes))
    stored = sharded if zero == 3 else full
    return ParamSharding(stored, full, grad, sharded, sharded, zero, tuple(shard_axes))


# --- expert parallel ---------------------------------------------------------------------------------
def expert_parallel(expert_weight_dims: Sequence[str], expert_dim: str = "e", axis: str = "ep") -> Placements:
    """Expert weights ``("e", ...)``: shard the expert dim over ``axis``. Combine with
    :func:`tp_column` / :func:`tp_row` for expert tensor parallelism (expert TP = TP here)."""
    if expert_dim not in expert_weight_dims:
        raise SpecError(
            "dims", f"expert weight needs an expert dim {expert_dim!r}, got {list(expert_weight_dims)}"
        )
    return {axis: Shard(expert_dim)}


def moe_dispatch_rows(
    tokens: int, top_k: int, capacity_factor: float | None = None, routing_skew: float = 1.0
) -> int:
    """Token rows one EP rank sends in the dispatch all-to-all (and receives at the busiest rank):
    ``tokens * top_k`` routed copies, times ``routing_skew`` (load of the busiest rank over the mean).
    With a capacity factor the buffer is padded/dropped to exactly ``capacity_factor`` times the mean
    (Megatron's ``moe_pad_expert_input_to_capacity``; GShard), so skew above it is dropped."""
    mean = tokens * top_k
    factor = capacity_factor if capacity_factor is not None else routing_skew
    return ceil(mean * factor)


def ep_alltoall(
    tokens: int,
    hidden: int,
    top_k: int,
    elem_bytes: int,
    ep: int,
    capacity_factor: float | None = None,
    routing_skew: float = 1.0,
    axis: str = "ep",
) -> list[Collective]:
    """Forward ``[dispatch, combine]`` all-to-alls of one MoE layer over ``axis`` (empty if ep == 1).

    The buffer is ``(ep_src, ep_dst, rows, hidden)``: ranks start holding Shard(source) (their own
    tokens, grouped by destination) and need Shard(destination) - Shard(i) -> Shard(j), an all-to-all
    of the per-rank buffer. Combine is the reverse change, same bytes. ``tokens`` are the tokens on
    one rank entering the router (with SP and expert TP = TP, Megatron's alltoall dispatcher routes
    the rank's sequence shard)."""
    rows = moe_dispatch_rows(tokens, top_k, capacity_factor, routing_skew)
    per_dst = ceil(rows / ep)
    dims = ("src", "dst", "r", "h")
    layout = TensorLayout((ep, ep, per_dst, hidden), elem_bytes, ((axis, Shard("src")),), ((axis, ep),), dims)
    dispatch = redistribute(layout, {axis: Shard("dst")})
    combine = redistribute(layout.with_placements({axis: Shard("dst")}), {axis: Shard("src")})
    return dispatch + combine


def _vocab(dims: Sequence[str]) -> str:
    if "v" not in dims:
        raise SpecError("dims", f"vocab-parallel tensor needs a 'v' dim, got {list(dims)}")
    return "v"


__all__ = [
    "REPLICATE",
    "ParamSharding",
    "Placements",
    "Replicate",
    "TP_DIMS",
    "attention_heads",
    "context_parallel",
    "ep_alltoall",
    "expert_parallel",
    "moe_dispatch_rows",
    "param_sharding",
    "sequence_parallel",
    "tp_column",
    "tp_column_bias",
    "tp_column_input",
    "tp_dim",
    "tp_residual",
    "tp_row",
    "tp_row_output",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
    "vocab_parallel_embedding_output",
    "vocab_parallel_head",
]
