"""The simulator's collective algorithms on point-to-point send/recv (``torch.distributed``).

Why: gloo's own collectives are not always the algorithm the simulator models (PyTorch's gloo
backend all-reduces the whole input for a reduce-scatter, twice the bytes of a ring), so timing
them tests gloo's choices, not the model. Replay workers therefore run (``collectives="p2p"``,
the default; ``"native"`` keeps gloo's collectives):

* ring reduce-scatter: ``n-1`` steps; in step ``s`` member ``p`` sends its partial sum of chunk
  ``(p-s-1) mod n`` to the right neighbour and receives chunk ``(p-s-2) mod n`` from the left,
  adds its own input to it; after ``n-1`` steps it holds chunk ``p`` reduced over all members.
  ``(n-1)/n * S`` bytes through every port, ``n-1`` messages in sequence.
* ring all-gather: ``n-1`` steps; in step ``s`` member ``p`` forwards chunk ``(p-s) mod n`` to
  the right and receives chunk ``(p-s-1) mod n`` from the left.
* ring all-reduce: the ring reduce-scatter, then the ring all-gather of the reduced chunks
  (``2(n-1)`` steps, ``2(n-1)/n * S`` bytes per port).
* direct all-to-all: every member sends block ``j`` to member ``j``, all at once (the
  simulator's ``direct`` algorithm; :func:`all_to_all` says why not pairwise steps).

A ring whose members span several emulated nodes (``node_size``) runs as one channel per member
of a node (:func:`channel_rings`), each on its share of every chunk, all channels at once, as the
simulator's multi-channel ``ring`` assumes: a member sends ``(m-1)/m`` of the ring volume through
its intra-node port and ``1/m`` through its inter-node port (``m`` members per node).

Every receive of a collective is posted before its first send: gloo moves an unbound buffer
only after the receiver has announced it, and an announcement posted late queues on the pair's
one TCP connection behind bulk data going the other way (docs/benchmarks.md, "two-way
exchange"). Posting them all up front takes that rendezvous off the critical path. Buffers are
preallocated by the caller; nothing here allocates per step besides views.

Tags: step ``s`` of channel ``c`` uses tag ``COLL_TAG + 2nc + s`` (the all-gather half of an
all-reduce ``+ n``) on the default (world) group, with global ranks; gloo matches messages of one pair and tag in posting order, which both sides keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: First tag of collective steps, far above any program send/recv tag.
COLL_TAG = 1 << 30


def channel_rings(members: list[int], node_size: int | None) -> list[list[int]]:
    """The rings a ring collective of ``members`` runs, one per channel (global ranks).

    One ring (``members`` in order) when every member is on one emulated node, when nodes hold
    different numbers of members, or with one member per node. Otherwise one channel per member
    of a node, as NCCL's rings on a rail-optimized fabric and the simulator's multi-channel
    ``ring``: channel ``c`` visits the nodes in order and, inside node ``j``, its members
    ``g_j`` rotated by ``c`` (``g_j[c], g_j[c+1], ...``), so every member leaves its node in
    exactly one channel: the inter-node volume is spread over all of a node's ports.
    """
    if not node_size:
        return [list(members)]
    per_node: dict[int, list[int]] = {}
    for r in members:
        per_node.setdefault(r // node_size, []).append(r)
    nodes = [per_node[k] for k in sorted(per_node)]
    m = len(nodes[0])
    if len(nodes) == 1 or m == 1 or any(len(g) != m for g in nodes):
        return [list(members)]
    return [[g[(c + t) % m] for g in nodes for t in range(m)] for c in range(m)]


def _pieces(buf: Any, members: list[int], channels: int) -> list[dict[int, Any]]:
    """Per channel, member -> its sub-chunk of ``buf`` (``n`` chunks in member order, each cut
    into ``channels`` contiguous pieces, the last ones possibly one element shorter)."""
    n = len(members)
    m = buf.numel() // n
    bounds = [m * c // channels for c in range(channels + 1)]
    return [{g: buf[i * m + bounds[c]:i * m + bounds[c + 1]] for i, g in enumerate(members)}
            for c in range(channels)]


def _ring_rs(dist: Any, ring: list[int], rank: int, piece: dict[int, Any], out: Any, scratch: Any,
             tag0: int) -> Iterator[None]:
    """One channel of a ring reduce-scatter, a step per ``next()`` (see the module docstring)."""
    n = len(ring)
    p = ring.index(rank)
    left, right = ring[(p - 1) % n], ring[(p + 1) % n]
    size = out.numel()
    recv = [scratch[s * size:(s + 1) * size] for s in range(n - 1)]
    reqs = [dist.irecv(recv[s], src=left, tag=tag0 + s) for s in range(n - 1)]
    sends = [dist.isend(piece[ring[(p - 1) % n]], dst=right, tag=tag0)]
    yield
    for s in range(n - 1):
        reqs[s].wait()
        mine = piece[ring[(p - s - 2) % n]]
        if s < n - 2:
            recv[s].add_(mine)
            sends.append(dist.isend(recv[s], dst=right, tag=tag0 + s + 1))
        else:
            out.copy_(recv[s]).add_(mine)
        yield
    for w in sends:
        w.wait()


def _ring_ag(dist: Any, ring: list[int], rank: int, piece: dict[int, Any], tag0: int) -> Iterator[None]:
    """One channel of a ring all-gather (own piece already in place), a step per ``next()``."""
    n = len(ring)
    p = ring.index(rank)
    left, right = ring[(p - 1) % n], ring[(p + 1) % n]
    reqs = [dist.irecv(piece[ring[(p - s - 1) % n]], src=left, tag=tag0 + s) for s in range(n - 1)]
    sends = [dist.isend(piece[rank], dst=right, tag=tag0)]
    yield
    for s in range(n - 1):
        reqs[s].wait()
        if s < n - 2:
            sends.append(dist.isend(piece[ring[(p - s - 1) % n]], dst=right, tag=tag0 + s + 1))
        yield
    for w in sends:
        w.wait()


def _run_channels(steps: list[Iterator[None]]) -> None:
    """Advance every channel one step at a time, round robin, until all are done."""
    live = list(steps)
    while live:
        live = [g for g in live if next(g, StopIteration) is not StopIteration]


def reduce_scatter(dist: Any, members: list[int], rank: int, inp: Any, out: Any, scratch: Any,
                   node_size: int | None = None) -> None:
    """Ring reduce-scatter of ``inp`` (``n`` chunks) into ``out`` (one chunk); ``scratch`` holds
    ``n-1`` chunks (receive buffers, all posted first). Channels: :func:`channel_rings`."""
    rings = channel_rings(members, node_size)
    n, m, ch = len(members), out.numel(), len(rings)
    pieces = _pieces(inp, members, ch)
    bounds = [m * c // ch for c in range(ch + 1)]
    _run_channels([_ring_rs(dist, ring, rank, pieces[c], out[bounds[c]:bounds[c + 1]],
                            scratch[(n - 1) * bounds[c]:(n - 1) * bounds[c + 1]], COLL_TAG + 2 * n * c)
                   for c, ring in enumerate(rings)])


def all_gather(dist: Any, members: list[int], rank: int, inp: Any, out: Any, node_size: int | None = None,
               tag_offset: int = 0) -> None:
    """Ring all-gather of ``inp`` (one chunk) into ``out`` (``n`` chunks; ``inp`` may be the own
    chunk of ``out`` itself). Channels: :func:`channel_rings`."""
    rings = channel_rings(members, node_size)
    n = len(members)
    m = inp.numel()
    p = members.index(rank)
    if inp.data_ptr() != out[p * m:(p + 1) * m].data_ptr():
        out[p * m:(p + 1) * m].copy_(inp)
    pieces = _pieces(out, members, len(rings))
    _run_channels([_ring_ag(dist, ring, rank, pieces[c], COLL_TAG + 2 * n * c + tag_offset)
                   for c, ring in enumerate(rings)])


def all_reduce(dist: Any, members: list[int], rank: int, inp: Any, out: Any, scratch: Any,
               node_size: int | None = None) -> None:
    """Ring all-reduce of ``inp`` into ``out`` (same length, a multiple of ``n``): ring
    reduce-scatter into ``out``'s own chunk, then ring all-gather of the chunks in place."""
    n = len(members)
    m = inp.numel() // n
    p = members.index(rank)
    own = out[p * m:(p + 1) * m]
    reduce_scatter(dist, members, rank, inp, own, scratch, node_size)
    all_gather(dist, members, rank, own, out, node_size, tag_offset=n)


def all_to_all(dist: Any, members: list[int], rank: int, inp: Any, out: Any) -> None:
    """Direct all-to-all: block ``j`` of ``inp`` goes to member ``j``, block ``i`` of ``out``
    comes from member ``i``; every receive is posted, then every send (to ``p+1``, ``p+2``, ...),
    all in flight at once, as the simulator's ``direct`` algorithm assumes.

    What gloo's own ``alltoall`` adds (16-32 % over the model) is the rendezvous: with every
    receive announced before the first byte moves, the same pattern measures within a few
    percent of the model (docs/benchmarks.md). A pairwise schedule (step ``k``: send to ``p+k``,
    receive from ``p-k``, wait for both) was measured 30-40 % slower than the model: every step
    waits for the slowest pair, and the steps do not overlap.
    """
    n = len(members)
    m = inp.numel() // n
    p = members.index(rank)
    blk_in = [inp[c * m:(c + 1) * m] for c in range(n)]
    blk_out = [out[c * m:(c + 1) * m] for c in range(n)]
    reqs = [dist.irecv(blk_out[(p - k) % n], src=members[(p - k) % n], tag=COLL_TAG) for k in range(1, n)]
    blk_out[p].copy_(blk_in[p])
    reqs += [dist.isend(blk_in[(p + k) % n], dst=members[(p + k) % n], tag=COLL_TAG) for k in range(1, n)]
    for w in reqs:
        w.wait()
