"""Placements of a tensor over named mesh axes, and the collectives a placement change needs.

As in PyTorch DTensor and JAX ``PartitionSpec``, every tensor has, for each mesh axis, one of:

* :class:`Shard` ``(dim)`` - split along tensor dim ``dim`` (an index or a dim name) across the axis;
* :class:`Replicate` - every rank of the axis holds the whole tensor;
* :class:`Partial` ``(op)`` - every rank holds a partial result that must be reduced with ``op``.

A :class:`TensorLayout` is a global shape, an element size and placements per axis.
:func:`redistribute` derives the collectives that turn one layout into another, with the rules

=====================  ==================================  ================================
change on one axis     collective                           ``comm_bytes`` (ASTRA-sim)
=====================  ==================================  ================================
Partial -> Replicate   all-reduce                           the buffer
Partial -> Shard(d)    reduce-scatter                       the full (unscattered) input
Shard(d) -> Replicate  all-gather                           the per-rank input shard
Shard(i) -> Shard(j)   all-to-all                           the per-rank buffer
Replicate -> Shard(d)  none (each rank slices locally)      -
Replicate -> Partial   none (all but one rank zero)         -
Shard(d) -> Partial    all-gather (then zeroing)            the per-rank input shard
=====================  ==================================  ================================

``wire_bytes_per_rank`` is what one rank sends (= receives) under the ring algorithm, with S the
full buffer: all-reduce ``2(n-1)/n * S``; all-gather and reduce-scatter ``(n-1)/n * S`` with S the
gathered / unscattered size; all-to-all ``(n-1)/n * S`` with S the per-rank buffer.

**Uneven shards** use ceil-div padding, like torch FSDP2 and DTensor's collectives: a dim of
size ``d`` sharded ``n`` ways holds ``ceil(d / n)`` per rank (trailing ranks hold padding), and
collectives move the padded buffers. Local bytes are therefore the padded shard, never a
per-rank-varying size, which keeps ranks of a class symmetric.

**Several axes.** Placements are an ordered mapping axis -> placement; when two axes shard the
same dim, the first listed splits outermost. Axes whose change is the same transition (same
source and target placement) are merged into one collective over all of them (FSDP over
``cp, dp``; Megatron's dp-cp gradient reduce-scatter). Transitions run shrinking first
(reduce-scatter, slicing), then size-keeping (all-reduce, all-to-all), then growing (all-gather),
which moves the fewest bytes. (Slicing before gathering can leave a *strided* shard - DTensor's
``_StridedShard`` - which equals a contiguous shard in bytes up to a local permutation.)

Checked against PyTorch DTensor's own redistribution (tests/test_parallel_dtensor.py): with
``merge=False`` the kinds, order and input bytes equal what DTensor issues, uneven shards included.
DTensor on CPU process groups implements Shard(i) -> Shard(j) as all-gather + chunk (gloo has no
all-to-all); on GPUs it is an all-to-all, as here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import ceil, prod
from typing import Literal

from tensorstage.errors import SpecError
from tensorstage.schedule.program import CollKind


@dataclass(frozen=True)
class Shard:
    """Split along tensor dim ``dim`` (index, or name resolved through ``TensorLayout.dims``)."""

    dim: int | str

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Replicate:
    """Every rank of the axis holds the full tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a partial value; the true tensor is the ``op``-reduction over the axis."""

    op: Literal["sum", "avg", "max"] = "sum"

    def __str__(self) -> str:
        return f"P({self.op})"


Placement = Shard | Replicate | Partial
REPLICATE = Replicate()


@dataclass(frozen=True)
class TensorLayout:
    """A tensor's global shape and element size, and its placement on each mesh axis.

    ``axis_sizes`` gives the size of every axis named in ``placements`` (use :meth:`on` to take
    them from a :class:`~tensorstage.parallel.mesh.Mesh`). Axes not listed are Replicate. ``dims``
    optionally names the tensor dims so that ``Shard("h")`` can be used.
    """

    shape: tuple[int, ...]
    elem_bytes: int
    placements: tuple[tuple[str, Placement], ...] = ()
    axis_sizes: tuple[tuple[str, int], ...] = ()
    dims: tuple[str, ...] | None = None

    @staticmethod
    def on(
        mesh: object,
        shape: Sequence[int],
        elem_bytes: int,
        placements: Mapping[str, Placement] | None = None,
        dims: Sequence[str] | None = None,
    ) -> TensorLayout:
        """Build a layout whose axis sizes come from ``mesh`` (anything with ``size(axis)``)."""
        placements = dict(placements or {})
        sizes = tuple((a, mesh.size(a)) for a in placements)  # type: ignore[attr-defined]
        return TensorLayout(tuple(shape), elem_bytes, tuple(placements.items()), sizes, _dims(dims))

    def __post_init__(self) -> None:
        if self.dims is not None and len(self.dims) != len(self.shape):
            raise SpecError("dims", f"{len(self.dims)} dim names for a rank-{len(self.shape)} tensor")
        sizes = dict(self.axis_sizes)
        for axis, p in self.placements:
            if axis not in sizes:
                raise SpecError("axis", f"no size given for mesh axis {axis!r}", list(sizes))
            if isinstance(p, Shard):
                self.dim_index(p.dim)

    # --- queries -------------------------------------------------------------------------------
    def placement(self, axis: str) -> Placement:
        return dict(self.placements).get(axis, REPLICATE)

    def size(self, axis: str) -> int:
        return dict(self.axis_sizes).get(axis, 1)

    def dim_index(self, dim: int | str) -> int:
        """Index of ``dim`` (an index or a name in ``dims``)."""
        if isinstance(dim, str):
            if self.dims is None or dim not in self.dims:
                raise SpecError("dim", f"tensor has no dim named {dim!r}", self.dims or ())
            return self.dims.index(dim)
        if not 0 <= dim < len(self.shape):
            raise SpecError("dim", f"dim {dim} out of range for a rank-{len(self.shape)} tensor")
        return dim

    @property
    def global_bytes(self) -> int:
        return prod(self.shape) * self.elem_bytes

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Per-rank (padded) shape: each Shard axis ceil-divides its dim, in placement order."""
        shape = list(self.shape)
        for axis, p in self.placements:
            if isinstance(p, Shard):
                i = self.dim_index(p.dim)
                shape[i] = ceil(shape[i] / self.size(axis))
        return tuple(shape)

    @property
    def local_bytes(self) -> int:
        """Bytes one rank holds (the padded shard)."""
        return prod(self.local_shape) * self.elem_bytes

    def with_placements(
        self, placements: Mapping[str, Placement], sizes: Mapping[str, int] | None = None
    ) -> TensorLayout:
        """Same tensor, new placements (axis sizes kept, extended by ``sizes``)."""
        all_sizes = dict(self.axis_sizes) | dict(sizes or {})
        return TensorLayout(
            self.shape,
            self.elem_bytes,
            tuple(placements.items()),
            tuple((a, all_sizes[a]) for a in all_sizes),
            self.dims,
        )

    def __str__(self) -> str:
        pl = ", ".join(f"{a}:{p}" for a, p in self.placements)
        return f"{list(self.shape)}x{self.elem_bytes}B[{pl}]"


def _dims(dims: Sequence[str] | None) -> tuple[str, ...] | None:
    return tuple(dims) if dims is not None else None


@dataclass(frozen=True)
class Collective:
    """One collective over the group spanned by ``axes``.

    ``comm_bytes`` follows ASTRA-sim/Chakra (all-gather: per-rank input shard; reduce-scatter:
    full input; all-reduce: the buffer; all-to-all: per-rank buffer). ``wire_bytes_per_rank``
    is what each rank sends under the ring algorithm. ``group_size`` is the number of ranks.
    """

    kind: CollKind
    axes: tuple[str, ...]
    comm_bytes: int
    wire_bytes_per_rank: int
    group_size: int

    @staticmethod
    def make(kind: CollKind, axes: Sequence[str], comm_bytes: int, group_size: int) -> Collective:
        """A collective with its ring wire bytes computed from ``comm_bytes`` and ``group_size``."""
        return Collective(
            kind, tuple(axes), comm_bytes, ring_wire_bytes(kind, comm_bytes, group_size), group_size
        )


def ring_wire_bytes(kind: CollKind, comm_bytes: int, n: int) -> int:
    """Bytes one rank sends under the ring algorithm for a collective of ``comm_bytes`` (ASTRA-sim
    convention) over ``n`` ranks (rounded down to whole bytes)."""
    if n <= 1:
        return 0
    if kind == CollKind.ALL_REDUCE:
        return 2 * (n - 1) * comm_bytes // n
    if kind == CollKind.ALL_GATHER:  # S = n * shard
        return (n - 1) * comm_bytes
    if kind in (CollKind.REDUCE_SCATTER, CollKind.ALL_TO_ALL):  # S = full input / per-rank buffer
        return (n - 1) * comm_bytes // n
    raise SpecError("kind", f"no ring volume for {kind!r}")


_SHRINK, _KEEP, _GROW, _FREE = 0, 1, 2, 3


def _transition(src: Placement, dst: Placement) -> tuple[int, CollKind | None]:
    """(phase, collective) of a change on one axis; phase orders the changes (see module doc)."""
    if src == dst:
        return _FREE, None
    match src, dst:
        case Partial(), Replicate():
            return _KEEP, CollKind.ALL_REDUCE
        case Partial(), Shard():
            return _SHRINK, CollKind.REDUCE_SCATTER
        case Shard(), Replicate() | Partial():
            return _GROW, CollKind.ALL_GATHER
        case Shard(), Shard():
            return _KEEP, CollKind.ALL_TO_ALL
        case Replicate(), Shard():
            return _SHRINK, None
        case Replicate(), Partial():
            return _FREE, None
        case Partial(), Partial():
            raise SpecError("placement", f"cannot change reduction {src} -> {dst} without reducing")
    raise SpecError("placement", f"unsupported placement change {src} -> {dst}")


def redistribute(
    layout: TensorLayout, target: TensorLayout | Mapping[str, Placement], merge: bool = True
) -> list[Collective]:
    """Collectives that turn ``layout`` into ``target`` (a layout of the same tensor, or just the
    target placements per axis; axes not named are Replicate). See the module docstring for the
    rules and ordering.

    ``merge=True`` issues one collective over all axes that make the same change (one communicator
    spanning them, as Megatron's dp-cp group or FSDP2 on a flattened mesh). ``merge=False`` issues
    one per axis, as DTensor does on an n-D mesh: shrinking changes outermost axis first, growing
    changes innermost (last listed) first. Both move the same bytes on the wire; the counts differ.
    """
    if isinstance(target, TensorLayout):
        if target.shape != layout.shape:
            raise SpecError("shape", f"redistribute between shapes {layout.shape} and {target.shape}")
        tgt = dict(target.placements)
        sizes = dict(layout.axis_sizes) | dict(target.axis_sizes)
    else:
        tgt = dict(target)
        sizes = dict(layout.axis_sizes)
    src = dict(layout.placements)
    order = list(src) + [a for a in tgt if a not in src]
    for a in order:
        if a not in sizes:
            raise SpecError("axis", f"no size given for mesh axis {a!r}", list(sizes))
    # Group axes by (phase, src, dst [, axis]): each group is one collective over its axes.
    steps: dict[tuple[int, Placement, Placement, str], list[str]] = {}
    for a in order:
        s, d = src.get(a, REPLICATE), tgt.get(a, REPLICATE)
        phase, _ = _transition(s, d)
        if phase != _FREE or s != d:
            steps.setdefault((phase, s, d, "" if merge else a), []).append(a)

    def step_order(item: tuple[tuple[int, Placement, Placement, str], list[str]]) -> tuple[int, int]:
        phase, axes = item[0][0], item[1]
        pos = order.index(axes[0])
        return phase, -pos if phase == _GROW else pos

    out: list[Collective] = []
    current = dict(src)
    for (_, s, d, _a), axes in sorted(steps.items(), key=step_order):
        _, kind = _transition(s, d)
        before = _layout(layout, current, sizes)
        for a in axes:
            current[a] = d
        after = _layout(layout, current, sizes)
        n = prod(sizes[a] for a in axes)
        if kind is None or n == 1:
            continue
        if kind == CollKind.REDUCE_SCATTER:
            comm = after.local_bytes * n  # full input, padded to a multiple of n
        elif kind == CollKind.ALL_GATHER:
            comm = before.local_bytes  # per-rank input shard
        else:  # all-reduce, all-to-all: per-rank buffer
            comm = max(before.local_bytes, after.local_bytes)
        out.append(Collective.make(kind, axes, comm, n))
    return out


def _layout(
    base: TensorLayout, placements: Mapping[str, Placement], sizes: Mapping[str, int]
) -> TensorLayout:
    """``base`` with ``placements`` (Replicate entries dropped), keeping the original axis order."""
    kept = {a: p for a, p in placements.items() if p != REPLICATE}
    return TensorLayout(
        base.shape, base.elem_bytes, tuple(kept.items()), tuple((a, sizes[a]) for a in kept), base.dims
    )


def contract(
    a_dims: Sequence[str],
    a: Mapping[str, Placement],
    b_dims: Sequence[str],
    b: Mapping[str, Placement],
    out_dims: Sequence[str],
) -> dict[str, Placement]:
    """Placements of ``einsum(a, b) -> out`` (dims by name; a dim not in ``out_dims`` is summed),
    per mesh axis, by DTensor's matmul rules - the sharding propagation the lowering needs to
    find which placement each op's output has before :func:`redistribute` inserts collectives:

    * both Replicate -> Replicate;
    * a dim kept in the output sharded on one side (other side Replicate, or sharded on the same
      dim name) -> Shard of that dim;
    * a summed dim sharded on *both* sides -> Partial (each rank sums its slice);
    * Partial on one side, Replicate on the other -> Partial (contraction is linear).

    Any other combination needs a redistribution first and raises :class:`SpecError`.
    ``Shard`` dims must be given by name here.
    """
    out: dict[str, Placement] = {}
    for axis in list(a) + [x for x in b if x not in a]:
        pa, pb = a.get(axis, REPLICATE), b.get(axis, REPLICATE)
        out[axis] = _contract_one(axis, pa, pb, set(a_dims), set(b_dims), set(out_dims))
    return {k: v for k, v in out.items() if v != REPLICATE}


def _contract_one(
    axis: str, pa: Placement, pb: Placement, a_dims: set[str], b_dims: set[str], out_dims: set[str]
) -> Placement:
    for p, dims in ((pa, a_dims), (pb, b_dims)):
        if isinstance(p, Shard) and (not isinstance(p.dim, str) or p.dim not in dims):
            raise SpecError("dim", f"Shard({p.dim!r}) on {axis} must name a dim of its operand")
    if pa == REPLICATE and pb == REPLICATE:
        return REPLICATE
    if isinstance(pa, Partial) or isinstance(pb, Partial):
        if {type(pa), type(pb)} == {Partial, Replicate}:
            return pa if isinstance(pa, Partial) else pb
        raise SpecError("placement", f"{pa} x {pb} on {axis}: reduce before contracting")
    sa = pa.dim if isinstance(pa, Shard) else None
    sb = pb.dim if isinstance(pb, Shard) else None
    dim = sa if sa is not None else sb
    other_has_dim = (dim in b_dims) if sa is not None else (dim in a_dims)
    if sa is not None and sb is not None and sa != sb:
        raise SpecError("placement", f"{pa} x {pb} on {axis}: operands sharded on different dims")
    if dim in out_dims:
        if other_has_dim and (sa is None or sb is None):
            raise SpecError(
                "placement", f"{pa} x {pb} on {axis}: shared dim {dim!r} sharded on one side only"
            )
        return Shard(dim)
    if sa is not None and sb is not None:
        return Partial()
    raise SpecError("placement", f"{pa} x {pb} on {axis}: summed dim {dim!r} sharded on one side only")
