"""A plan's Programs as per-rank op lists: every communication node, in program order, real sizes.

Every rank of the replayed mesh runs the Program of its class (the one whose ``class_key``
coordinates it has) node by node in id order, which is a topological order of its dependencies
(:mod:`tensorstage.schedule.program`): collectives on the concrete group the node's axes give for
this rank, sends/receives to the concrete peer along ``peer_axis`` with the node's tag, compute
either skipped or replaced by a sleep of its simulated duration. Sizes are the node's
``comm_bytes`` times ``scale`` (all-gather: the gathered buffer, ``comm_bytes x n``), rounded to
whole float32 elements per member. Collectives on a group of one rank are no-ops and are left out.

Each op carries a key that names the same operation on every member (``c<group>:<k>`` = the k-th
collective on that group, ``p<src>-<dst>:<tag>:<k>``), and a parallel list says which class and node
it came from, so measured ops map back to the simulator's nodes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from tensorstage.errors import SpecError
from tensorstage.replay.ops import ELEMENT_BYTES, Op
from tensorstage.schedule.program import CollKind, NodeKind, Program

_KIND = {CollKind.ALL_REDUCE: "all_reduce", CollKind.ALL_GATHER: "all_gather",
         CollKind.REDUCE_SCATTER: "reduce_scatter", CollKind.ALL_TO_ALL: "all_to_all"}
COMPUTE_MODES = ("skip", "wait")


@dataclass
class RankOps:
    """Communicators, per-rank ops and, per op, the ``(class index, node id)`` it replays."""

    groups: list[list[int]]
    ops: list[list[Op]]
    origin: list[list[tuple[int, int]]]


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


def rank_ops(programs: list[Program], mesh: object, compute: str = "skip",
             compute_s: dict[tuple[int, int], float] | None = None) -> RankOps:
    """Per-rank op lists of already scaled ``programs`` (module docstring).

    ``compute_s``: simulated duration of each ``(class, node id)`` compute node, for ``wait``.
    """
    if compute not in COMPUTE_MODES:
        raise SpecError("compute", f"unknown mode {compute!r}", COMPUTE_MODES)
    world = mesh.world  # type: ignore[attr-defined]
    cls = class_of_rank(programs, mesh)
    group_id: dict[tuple[tuple[str, ...], int], int] = {}
    needed = set()
    for c, p in enumerate(programs):
        for n in p.nodes:
            if n.kind == NodeKind.COLL and mesh.size(*n.axes) > 1:  # type: ignore[attr-defined]
                for r in range(world):
                    if cls[r] == c:
                        needed.add((n.axes, mesh.group_index(r, n.axes)))  # type: ignore[attr-defined]
    groups = []
    for key in sorted(needed):
        group_id[key] = len(groups)
        groups.append(mesh.group_ranks(*key))  # type: ignore[attr-defined]
    ops: list[list[Op]] = [[] for _ in range(world)]
    origin: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for r in range(world):
        c = cls[r]
        seen: dict[object, int] = defaultdict(int)
        for n in programs[c].nodes:
            if n.kind == NodeKind.COMP:
                if compute == "wait":
                    ops[r].append(Op("wait", wait_s=(compute_s or {}).get((c, n.id), 0.0), key=f"w{r}:{n.id}"))
                    origin[r].append((c, n.id))
                continue
            if n.kind == NodeKind.COLL:
                size = mesh.size(*n.axes)  # type: ignore[attr-defined]
                if size <= 1 or n.comm is None:
                    continue
                gid = group_id[(n.axes, mesh.group_index(r, n.axes))]  # type: ignore[attr-defined]
                k = seen[gid]
                seen[gid] += 1
                kind = _KIND[n.comm]
                ops[r].append(Op(kind, _full_bytes(kind, n.comm_bytes, size), group=gid, key=f"c{gid}:{k}"))
            else:
                peer = mesh.peer(r, n.peer_axis, n.peer_offset)  # type: ignore[attr-defined]
                src, dst = (r, peer) if n.kind == NodeKind.SEND else (peer, r)
                k = seen[(src, dst, n.tag)]
                seen[(src, dst, n.tag)] += 1
                nbytes = max(ELEMENT_BYTES, n.comm_bytes // ELEMENT_BYTES * ELEMENT_BYTES)
                kind = "send" if n.kind == NodeKind.SEND else "recv"
                ops[r].append(Op(kind, nbytes, peer=peer, tag=n.tag, key=f"p{src}-{dst}:{n.tag}:{k}"))
            origin[r].append((c, n.id))
    return RankOps(groups, ops, origin)
