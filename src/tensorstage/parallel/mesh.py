"""`Mesh`: named parallel axes over a flat rank space, with O(1) rank arithmetic.

Axes are listed innermost first (default Megatron order ``tp, cp, dp, pp``: TP neighbours are
adjacent ranks). A rank's coordinate on axis ``i`` is ``(rank // stride_i) % size_i``.

*Views* re-factor a contiguous run of axes without moving any rank: Megatron carves expert
parallelism out of ``cp x dp`` as ``ep x edp`` (EP inner), so MoE layers use the view
``tp, ep, edp, pp`` while attention uses ``tp, cp, dp, pp``. Every axis name is unique across
the base mesh and its views, so a communicator is named by a tuple of axis names alone.

A *communicator* is a set of axes: the group of a rank for axes ``A`` is all ranks that share
its coordinates on every other axis of the same view. Group ids are arithmetic
(``base(A) + mixed-radix index of the other coordinates``); nothing scans all ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from math import prod

from tensorstage.errors import SpecError


@dataclass(frozen=True)
class Axis:
    """One named axis: its size and its stride in the flat rank space."""

    name: str
    size: int
    stride: int


@dataclass(frozen=True)
class Mesh:
    """Named axes (innermost first) over ``world`` ranks, plus optional re-factored views.

    ``views`` maps a view name to its axis list (innermost first); the base view is ``"base"``.
    Build with :meth:`Mesh.create`.
    """

    views: dict[str, tuple[Axis, ...]]
    world: int
    _axis_view: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def create(
        sizes: Sequence[tuple[str, int]],
        refactor: dict[str, tuple[Sequence[str], Sequence[tuple[str, int]]]] | None = None,
    ) -> Mesh:
        """Make a mesh from ``[(name, size), ...]`` innermost first.

        ``refactor`` adds views: ``{"expert": (("cp", "dp"), (("ep", 4), ("edp", 2)))}`` replaces the
        contiguous run ``cp, dp`` by ``ep, edp`` with the same product.
        """
        names = [n for n, _ in sizes]
        if len(set(names)) != len(names):
            raise SpecError("rank_order", f"axis names repeat: {names}")
        for n, s in sizes:
            if s < 1:
                raise SpecError(n, f"parallel degree must be >= 1, got {s}")
        base = _strided(sizes)
        views = {"base": base}
        for vname, (old, new) in (refactor or {}).items():
            old = list(old)
            start = names.index(old[0])
            if names[start : start + len(old)] != old:
                raise SpecError("rank_order", f"axes {old} must be adjacent to form view {vname!r}")
            if prod(s for _, s in new) != prod(s for n, s in sizes if n in old):
                raise SpecError(vname, f"sizes of {[n for n, _ in new]} must multiply to the size of {old}")
            vsizes = list(sizes[:start]) + list(new) + list(sizes[start + len(old) :])
            views[vname] = _strided(vsizes)
        axis_view: dict[str, str] = {}
        for vname, axes in views.items():
            for ax in axes:
                axis_view.setdefault(ax.name, vname)
        world = prod(s for _, s in sizes)
        return Mesh(views=views, world=world, _axis_view=axis_view)

    # --- lookups ---------------------------------------------------------------------------
    def view_of(self, axes: Sequence[str]) -> tuple[Axis, ...]:
        """The view whose axes include all of ``axes`` (base preferred)."""
        for vname in ("base", *sorted(v for v in self.views if v != "base")):
            have = {a.name for a in self.views[vname]}
            if all(a in have for a in axes):
                return self.views[vname]
        raise SpecError("axes", f"no mesh view contains all of {list(axes)}", self.axis_names())

    def axis_names(self) -> list[str]:
        return list(self._axis_view)

    def axis(self, name: str) -> Axis:
        view = self.views[self._axis_view[name]] if name in self._axis_view else ()
        for ax in view:
            if ax.name == name:
                return ax
        raise SpecError("axis", f"unknown mesh axis {name!r}", self.axis_names())

    def size(self, *axes: str) -> int:
        """Number of ranks in a communicator over ``axes`` (1 for no axes)."""
        return prod(self.axis(a).size for a in axes)

    def coord(self, rank: int, axis: str) -> int:
        ax = self.axis(axis)
        return (rank // ax.stride) % ax.size

    def coords(self, rank: int, view: str = "base") -> dict[str, int]:
        return {a.name: (rank // a.stride) % a.size for a in self.views[view]}

    def rank_of(self, coords: dict[str, int], view: str = "base") -> int:
        return sum(coords[a.name] * a.stride for a in self.views[view])

    def peer(self, rank: int, axis: str, offset: int) -> int:
        """The rank ``offset`` steps along ``axis`` (wrapping), all other coordinates equal."""
        ax = self.axis(axis)
        c = (rank // ax.stride) % ax.size
        return rank + (((c + offset) % ax.size) - c) * ax.stride

    # --- communicators ---------------------------------------------------------------------
    def group_count(self, axes: Sequence[str]) -> int:
        return self.world // self.size(*axes)

    def group_index(self, rank: int, axes: Sequence[str]) -> int:
        """Index (0-based) of ``rank``'s group over ``axes`` among all such groups: mixed radix of
        the coordinates on the other axes of the same view, innermost fastest."""
        index, radix = 0, 1
        for ax in self.view_of(axes):
            if ax.name in axes:
                continue
            index += ((rank // ax.stride) % ax.size) * radix
            radix *= ax.size
        return index

    def group_ranks(self, axes: Sequence[str], index: int) -> list[int]:
        """Global ranks of group ``index`` over ``axes``, in order of their coordinates on ``axes``
        (first listed axis fastest)."""
        view = self.view_of(axes)
        base = 0
        for ax in view:
            if ax.name in axes:
                continue
            base += (index % ax.size) * ax.stride
            index //= ax.size
        members = [base]
        for name in axes:
            ax = next(a for a in view if a.name == name)
            members = [m + c * ax.stride for c in range(ax.size) for m in members]
        return members

    def iter_groups(self, axes: Sequence[str]) -> Iterator[list[int]]:
        for i in range(self.group_count(axes)):
            yield self.group_ranks(axes, i)


def _strided(sizes: Sequence[tuple[str, int]]) -> tuple[Axis, ...]:
    stride, out = 1, []
    for name, size in sizes:
        out.append(Axis(name, size, stride))
        stride *= size
    return tuple(out)


@dataclass(frozen=True)
class Communicators:
    """Numbering of every communicator a set of programs uses, for ``pg_name`` and the group JSON.

    Communicator kinds (axis tuples) are numbered in sorted order; the groups of kind ``A`` get ids
    ``base[A] + 1 ... base[A] + group_count(A)``. Ids start at 1 (Chakra reserves "0" for all ranks).
    """

    mesh: Mesh
    base: dict[tuple[str, ...], int]

    @staticmethod
    def number(mesh: Mesh, kinds: Sequence[tuple[str, ...]]) -> Communicators:
        base, next_id = {}, 1
        for axes in sorted(set(kinds)):
            base[axes] = next_id
            next_id += mesh.group_count(axes)
        return Communicators(mesh, base)

    def pg_id(self, rank: int, axes: tuple[str, ...]) -> int:
        return self.base[axes] + self.mesh.group_index(rank, axes)

    def as_json_dict(self) -> dict[str, list[int]]:
        """``{"1": [ranks...], ...}`` for every group of every kind (size grows with world, by nature)."""
        out: dict[str, list[int]] = {}
        for axes, base in self.base.items():
            for i, ranks in enumerate(self.mesh.iter_groups(axes)):
                out[str(base + i)] = ranks
        return out
