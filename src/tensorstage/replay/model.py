"""Predicted times of the benchmarked operations: the simulator's model and the executed algorithm.

Two predictions per measured case, both from the *emulated* link parameters (rate and delay of
each tier, not fitted):

* ``simulator``: :func:`tensorstage.sim.collectives.collective_time_s` / ``p2p_time_s`` on a
  :class:`~tensorstage.sim.collectives.Fabric` built from the links (no per-collective base
  latency: that is an NCCL constant, gloo has none). This is what ``tensorstage simulate`` charges.
* ``algorithm``: the algorithm the replay actually ran, as alpha-beta formulas (``S`` = full
  buffer, ``n`` members, ``B`` and ``alpha`` of the slowest link used). With ``collectives="p2p"``
  (default) the workers run the simulator's algorithms on send/recv
  (:mod:`tensorstage.replay.algorithms`); with ``"native"`` gloo's own collectives:

  - all-reduce: ring (p2p; gloo ``allreduce`` default algorithm): ``2(n-1)/n * S/B + 2(n-1) alpha``.
  - all-gather: ring (p2p; gloo ``allgather``: receive from the left, send to the right):
    ``(n-1)/n * S/B + (n-1) alpha``.
  - reduce-scatter: p2p: ring, ``(n-1)/n * S/B + (n-1) alpha``. native: PyTorch's gloo backend
    has no reduce-scatter algorithm; it all-reduces the whole input and keeps its chunk
    (``ProcessGroupGloo::reduce_scatter_tensor_coalesced``), so it costs an all-reduce of ``S``,
    twice the ring reduce-scatter the simulator charges.
  - all-to-all: direct (every send and receive in flight at once, p2p and gloo ``alltoall``):
    per tier, the bytes to peers behind that tier's port: ``max_i (m_i - m_{i-1})/n * S / B_i``
    plus one alpha; the same formula as the simulator's ``direct`` algorithm.
  - send/recv: ``alpha + S/B`` of the tier crossed.

  Two tiers: gloo's single ring crosses the slower tier's link at full ring volume ``V``, so its
  bandwidth term uses ``min(B)``. The p2p rings run one channel per member of a node (as NCCL
  and the simulator's multi-channel ring): ``max((m-1)/m * V / B_intra, V / (m B_inter))`` with
  ``m`` members per node. The simulator charges ``max(V / B_intra, V / (m B_inter))``: every
  member's intra-node port at the full volume, while a member's own inter-node hop (one channel
  in ``m``) leaves through its inter-node port. On one tier every formula coincides with the
  simulator's for ``p2p``, and for all but reduce-scatter with ``native``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorstage.errors import SpecError
from tensorstage.replay.microbench import BenchCase
from tensorstage.replay.ops import COLLECTIVE_IMPLS, astra_comm_bytes
from tensorstage.schedule.program import CollKind
from tensorstage.sim.collectives import Fabric, Tier, collective_time_s, p2p_time_s

_COLL = {"all_reduce": CollKind.ALL_REDUCE, "all_gather": CollKind.ALL_GATHER,
         "reduce_scatter": CollKind.REDUCE_SCATTER, "all_to_all": CollKind.ALL_TO_ALL}


@dataclass(frozen=True)
class LinkTier:
    """One tier of emulated links: per-rank port rate (bytes/s, each direction) and one-way delay."""

    name: str
    rate_Bps: float
    latency_s: float

    def __post_init__(self) -> None:
        if not self.rate_Bps > 0:
            raise SpecError(f"links.{self.name}.rate", f"must be > 0, got {self.rate_Bps}")
        if self.latency_s < 0:
            raise SpecError(f"links.{self.name}.latency", f"must be >= 0, got {self.latency_s}")


@dataclass(frozen=True)
class Links:
    """The emulated network: ranks in nodes of ``node_size``; ``tiers[0]`` inside a node,
    ``tiers[1]`` (if any) between nodes. One tier = every rank on one switch."""

    ranks: int
    node_size: int
    tiers: tuple[LinkTier, ...]

    @property
    def two_tier(self) -> bool:
        return len(self.tiers) > 1 and 1 < self.node_size < self.ranks

    def fabric(self) -> Fabric:
        """The simulator's fabric for these links (no NCCL base latency)."""
        if not self.two_tier:
            t = self.tiers[0]
            return Fabric((Tier(t.name, self.ranks, t.rate_Bps, t.latency_s),))
        a, b = self.tiers[0], self.tiers[1]
        return Fabric((Tier(a.name, self.node_size, a.rate_Bps, a.latency_s),
                       Tier(b.name, self.ranks // self.node_size, b.rate_Bps, b.latency_s)))

    def members(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """Members per tier domain of a group: ``(most members inside one node, all members)``."""
        n = len(ranks)
        if not self.two_tier:
            return (n,)
        per_node: dict[int, int] = {}
        for r in ranks:
            per_node[r // self.node_size] = per_node.get(r // self.node_size, 0) + 1
        return (max(per_node.values()), n)

    def label(self, ranks: tuple[int, ...], p2p: bool) -> str:
        """The sweep's group label a group of ``ranks`` behaves as: inside one node or across nodes."""
        inside = not self.two_tier or len({r // self.node_size for r in ranks}) == 1
        if p2p:
            return "p2p-intra" if inside else "p2p-inter"
        return "node" if inside and self.two_tier else "world"

    def tier_of(self, case: BenchCase) -> int:
        """Index of the tier whose link bounds ``case`` (the slowest tier the group spans)."""
        if not self.two_tier or case.group in ("node", "p2p-intra"):
            return 0
        if case.group == "p2p-inter":
            return 1
        return 0 if self.tiers[0].rate_Bps < self.tiers[1].rate_Bps else 1


def simulator_time_s(case: BenchCase, links: Links) -> float:
    """What the simulator's collective model charges for ``case``."""
    fabric = links.fabric()
    if case.op == "send_recv":
        return p2p_time_s(case.size_bytes, 1 if case.group == "p2p-inter" else 0, fabric)
    n = len(case.ranks)
    members = links.members(case.ranks)
    t, _ = collective_time_s(_COLL[case.op], astra_comm_bytes(case.op, case.size_bytes, n), members, fabric)
    return t


_RING_OPS = ("all_reduce", "all_gather", "reduce_scatter")


def ring_channel_members(case: BenchCase, links: Links, collectives: str = "p2p") -> int:
    """Members per node of a multi-channel ring (``p2p`` rings spanning nodes with the same number
    of members on each, :func:`tensorstage.replay.algorithms.channel_rings`), else 1."""
    if collectives != "p2p" or not links.two_tier or case.op not in _RING_OPS:
        return 1
    counts: dict[int, int] = {}
    for r in case.ranks:
        counts[r // links.node_size] = counts.get(r // links.node_size, 0) + 1
    if len(counts) == 1 or len(set(counts.values())) > 1:
        return 1
    return next(iter(counts.values()))


def algorithm_tier(case: BenchCase, links: Links, collectives: str = "p2p") -> int:
    """Index of the tier whose port bounds the algorithm that ran: :meth:`Links.tier_of`, except
    for a multi-channel ring, which sends ``(m-1)/m`` of its volume through the intra-node port
    and ``1/m`` through the inter-node port: the tier with the longer of the two."""
    m = ring_channel_members(case, links, collectives)
    if m > 1:
        intra, inter = links.tiers[0].rate_Bps, links.tiers[1].rate_Bps
        return 0 if (m - 1) / m / intra >= 1 / m / inter else 1
    return links.tier_of(case)


def algorithm_terms(case: BenchCase, links: Links, collectives: str = "p2p") -> tuple[float, float]:
    """``(alpha_steps, bytes)`` of the algorithm the replay ran (``collectives``: ``p2p`` or
    ``native``, :data:`~tensorstage.replay.ops.COLLECTIVE_IMPLS`): time = steps*alpha + bytes/B
    with ``B`` and ``alpha`` of tier :func:`algorithm_tier` (all-to-all: of its busiest tier)."""
    n, s = len(case.ranks), float(case.size_bytes)
    if collectives not in COLLECTIVE_IMPLS:
        raise SpecError("collectives", f"unknown implementation {collectives!r}", COLLECTIVE_IMPLS)
    if case.op == "send_recv":
        return 1.0, s
    if case.op == "all_reduce" or (case.op == "reduce_scatter" and collectives == "native"):
        steps, volume = 2.0 * (n - 1), 2.0 * (n - 1) / n * s
    elif case.op in ("reduce_scatter", "all_gather"):
        steps, volume = float(n - 1), (n - 1) / n * s
    elif case.op == "all_to_all":
        m = links.members(case.ranks)
        if len(m) == 1 or m[0] == n:
            return 1.0, (n - 1) / n * s
        tier = links.tier_of(case)
        peers = (m[0] - 1) if tier == 0 else (n - m[0])
        return 1.0, peers / n * s
    else:
        raise SpecError("op", f"unknown operation {case.op!r}")
    m = ring_channel_members(case, links, collectives)
    if m > 1:
        volume *= (m - 1) / m if algorithm_tier(case, links, collectives) == 0 else 1 / m
    return steps, volume


def algorithm_time_s(case: BenchCase, links: Links, collectives: str = "p2p") -> float:
    """The algorithm the replay ran for ``case``, on the emulated links (module docstring)."""
    if case.op == "all_to_all" and links.two_tier and links.members(case.ranks)[0] < len(case.ranks):
        n, m, s = len(case.ranks), links.members(case.ranks)[0], float(case.size_bytes)
        a, b = links.tiers
        return max((m - 1) / n * s / a.rate_Bps, (n - m) / n * s / b.rate_Bps) + max(a.latency_s, b.latency_s)
    steps, nbytes = algorithm_terms(case, links, collectives)
    tier = links.tiers[algorithm_tier(case, links, collectives)] if links.two_tier else links.tiers[0]
    if links.two_tier and case.group == "world":
        return steps * max(t.latency_s for t in links.tiers) + nbytes / tier.rate_Bps
    return steps * tier.latency_s + nbytes / tier.rate_Bps
