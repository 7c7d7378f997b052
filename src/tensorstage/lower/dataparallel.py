"""Data parallelism and ZeRO for the step assembly: gradient buckets, FSDP units, model-state memory.

Everything here is per rank and independent of the pipeline schedule: :mod:`.assemble` decides
*when* a bucket or unit communicates, this module decides *what* (kinds, axes, bytes). Sizes come
from :meth:`ParallelPlan.param_sharding` / :meth:`ParamSharding.step_collectives` (checked against
torch FSDP2), applied to the right tensor:

* **DDP** (``zero=0``) and the **distributed optimizer** (``zero=1/2``, Megatron) reduce flat
  gradient *buckets*: weights are appended in reduction order (reverse layer order, reverse
  registration order inside a block) and a bucket closes as soon as it holds ``>= cap`` bytes
  (the weight that crosses stays in; torch's ``Reducer`` and Megatron's ``ParamAndGradBuffer``
  use the same rule). The bucket is one flat tensor: DDP all-reduces it; ZeRO-1/2 reduce-scatter
  it and all-gather the updated parameters after the optimizer step. Megatron pads each
  parameter's start to 64 elements and the bucket end to ``lcm(shard group, 128)`` elements with
  the distributed optimizer (``param_and_grad_buffer.py``); DDP (either style) does not pad.
* **ZeRO-3 / FSDP** works per *unit* (one block instance): the sum over its weights of each
  weight's own collectives, every weight padded along dim 0 to a multiple of the shard group
  (torch FSDP2's ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` buffers).
* Dense weights reduce over ``plan.dp_axes()`` (``cp``+``dp``, or ``dp_shard`` + ``dp_replicate``
  with hybrid sharding); expert weights over ``plan.dp_axes(expert=True)`` (``edp``), in their own
  buckets (Megatron keeps expert parameters in a separate buffer).

Bucket caps (:func:`bucket_caps`): :meth:`ParallelPlan.dp_buckets_bytes`, except that torch DDP
uses an explicitly given ``bucket_cap_mb`` for the first bucket too (``_DDPBucketCaps`` in
``torch/nn/parallel/distributed.py``: ``first_bucket_bytes_cap = bucket_bytes_cap`` unless the
default is in use), which :class:`ParallelPlan` does not model.

Gradient element size (:func:`grad_elem_bytes`): the graph options' explicit ``grad_dtype`` if
set; otherwise fp32 main gradients for Megatron (its ``main_grad`` buffers, the precision policy
default) and the parameter dtype for torch DDP, whose buckets hold ``param.grad`` in the
parameter's dtype (torchref fact DDP-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import ceil, lcm, prod

from tensorstage.graph.dims import dtype_bytes
from tensorstage.graph.graph import state_bytes_per_param
from tensorstage.graph.options import GraphOptions
from tensorstage.lower.steps import LocalWeight
from tensorstage.parallel.mesh import Mesh
from tensorstage.parallel.placement import Collective
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind

#: Megatron distributed optimizer: parameter starts aligned to 64 elements, bucket ends to
#: lcm(shard group size, 128) elements (``_pad_start_of_param_if_needed`` / ``_pad_end_of_bucket``).
MEGATRON_PARAM_ALIGN_ELEMS = 64
MEGATRON_BUCKET_ALIGN_ELEMS = 128


@dataclass(frozen=True, slots=True)
class CommOp:
    """One collective a bucket or unit issues: kind, mesh axes and ASTRA-sim ``comm_bytes``."""

    kind: CollKind
    axes: tuple[str, ...]
    comm_bytes: int


def _ops(colls: Sequence[Collective]) -> list[CommOp]:
    return [CommOp(c.kind, tuple(c.axes), int(c.comm_bytes)) for c in colls]


def grad_elem_bytes(options: GraphOptions, ddp_style: str) -> int:
    """Bytes per gradient element the DP reduction moves (see module docstring)."""
    prec = options.precision_policy()
    if options.grad_dtype is None and ddp_style == "torch":
        return dtype_bytes(prec.param_dtype)
    return dtype_bytes(prec.grad_dtype)


def bucket_caps(plan: ParallelPlan, grad_bytes: int) -> tuple[int | None, int | None]:
    """``(first_cap_bytes, cap_bytes)`` of the gradient buckets: ``first`` None = no special first
    bucket (use ``cap``); ``cap`` None = unbounded (one bucket)."""
    first, cap = plan.dp_buckets_bytes(grad_bytes)
    if plan.ddp_style == "torch" and plan.dp_bucket_bytes is not None:
        first = plan.dp_bucket_bytes  # torch: an explicit bucket_cap_mb applies to the first bucket too
    return first, cap


def shard_axes(plan: ParallelPlan, expert: bool) -> tuple[str, ...]:
    """Mesh axes ZeRO shards a weight over (dense: dp/cp or dp_shard; expert: edp)."""
    return plan.dp_axes(expert)[0]


def shard_factor(plan: ParallelPlan, mesh: Mesh, expert: bool) -> int:
    """Ranks a ZeRO-sharded weight is split over (1 without ZeRO)."""
    return mesh.size(*shard_axes(plan, expert)) if plan.zero >= 1 else 1


def _shape(w: LocalWeight) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if w.shape and len(w.shape) == len(w.dims) and prod(w.shape) == w.numel:
        return tuple(w.shape), tuple(w.dims)
    return (w.numel,), ("flat",)


def _dim0_shard_numel(w: LocalWeight, n: int) -> int:
    shape, _ = _shape(w)
    return ceil(shape[0] / n) * prod(shape[1:])


@dataclass
class Bucket:
    """One flat gradient bucket: its members (slot, weight) in reduction order and collectives.

    ``close_slot`` is the block instance whose backward completes the bucket (its last member);
    ``slots`` every block instance with a weight in it. ``reduce`` runs after the last
    micro-batch's backward of ``close_slot``; ``gather`` (ZeRO-1/2) after the optimizer step.
    """

    expert: bool
    numel: int
    slots: list[int] = field(default_factory=list)
    close_slot: int = -1
    reduce: list[CommOp] = field(default_factory=list)
    gather: list[CommOp] = field(default_factory=list)


def make_buckets(
    entries: Sequence[tuple[int, LocalWeight]],
    expert: bool,
    plan: ParallelPlan,
    mesh: Mesh,
    param_bytes: int,
    grad_bytes: int,
    own_bucket: frozenset[str] = frozenset(),
) -> list[Bucket]:
    """Cut ``entries`` (slot, weight) in reduction order into buckets and size their collectives.

    Weights named in ``own_bucket`` get a bucket of their own under the distributed optimizer
    (ZeRO-1/2): Megatron's ``_does_param_require_new_bucket`` does this for the
    ``shared_embedding`` weights (tied embedding table on the first stage and its copy on the
    last when ``pp > 1``) so both stages shard its optimizer state alike and the DP
    reduce-scatter can precede the embedding all-reduce; the bucket being filled is closed first.
    """
    first_cap, cap = bucket_caps(plan, grad_bytes)
    distopt = plan.zero in (1, 2)
    n = mesh.size(*shard_axes(plan, expert))
    buckets: list[Bucket] = []
    cur: Bucket | None = None
    for slot, w in entries:
        alone = distopt and w.name in own_bucket
        if alone and cur is not None and cur.numel:
            buckets.append(cur)
            cur = None
        if cur is None:
            cur = Bucket(expert, 0)
        if distopt and cur.numel:
            cur.numel = ceil(cur.numel / MEGATRON_PARAM_ALIGN_ELEMS) * MEGATRON_PARAM_ALIGN_ELEMS
        cur.numel += w.numel
        if not cur.slots or cur.slots[-1] != slot:
            cur.slots.append(slot)
        cur.close_slot = slot
        limit = first_cap if not buckets and first_cap is not None else cap
        if alone or (limit is not None and cur.numel * grad_bytes >= limit):
            buckets.append(cur)
            cur = None
    if cur is not None:
        buckets.append(cur)
    sharding = plan.param_sharding(("flat",), expert=expert)
    for b in buckets:
        if distopt:
            b.numel = ceil(b.numel / lcm(n, MEGATRON_BUCKET_ALIGN_ELEMS)) * lcm(n, MEGATRON_BUCKET_ALIGN_ELEMS)
        sc = sharding.step_collectives(mesh, (b.numel,), ("flat",), param_bytes, grad_bytes)
        b.reduce = _ops(sc["grad_reduce"])
        b.gather = _ops(sc["param_update_gather"])
    return buckets


@dataclass(frozen=True)
class UnitComm:
    """ZeRO-3 collectives of one FSDP unit (a block instance) and the bytes its gather makes live."""

    gather: tuple[CommOp, ...]
    reduce: tuple[CommOp, ...]
    gathered_bytes: int


def _sum_ops(lists: Sequence[list[CommOp]]) -> list[CommOp]:
    """Add up same-kind, same-axes collectives of several weights, keeping first-seen order."""
    total: dict[tuple[CollKind, tuple[str, ...]], int] = {}
    for ops in lists:
        for op in ops:
            key = (op.kind, op.axes)
            total[key] = total.get(key, 0) + op.comm_bytes
    return [CommOp(k, a, b) for (k, a), b in total.items()]


def unit_comm(weights: Sequence[LocalWeight], plan: ParallelPlan, mesh: Mesh, param_bytes: int,
              grad_bytes: int) -> UnitComm:
    """FSDP collectives of a unit holding ``weights``: dense and expert weights each form one
    all-gather / reduce-scatter (FSDP2 flattens a unit's parameters into one buffer per group)."""
    gather: list[CommOp] = []
    reduce: list[CommOp] = []
    gathered = 0
    for expert in (False, True):
        group = [w for w in weights if w.expert == expert]
        if not group:
            continue
        g_lists, r_lists = [], []
        for w in group:
            shape, dims = _shape(w)
            sc = plan.param_sharding(dims, expert=expert).step_collectives(mesh, shape, dims, param_bytes,
                                                                           grad_bytes)
            g_lists.append(_ops(sc["param_gather"]))
            r_lists.append(_ops(sc["grad_reduce"]))
        g, r = _sum_ops(g_lists), _sum_ops(r_lists)
        gather += g
        reduce += r
        gathered += sum(op.comm_bytes * mesh.size(*op.axes) for op in g)
    return UnitComm(tuple(gather), tuple(reduce), gathered)


def reduces_every_microbatch(plan: ParallelPlan) -> bool:
    """Whether gradients are reduced after every micro-batch's backward, not once per step.

    Sharded gradients with gradient accumulation need it: FSDP2's default without pipelining
    (``zero=3``, ``pp == 1``: a reduce-scatter per backward) and ZeRO-2 (DeepSpeed reduces every
    backward into the gradient partition). torch's pipeline stages turn FSDP2's sync off until the
    last backward (``set_requires_gradient_sync(False)`` in ``torch/distributed/pipelining/stage.py``)
    and so hold the gradients unsharded (:func:`static_bytes`); ZeRO-0/1 keep full gradients and
    reduce once. The step assembly (:mod:`.dp_emission`) and the explorer's screen follow this rule.
    """
    return (plan.zero == 3 and plan.pp == 1) or plan.zero == 2


def static_bytes(weights: Sequence[LocalWeight], plan: ParallelPlan, mesh: Mesh, options: GraphOptions,
                 grad_bytes: int) -> dict[str, int]:
    """Model-state bytes resident all step on one rank, by category, sharded per the ZeRO stage.

    ZeRO-1 shards optimizer states and master weights, ZeRO-2 also gradients, ZeRO-3 also the
    parameters (dim 0 padded like FSDP2). Megatron's fp32 copy of 16-bit gradients (``grad_copy``,
    what its optimizer steps on) is counted under ``gradients`` and sharded like the master
    weights (Megatron's table: fp16 20 bytes per parameter, 4 + 16/d with the distributed optimizer). Inference keeps only the weights. Exception: ZeRO-3 that
    reduces once per step (:func:`reduces_every_microbatch`: with pipelining) over several
    micro-batches keeps the stage's gradients *unsharded*: each FSDP2 unit accumulates
    ``unsharded_accumulated_grad`` from its first backward to the step's reduce-scatter, most of
    the step.
    """
    per = state_bytes_per_param(options)
    out = {"weights": 0, "gradients": 0, "optimizer_states": 0, "master_weights": 0}
    train = plan.phase == "train"
    zero = plan.zero if train else 0
    accumulate_unsharded = zero == 3 and not reduces_every_microbatch(plan) and plan.microbatches > 1
    for w in weights:
        n = mesh.size(*shard_axes(plan, w.expert)) if zero >= 1 else 1
        flat_shard = ceil(w.numel / n)
        out["weights"] += (_dim0_shard_numel(w, n) if zero == 3 else w.numel) * per["param"]
        if not train:
            continue
        grad_numel = (w.numel if accumulate_unsharded else _dim0_shard_numel(w, n) if zero == 3
                      else flat_shard if zero == 2 else w.numel)
        out["gradients"] += grad_numel * grad_bytes + flat_shard * per["grad_copy"]  # + fp32 copy of 16-bit grads
        out["optimizer_states"] += flat_shard * per["optimizer_states"]
        out["master_weights"] += flat_shard * per["master"]
    if not train:
        return {"weights": out["weights"]}
    return out


__all__ = [
    "Bucket",
    "CommOp",
    "UnitComm",
    "bucket_caps",
    "grad_elem_bytes",
    "make_buckets",
    "reduces_every_microbatch",
    "shard_axes",
    "shard_factor",
    "static_bytes",
    "unit_comm",
]
