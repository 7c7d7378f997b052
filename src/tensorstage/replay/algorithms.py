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

Every receive of a collective is posted before its first send: gloo moves an unbound buffer
only after the receiver has announced it, and an announcement posted late queues on the pair's
one TCP connection behind bulk data going the other way (docs/benchmarks.md, "two-way
exchange"). Posting them all up front takes that rendezvous off the critical path. Buffers are
preallocated by the caller; nothing here allocates per step besides views.

Tags: step ``s`` of a collective uses tag ``COLL_TAG + s`` on the default (world) group, with
global ranks; gloo matches messages of one pair and tag in posting order, which both sides keep.
"""

from __future__ import annotations

from typing import Any

#: First tag of collective steps, far above any program send/recv tag.
COLL_TAG = 1 << 30


def _ring(members: list[int], rank: int) -> tuple[int, int, int]:
    """Position of ``rank`` in the ring of ``members`` and its left and right neighbours."""
    p = members.index(rank)
    n = len(members)
    return p, members[(p - 1) % n], members[(p + 1) % n]


def reduce_scatter(dist: Any, members: list[int], rank: int, inp: Any, out: Any, scratch: Any) -> None:
    """Ring reduce-scatter of ``inp`` (``n`` chunks) into ``out`` (one chunk); ``scratch`` holds
    ``n-1`` chunks (one receive buffer per step, all posted first)."""
    n = len(members)
    m = out.numel()
    p, left, right = _ring(members, rank)
    chunk = [inp[c * m:(c + 1) * m] for c in range(n)]
    recv = [scratch[s * m:(s + 1) * m] for s in range(n - 1)]
    reqs = [dist.irecv(recv[s], src=left, tag=COLL_TAG + s) for s in range(n - 1)]
    sends = [dist.isend(chunk[(p - 1) % n], dst=right, tag=COLL_TAG)]
    for s in range(n - 1):
        reqs[s].wait()
        mine = chunk[(p - s - 2) % n]
        if s < n - 2:
            recv[s].add_(mine)
            sends.append(dist.isend(recv[s], dst=right, tag=COLL_TAG + s + 1))
        else:
            out.copy_(recv[s]).add_(mine)
    for w in sends:
        w.wait()


def all_gather(dist: Any, members: list[int], rank: int, inp: Any, out: Any, tag0: int = COLL_TAG) -> None:
    """Ring all-gather of ``inp`` (one chunk) into ``out`` (``n`` chunks; ``inp`` may be the own
    chunk of ``out`` itself)."""
    n = len(members)
    m = inp.numel()
    p, left, right = _ring(members, rank)
    chunk = [out[c * m:(c + 1) * m] for c in range(n)]
    reqs = [dist.irecv(chunk[(p - s - 1) % n], src=left, tag=tag0 + s) for s in range(n - 1)]
    if inp.data_ptr() != chunk[p].data_ptr():
        chunk[p].copy_(inp)
    sends = [dist.isend(chunk[p], dst=right, tag=tag0)]
    for s in range(n - 1):
        reqs[s].wait()
        if s < n - 2:
            sends.append(dist.isend(chunk[(p - s - 1) % n], dst=right, tag=tag0 + s + 1))
    for w in sends:
        w.wait()


def all_reduce(dist: Any, members: list[int], rank: int, inp: Any, out: Any, scratch: Any) -> None:
    """Ring all-reduce of ``inp`` into ``out`` (same length, a multiple of ``n``): ring
    reduce-scatter into ``out``'s own chunk, then ring all-gather of the chunks in place."""
    n = len(members)
    m = inp.numel() // n
    p = members.index(rank)
    own = out[p * m:(p + 1) * m]
    reduce_scatter(dist, members, rank, inp, own, scratch)
    all_gather(dist, members, rank, own, out, tag0=COLL_TAG + n)


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
