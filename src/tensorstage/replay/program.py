"""A plan's Programs as per-rank op lists: every communication node, in program order, real sizes.

Every rank of the replayed mesh runs the Program of its class (the one whose ``class_key``
coordinates it has) node by node in id order, which is a topological order of its dependencies
(:mod:`tensorstage.schedule.program`): collectives on the concrete group the node's axes give for
this rank, sends/receives to the concrete peer along ``peer_axis`` with the node's tag, compute
either skipped or replaced by a sleep of its simulated duration. Sizes are the node's
``comm_bytes`` times ``scale`` (all-gather: the gathered buffer, ``comm_bytes x n``), rounded to
whole float32 elements per member. Collectives on a group of one rank are no-ops and are left out.

A slice (:func:`slice_ranks`: the ranks with fixed coordinates on some axes, e.g. ``dp=0`` =
one TP group per pipeline stage) replays only its ranks; every communicator inside the slice
keeps its shape, and nodes whose group or peer lies outside are left out and counted.

Each op carries a key that names the same operation on every member (``c<group>:<k>`` = the k-th
collective on that group, ``p<src>-<dst>:<tag>:<k>``), and a parallel list says which class and node
it came from, so measured ops map back to the simulator's nodes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from tensorstage.errors import SpecError
from tensorstage.replay.ops import ELEMENT_BYTES, Op
from tensorstage.schedule.program import CollKind, NodeKind, Program

_KIND = {CollKind.ALL_REDUCE: "all_reduce", CollKind.ALL_GATHER: "all_gather",
         CollKind.REDUCE_SCATTER: "reduce_scatter", CollKind.ALL_TO_ALL: "all_to_all"}
COMPUTE_MODES = ("skip", "wait")


@dataclass
class RankOps:
    """Communicators (process indices), per-process ops and, per op, the ``(class, node id)`` it replays."""

    groups: list[list[int]]
    ops: list[list[Op]]
    origin: list[list[tuple[int, int]]]
    ranks: list[int] = field(default_factory=list)  # global rank each process plays
    skipped: dict[str, int] = field(default_factory=dict)  # nodes left out (per rank, summed), by what


def class_of_rank(programs: list[Program], mesh: object) -> list[int]:
    """Index of the Program each rank runs (its ``class_key`` coordinates match the rank's)."""
    out = []
    for r in range(mesh.world):  # type: ignore[attr-defined]
        found = [c for c, p in enumerate(programs)
                 if all(mesh.coord(r, a) == v for a, v in p.class_key.items())]  # type: ignore[attr-defined]
        if len(found) != 1:
            raise SpecError("programs", f"rank {r} matches {len(found)} rank classes (needs exactly one)")
        out.append(found[0])
    return out


def scaled_programs(programs: list[Program], scale: float, compute: str) -> list[Program]:
    """Copies with communication sizes scaled and, for ``compute='skip'``, compute nodes emptied,
    so the simulator runs the same slice the processes run."""
    out = []
    for p in programs:
        nodes = []
        for n in p.nodes:
            if n.kind == NodeKind.COMP:
                nodes.append(replace(n, flops=0, tensor_bytes=0, gemm=None) if compute == "skip" else n)
            else:
                nodes.append(replace(n, comm_bytes=int(n.comm_bytes * scale)))
        out.append(Program(dict(p.class_key), nodes, dict(p.static_bytes), p.model_flops))
    return out


def _full_bytes(kind: str, comm_bytes: int, n: int) -> int:
    full = comm_bytes * n if kind == "all_gather" else comm_bytes
    elems = max(n, full // ELEMENT_BYTES // n * n)
    return elems * ELEMENT_BYTES


def slice_ranks(mesh: object, fixed: dict[str, int]) -> list[int]:
    """Global ranks whose coordinates on the ``fixed`` axes equal the given values, ascending
    (``{"dp": 0}`` on TP x PP x DP = one TP group per pipeline stage)."""
    names = mesh.axis_names()  # type: ignore[attr-defined]
    for a, v in fixed.items():
        if a not in names:
            raise SpecError("slice", f"unknown mesh axis {a!r}", names)
        size = mesh.axis(a).size  # type: ignore[attr-defined]
        if not 0 <= v < size:
            raise SpecError("slice", f"{a}={v} is outside 0..{size - 1}")
    return [r for r in range(mesh.world)  # type: ignore[attr-defined]
            if all(mesh.coord(r, a) == v for a, v in fixed.items())]  # type: ignore[attr-defined]


def rank_ops(programs: list[Program], mesh: object, compute: str = "skip",
             compute_s: dict[tuple[int, int], float] | None = None, ranks: list[int] | None = None) -> RankOps:
    """Per-rank op lists of already scaled ``programs`` (module docstring).

    ``compute_s``: simulated duration of each ``(class, node id)`` compute node, for ``wait``.
    ``ranks``: the global ranks to replay (default: all); process ``i`` plays ``ranks[i]``. A
    collective whose group reaches outside them, or a send/recv whose peer does, is left out on
    every member and counted in :attr:`RankOps.skipped` (each member of the slice sees the same
    group, so the decision is the same on all of them).
    """
    if compute not in COMPUTE_MODES:
        raise SpecError("compute", f"unknown mode {compute!r}", COMPUTE_MODES)
    world = mesh.world  # type: ignore[attr-defined]
    members = list(range(world)) if ranks is None else list(ranks)
    local = {g: i for i, g in enumerate(members)}
    cls = class_of_rank(programs, mesh)
    group_id: dict[tuple[tuple[str, ...], int], int] = {}
    needed = set()
    for r in members:
        for n in programs[cls[r]].nodes:
            if n.kind == NodeKind.COLL and mesh.size(*n.axes) > 1:  # type: ignore[attr-defined]
                needed.add((n.axes, mesh.group_index(r, n.axes)))  # type: ignore[attr-defined]
    groups: list[list[int]] = []
    for key in sorted(needed):
        ranks_of = mesh.group_ranks(*key)  # type: ignore[attr-defined]
        if all(g in local for g in ranks_of):
            group_id[key] = len(groups)
            groups.append([local[g] for g in ranks_of])
    ops: list[list[Op]] = [[] for _ in members]
    origin: list[list[tuple[int, int]]] = [[] for _ in members]
    skipped: dict[str, int] = defaultdict(int)
    for i, r in enumerate(members):
        c = cls[r]
        seen: dict[object, int] = defaultdict(int)
        for n in programs[c].nodes:
            if n.kind == NodeKind.COMP:
                if compute == "wait":
                    ops[i].append(Op("wait", wait_s=(compute_s or {}).get((c, n.id), 0.0), key=f"w{r}:{n.id}"))
                    origin[i].append((c, n.id))
                continue
            if n.kind == NodeKind.COLL:
                size = mesh.size(*n.axes)  # type: ignore[attr-defined]
                if size <= 1 or n.comm is None:
                    continue
                gid = group_id.get((n.axes, mesh.group_index(r, n.axes)))  # type: ignore[attr-defined]
                if gid is None:
                    skipped[f"{_KIND[n.comm]} over {','.join(n.axes)}"] += 1
                    continue
                k = seen[gid]
                seen[gid] += 1
                kind = _KIND[n.comm]
                ops[i].append(Op(kind, _full_bytes(kind, n.comm_bytes, size), group=gid, key=f"c{gid}:{k}"))
            else:
                peer = mesh.peer(r, n.peer_axis, n.peer_offset)  # type: ignore[attr-defined]
                if peer not in local:
                    skipped[f"send/recv along {n.peer_axis}"] += 1
                    continue
                src, dst = (r, peer) if n.kind == NodeKind.SEND else (peer, r)
                k = seen[(src, dst, n.tag)]
                seen[(src, dst, n.tag)] += 1
                nbytes = max(ELEMENT_BYTES, n.comm_bytes // ELEMENT_BYTES * ELEMENT_BYTES)
                kind = "send" if n.kind == NodeKind.SEND else "recv"
                ops[i].append(Op(kind, nbytes, peer=local[peer], tag=n.tag, key=f"p{src}-{dst}:{n.tag}:{k}"))
            origin[i].append((c, n.id))
    return RankOps(groups, ops, origin, members, dict(sorted(skipped.items())))
