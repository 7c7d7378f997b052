"""Mesh arithmetic against brute force, and against Megatron-LM's RankGenerator semantics.

Megatron (megatron/core/parallel_state.py) numbers ranks as
``global_rank = sum_i coord_i * prod_{j<i} size_j`` over the order string (default
``tp-cp-ep-dp-pp``, first = innermost). A group for a token set ("dp-cp") holds the ranks that share
every coordinate outside the set; groups are indexed by the mixed-radix number of those outside
coordinates (innermost fastest) and ranks within a group by the mixed-radix number of the inside
coordinates. Two generators share one world: the decoder one (tp, cp, dp, pp; ep=1) and the expert
one (expert tp, ep, expert dp, pp; cp=1), both with the same order string.

``megatron_groups`` below re-derives those groups from that description by enumerating every rank
(no shared code with Mesh); the tests compare them to ``Mesh`` / ``ParallelPlan.mesh()``.
"""

from __future__ import annotations

import itertools
from math import prod

import pytest

from tensorstage.parallel.mesh import Communicators, Mesh
from tensorstage.parallel.plan import ParallelPlan


def megatron_groups(sizes: dict[str, int], order: list[str], token: list[str]) -> list[list[int]]:
    """Groups of ``token`` axes for a generator with ``sizes`` laid out in ``order`` (innermost first)."""
    dims = [sizes.get(a, 1) for a in order]
    world = prod(dims)
    inside = [i for i, a in enumerate(order) if a in token]
    outside = [i for i in range(len(order)) if i not in inside]
    groups: dict[int, dict[int, int]] = {}
    for coords in itertools.product(*[range(d) for d in reversed(dims)]):
        c = list(reversed(coords))  # c[0] = innermost coordinate
        rank = sum(c[i] * prod(dims[:i]) for i in range(len(dims)))
        gidx = sum(c[i] * prod(dims[j] for j in outside[: outside.index(i)]) for i in outside)
        pos = sum(c[i] * prod(dims[j] for j in inside[: inside.index(i)]) for i in inside)
        groups.setdefault(gidx, {})[pos] = rank
    assert sum(len(g) for g in groups.values()) == world
    return [[g[p] for p in sorted(g)] for _, g in sorted(groups.items())]


def mesh_groups(mesh: Mesh, token: list[str], order: list[str]) -> list[list[int]]:
    axes = [a for a in order if a in token]
    return list(mesh.iter_groups(axes))


CONFIGS = [
    # tp, cp, dp, pp, ep
    (2, 1, 4, 2, 2),
    (2, 2, 2, 2, 4),
    (1, 2, 3, 2, 3),
    (4, 1, 2, 1, 2),
    (2, 2, 4, 1, 8),
    (1, 1, 1, 1, 1),
    (3, 1, 2, 2, 1),
]


@pytest.mark.parametrize("tp,cp,dp,pp,ep", CONFIGS)
def test_decoder_groups_equal_megatron(tp: int, cp: int, dp: int, pp: int, ep: int) -> None:
    plan = ParallelPlan.parse(dict(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, seq=4 * cp * tp))
    mesh = plan.mesh()
    order = ["tp", "cp", "dp", "pp"]  # Megatron's default tp-cp-ep-dp-pp with ep=1 in the decoder generator
    sizes = dict(tp=tp, cp=cp, dp=dp, pp=pp)
    for token in (
        ["tp"],
        ["cp"],
        ["dp"],
        ["pp"],
        ["dp", "cp"],
        ["tp", "cp"],
        ["tp", "dp", "cp"],
        ["tp", "pp"],
    ):
        assert mesh_groups(mesh, token, order) == megatron_groups(sizes, order, token), token


@pytest.mark.parametrize("tp,cp,dp,pp,ep", CONFIGS)
def test_expert_groups_equal_megatron(tp: int, cp: int, dp: int, pp: int, ep: int) -> None:
    plan = ParallelPlan.parse(dict(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, seq=4 * cp * tp))
    mesh = plan.mesh()
    edp = dp * cp // ep
    # Megatron's expert generator: tp=expert tp (= tp), ep, dp=expert dp, pp, cp=1, order tp-cp-ep-dp-pp.
    sizes = dict(tp=tp, ep=ep, dp=edp, pp=pp)
    order = ["tp", "ep", "dp", "pp"]
    names = {"tp": "tp", "ep": "ep", "dp": "edp", "pp": "pp"}
    for token in (["ep"], ["dp"], ["tp", "ep"], ["pp"], ["tp", "ep", "pp"], ["ep", "dp"]):
        ours = list(mesh.iter_groups([names[a] for a in order if a in token]))
        assert ours == megatron_groups(sizes, order, token), token
    # Megatron asserts the PP groups of both generators are identical.
    assert megatron_groups(sizes, order, ["pp"]) == mesh_groups(mesh, ["pp"], ["tp", "cp", "dp", "pp"])


def test_ep_after_dp_in_rank_order_matches_megatron_order_string() -> None:
    # Megatron order "tp-cp-dp-ep-pp": in the expert generator ep varies slower than expert dp.
    plan = ParallelPlan.parse(
        dict(tp=2, cp=2, dp=2, pp=2, ep=2, seq=64, rank_order=["tp", "cp", "dp", "ep", "pp"])
    )
    mesh = plan.mesh()
    sizes = dict(tp=2, ep=2, dp=2, pp=2)
    order = ["tp", "dp", "ep", "pp"]
    assert list(mesh.iter_groups(["ep"])) == megatron_groups(sizes, order, ["ep"])
    assert list(mesh.iter_groups(["edp"])) == megatron_groups(sizes, order, ["dp"])


def test_attention_not_replicated_across_expert_ranks() -> None:
    # EP carved out of dp*cp: an EP group never spans two TP or PP coordinates.
    mesh = ParallelPlan.parse(dict(tp=2, cp=2, dp=4, pp=2, ep=8, seq=64)).mesh()
    for group in mesh.iter_groups(["ep"]):
        assert len({mesh.coord(r, "tp") for r in group}) == 1
        assert len({mesh.coord(r, "pp") for r in group}) == 1
        assert len({(mesh.coord(r, "cp"), mesh.coord(r, "dp")) for r in group}) == 8


@pytest.mark.parametrize(
    "order,sizes",
    [
        (["tp", "cp", "dp", "pp"], (2, 3, 2, 2)),
        (["tp", "dp", "cp", "pp"], (2, 2, 3, 2)),
        (["pp", "tp", "dp", "cp"], (3, 2, 1, 2)),
    ],
)
def test_mesh_groups_partition_ranks_brute_force(order: list[str], sizes: tuple[int, ...]) -> None:
    mesh = Mesh.create(list(zip(order, sizes, strict=True)))
    world = prod(sizes)
    # Brute-force coordinates: enumerate, innermost first.
    coords = {}
    for r in range(world):
        rem, c = r, {}
        for a, s in zip(order, sizes, strict=True):
            c[a] = rem % s
            rem //= s
        coords[r] = c
        assert mesh.coords(r) == c
        assert mesh.rank_of(c) == r
    for k in range(1, len(order) + 1):
        for axes in itertools.combinations(order, k):
            groups = list(mesh.iter_groups(axes))
            members = sorted(r for g in groups for r in g)
            assert members == list(range(world)), axes  # a partition: every rank exactly once
            assert len(groups) == mesh.group_count(axes) == world // prod(mesh.size(a) for a in axes)
            for i, g in enumerate(groups):
                assert len(g) == mesh.size(*axes)
                others = {tuple(coords[r][a] for a in order if a not in axes) for r in g}
                assert len(others) == 1  # same coordinates off the group's axes
                for r in g:
                    assert mesh.group_index(r, axes) == i
    for r in range(world):
        for a in order:
            for off in (-1, 1, 2):
                p = mesh.peer(r, a, off)
                want = dict(coords[r], **{a: (coords[r][a] + off) % mesh.size(a)})
                assert coords[p] == want


def test_communicator_ids_unique_and_json_covers_groups() -> None:
    mesh = ParallelPlan.parse(dict(tp=2, cp=1, dp=4, pp=2, ep=2)).mesh()
    kinds = [("tp",), ("dp",), ("ep",), ("edp",), ("pp",)]
    comms = Communicators.number(mesh, kinds)
    groups = comms.as_json_dict()
    assert len(groups) == sum(mesh.group_count(k) for k in kinds)
    for r in range(mesh.world):
        for k in kinds:
            assert r in groups[str(comms.pg_id(r, k))]


def test_megatron_docstring_example() -> None:
    # initialize_model_parallel docstring: 16 GPUs, tp=2, pp=4 (so dp=2).
    mesh = ParallelPlan.parse(dict(tp=2, pp=4, dp=2)).mesh()
    assert list(mesh.iter_groups(["dp"])) == [
        [0, 2],
        [1, 3],
        [4, 6],
        [5, 7],
        [8, 10],
        [9, 11],
        [12, 14],
        [13, 15],
    ]
    assert list(mesh.iter_groups(["tp"])) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert list(mesh.iter_groups(["pp"])) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    # generate_masked_orthogonal_rank_groups docstring: sizes [tp, dp, pp] = [2, 3, 4], dp groups.
    sizes = dict(tp=2, dp=3, pp=4)
    groups = megatron_groups(sizes, ["tp", "dp", "pp"], ["dp"])
    assert groups[0] == [0, 2, 4] and groups[1] == [1, 3, 5] and groups[7] == [19, 21, 23]
    assert list(Mesh.create([("tp", 2), ("dp", 3), ("pp", 4)]).iter_groups(["dp"])) == groups


@pytest.mark.parametrize("order", [list(o) for o in itertools.permutations(["tp", "cp", "dp", "pp"])])
def test_every_rank_order_equals_megatron_order_string(order: list[str]) -> None:
    # Sizes with cp = 1 make every permutation legal (a size-1 axis is moved next to dp without
    # changing any rank); with cp > 1 only orders where cp and dp are adjacent are accepted.
    for cp in (1, 2):
        sizes = dict(tp=2, cp=cp, dp=3, pp=2)
        adjacent = abs(order.index("cp") - order.index("dp")) == 1
        if cp > 1 and not adjacent:
            with pytest.raises(Exception, match="adjacent"):
                ParallelPlan.parse(dict(**sizes, seq=64, rank_order=order))
            continue
        mesh = ParallelPlan.parse(dict(**sizes, seq=64, rank_order=order)).mesh()
        for token in (["tp"], ["cp"], ["dp"], ["pp"], ["dp", "cp"], ["tp", "pp"]):
            assert mesh_groups(mesh, token, order) == megatron_groups(sizes, order, token), (order, token)
