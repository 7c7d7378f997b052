"""Alpha-beta cost of collectives and point-to-point transfers on a tiered fabric.

The fabric is ASTRA-sim's multi-dimensional network in its simplest useful form: a list of
:class:`Tier` s, innermost first. Tier 0 is the scale-up domain (NVLink/NVSwitch: ``size`` GPUs per
node); tier 1 the scale-out network (``size`` nodes per domain, the last tier unbounded); more tiers
describe e.g. pods. Every tier is a non-blocking switch seen through each GPU's own port of
``bw_Bps`` (per GPU, per direction, *achievable*: datasheet times the efficiency of the spec) and a
per-message latency ``latency_s`` (alpha).

A group is described by *how many of its members share each domain*: ``members[i]`` = members of
the group inside one tier-``i`` domain (``members[-1]`` = group size). That is arithmetic on the
mesh (axis strides and sizes vs domain sizes; :func:`members_per_domain`), never a scan of ranks.

Sizes follow ASTRA-sim's ``comm_size`` convention (``../shared/reference/chakra_et.md``):
all-reduce and all-to-all = the per-rank buffer, all-gather = the per-rank *input* (the shard),
reduce-scatter = the full input. Internally every formula uses ``S`` = the full (gathered) buffer.

Algorithms, each an alpha-beta formula; :func:`collective_time_s` takes the fastest available one,
as NCCL's tuner does (Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009):

* ``ring`` (flat, multi-channel): one logical ring over all ``n`` members, split into one channel per
  member of a domain so every GPU's port at every tier carries traffic at once (NCCL rings on a
  rail-optimized fabric). It is pipelined, so its bandwidth term is the *slowest* tier's:
  traffic that must leave a tier-``(i-1)`` domain, ``f * S``, crosses ``members[i-1]`` ports of
  tier ``i``. Latency: one alpha of the slowest tier crossed per ring step (``2(n-1)`` steps for
  all-reduce, ``n-1`` for all-gather / reduce-scatter). On one tier this is exactly the textbook
  ring: all-reduce ``2(n-1)/n * S/B + 2(n-1)*alpha``.
* ``hierarchical`` (multi-dimensional, ASTRA-sim's default): reduce-scatter tier by tier from the
  innermost (data shrinks by the tier's factor each phase), all-gather back from the outermost;
  all-reduce = reduce-scatter phases then all-gather phases. Phases run one after the other.
* ``tree`` (all-reduce, groups spanning more than one node): NCCL's double binary tree between
  nodes, the intra-node part done hierarchically; bandwidth term ``2 * S_node / B`` (each node
  sends and receives the node's share twice: reduce then broadcast, split over the two trees),
  latency ``2 * ceil(log2 nodes) * alpha``. Wins for large inter-node groups at small/medium sizes.
* ``ring`` and ``hierarchical`` also pay the fabric's ``ring_base_latency_s`` once per
  collective (NCCL's per-collective base latency, see :class:`Fabric`).
* ``nvls`` (all-reduce inside one NVSwitch domain when the tier says ``nvls``): in-switch
  reduction, every GPU sends and receives ``S`` once: ``S / B_nvls + 2*alpha``.
* ``direct`` (all-to-all): every member sends ``S/n`` to every other member at once; the bytes
  that cross tier ``i`` (destinations inside the member's tier-``i`` domain but outside its
  tier-``(i-1)`` domain) go through its tier-``i`` port; tiers run concurrently; one alpha per
  tier crossed.

Contention between concurrent collectives is not modelled (each gets the full ports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil, log2

from tensorstage.errors import SpecError
from tensorstage.schedule.program import CollKind


@dataclass(frozen=True)
class Tier:
    """One level of the fabric (ASTRA-sim "dimension").

    ``size``: domains of the previous tier (GPUs for tier 0) inside one domain of this tier; the
    outermost tier's size is ignored (unbounded). ``bw_Bps``: achievable bandwidth of one GPU's port
    on this tier, bytes/s per direction (datasheet x efficiency). ``latency_s``: alpha per message.
    ``nvls_bw_Bps`` > 0 enables in-switch all-reduce (NVLink SHARP) on this tier at that per-GPU rate.
    """

    name: str
    size: int
    bw_Bps: float
    latency_s: float
    nvls_bw_Bps: float = 0.0
    #: the GPUs' ports on this tier go into a switch (NVSwitch, an IB leaf), so a ring channel leaving
    #: a domain of this tier does so from one member's port of the next tier (``_flat_ring_s``);
    #: False for direct links (torus rings, fully connected)
    switched: bool = True

    def __post_init__(self) -> None:
        if self.size < 1:
            raise SpecError(f"fabric.{self.name}.size", f"must be >= 1, got {self.size}")
        if not self.bw_Bps > 0:
            raise SpecError(f"fabric.{self.name}.bw_Bps", f"must be > 0, got {self.bw_Bps}")
        if self.latency_s < 0:
            raise SpecError(f"fabric.{self.name}.latency_s", f"must be >= 0, got {self.latency_s}")


@dataclass(frozen=True)
class Fabric:
    """Tiers innermost first (tier 0 = scale-up domain).

    ``ring_base_latency_s``: fixed cost of one ring-based collective (``ring`` and
    ``hierarchical`` algorithms: all-reduce, all-gather, reduce-scatter) on top of its per-step
    alphas: NCCL's tuning model charges ``baseLat[RING][SIMPLE]`` once per collective (kernel
    start, channel/proxy setup). Not charged to ``tree`` (NCCL's ``baseLat[TREE][SIMPLE]`` is 0),
    ``nvls``, ``direct`` all-to-all (grouped send/recv, outside that model) or point-to-point.
    """

    tiers: tuple[Tier, ...]
    ring_base_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.tiers:
            raise SpecError("fabric.tiers", "at least one tier is needed")
        if self.ring_base_latency_s < 0:
            raise SpecError("fabric.ring_base_latency_s", f"must be >= 0, got {self.ring_base_latency_s}")

    def domain_sizes(self) -> tuple[int, ...]:
        """GPUs inside one domain of each tier (the outermost is unbounded: a very large int)."""
        out, d = [], 1
        for i, t in enumerate(self.tiers):
            d = d * t.size if i < len(self.tiers) - 1 else 1 << 62
            out.append(d)
        return tuple(out)


# --- placement arithmetic -------------------------------------------------------------------------
def members_per_domain(strides_sizes: Sequence[tuple[int, int]], fabric: Fabric) -> tuple[int, ...]:
    """Members of one group inside one domain of each tier, from the group's axes ``(stride, size)``.

    A rank on axis ``a`` moves by ``stride_a`` per step, so inside an aligned domain of ``D`` GPUs
    the group has ``min(size_a, ceil(D / stride_a))`` distinct coordinates on ``a`` (1 when the
    stride is at least ``D``), and the members there are the product over its axes. Exact when the
    domain size and the strides divide one another (the usual powers of two); otherwise an
    estimate. O(axes x tiers), independent of the group size.
    """
    n = 1
    for _, size in strides_sizes:
        n *= size
    out, prev = [], 1
    for d in fabric.domain_sizes():
        m = 1
        for stride, size in strides_sizes:
            m *= min(size, max(1, ceil(d / stride)))
        m = max(prev, min(m, n))
        out.append(m)
        prev = m
    out[-1] = n
    return tuple(out)


def mesh_members_per_domain(mesh: object, axes: Sequence[str], fabric: Fabric) -> tuple[int, ...]:
    """:func:`members_per_domain` for the communicator over ``axes`` of a ``Mesh``."""
    pairs = [(mesh.axis(a).stride, mesh.axis(a).size) for a in axes]  # type: ignore[attr-defined]
    return members_per_domain(pairs, fabric)


def p2p_tier(mesh: object, axis: str, offset: int, fabric: Fabric) -> int:
    """Outermost tier a send along ``axis`` by ``offset`` steps crosses (0 = inside the scale-up domain).

    The jump is ``offset * stride`` ranks; it stays inside a tier-``i`` domain when the axis'
    whole span (``size * stride``) fits in that domain, or always leaves it when the jump is at
    least the domain size; a mixed case (wrap-around straddling domains) is charged to the outer tier.
    """
    ax = mesh.axis(axis)  # type: ignore[attr-defined]
    jump = abs(offset) * ax.stride
    span = ax.size * ax.stride
    for i, d in enumerate(fabric.domain_sizes()):
        if span <= d and d % span == 0 or jump == 0:
            return i
    return len(fabric.tiers) - 1


# --- single-tier textbook formulas (exported for tests and explanations) ----------------------------
def ring_all_reduce_s(n: int, full_bytes: float, bw_Bps: float, latency_s: float) -> float:
    """Ring all-reduce on one tier: ``2(n-1)/n * S/B + 2(n-1) * alpha``."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * full_bytes / bw_Bps + 2 * (n - 1) * latency_s


def ring_gather_s(n: int, full_bytes: float, bw_Bps: float, latency_s: float) -> float:
    """Ring all-gather or reduce-scatter on one tier (``S`` = full size): ``(n-1)/n * S/B + (n-1)*alpha``."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * full_bytes / bw_Bps + (n - 1) * latency_s


# --- multi-tier algorithms --------------------------------------------------------------------------
def _time(candidate: tuple[float, str]) -> float:
    """Sort key: time only, so ties keep the listed order (ring first, as NCCL's default)."""
    return candidate[0]


def _factors(members: Sequence[int]) -> list[float]:
    prev, out = 1, []
    for m in members:
        out.append(m / prev)
        prev = m
    return out


def _flat_ring_s(members: Sequence[int], fabric: Fabric, volume_fraction: float, full_bytes: float,
                 steps: int) -> float:
    """Pipelined multi-channel ring: slowest tier's bandwidth term plus ``steps`` alphas of the
    outermost tier crossed. ``volume_fraction * S`` is what each member sends in total; where the
    ring spans several domains of a tier, each channel leaves a domain from one member, whose next
    hop is on the tier above, so a port of the inner tier carries ``(k - 1) / k`` of the volume
    (``k`` sub-domains per domain; measured on two emulated tiers, docs/replay.md)."""
    n = members[-1]
    bw_term, alpha, prev = 0.0, 0.0, 1
    for i, tier in enumerate(fabric.tiers):
        m = members[i]
        if m == prev:
            continue
        ports = prev  # members of one tier-(i-1) domain, each with its own tier-i port
        # The ring leaves a tier-(i-1) domain once per channel; each domain sends volume*S out.
        t = volume_fraction * full_bytes / (tier.bw_Bps * (ports if i > 0 else 1))
        if m < n and tier.switched:
            # the ring also leaves this tier's domain: of its k = m / prev sub-domains, each is the
            # exit of the channels it owns, so a tier-i port carries (k - 1) / k of the volume
            k = m // prev
            t *= (k - 1) / k
        bw_term = max(bw_term, t)
        alpha = max(alpha, tier.latency_s)
        prev = m
    del n
    return bw_term + steps * alpha


def _hier_rs_s(members: Sequence[int], fabric: Fabric, full_bytes: float) -> float:
    """Reduce-scatter tier by tier, innermost first; data shrinks by each tier's factor."""
    total, data = 0.0, float(full_bytes)
    for tier, k in zip(fabric.tiers, _factors(members), strict=True):
        if k <= 1:
            continue
        total += (k - 1) / k * data / tier.bw_Bps + (k - 1) * tier.latency_s
        data /= k
    return total


def _tree_all_reduce_s(members: Sequence[int], fabric: Fabric, full_bytes: float) -> float | None:
    """NCCL-style: intra-node reduce-scatter, double binary tree between nodes on the node's
    share, intra-node all-gather. Only for groups spanning more than one scale-up domain."""
    n, local = members[-1], members[0]
    nodes = n / local
    if nodes <= 1:
        return None
    t0 = fabric.tiers[0]
    intra = 2 * ((local - 1) / local * full_bytes / t0.bw_Bps + (local - 1) * t0.latency_s) if local > 1 else 0.0
    share = full_bytes / local
    outer = [t for t, k in zip(fabric.tiers[1:], _factors(members)[1:], strict=True) if k > 1]
    bw = min(t.bw_Bps for t in outer)
    alpha = max(t.latency_s for t in outer)
    return intra + 2 * share / bw + 2 * ceil(log2(nodes)) * alpha


def all_reduce_s(full_bytes: float, members: Sequence[int], fabric: Fabric) -> tuple[float, str]:
    """Fastest all-reduce of a ``full_bytes`` buffer and the algorithm's name."""
    n = members[-1]
    if n <= 1 or full_bytes <= 0:
        return 0.0, "none"
    base = fabric.ring_base_latency_s
    cands = [
        (base + _flat_ring_s(members, fabric, 2 * (n - 1) / n, full_bytes, 2 * (n - 1)), "ring"),
        (base + 2 * _hier_rs_s(members, fabric, full_bytes), "hierarchical"),
    ]
    tree = _tree_all_reduce_s(members, fabric, full_bytes)
    if tree is not None:
        cands.append((tree, "tree"))
    t0 = fabric.tiers[0]
    if t0.nvls_bw_Bps > 0 and members[0] == n:
        cands.append((full_bytes / t0.nvls_bw_Bps + 2 * t0.latency_s, "nvls"))
    return min(cands, key=_time)


def reduce_scatter_s(full_bytes: float, members: Sequence[int], fabric: Fabric) -> tuple[float, str]:
    """Fastest reduce-scatter of a ``full_bytes`` input (ASTRA-sim ``comm_size``)."""
    n = members[-1]
    if n <= 1 or full_bytes <= 0:
        return 0.0, "none"
    base = fabric.ring_base_latency_s
    return min(
        (base + _flat_ring_s(members, fabric, (n - 1) / n, full_bytes, n - 1), "ring"),
        (base + _hier_rs_s(members, fabric, full_bytes), "hierarchical"),
        key=_time,
    )


def all_gather_s(shard_bytes: float, members: Sequence[int], fabric: Fabric) -> tuple[float, str]:
    """Fastest all-gather of a per-rank input of ``shard_bytes`` (ASTRA-sim ``comm_size``).

    Hierarchical all-gather runs the reduce-scatter phases in reverse (outermost first, on the
    smallest data), so it costs the same as a reduce-scatter of the gathered size.
    """
    return reduce_scatter_s(shard_bytes * members[-1], members, fabric)


def all_to_all_s(buffer_bytes: float, members: Sequence[int], fabric: Fabric,
                 route: tuple[int, int, int] | None = None) -> tuple[float, str]:
    """Direct all-to-all of a per-rank buffer of ``buffer_bytes``: one message to every peer.

    ``route = (top_k, groups, groups per token)``: MoE tokens under group-limited routing with
    the groups laid over the nodes (DeepSeek-V3, arXiv 2412.19437 sec. 3.2.2: a token reaches at
    most 4 nodes; it crosses InfiniBand once per target node and is forwarded over NVLink to its
    experts there). Across nodes a rank then sends ``nodes reached / top_k`` of the flat
    all-to-all's share (each token's ``top_k`` copies become one per node reached: ``min(nodes,
    groups per token x nodes per group)``), and inside its node it forwards ``(m - 1) / m`` of the
    buffer (every copy that lands on the node and belongs to another of its ``m`` GPUs), where the
    flat all-to-all moves only ``(m - 1) / n``. Both tiers run at once (DeepEP overlaps the
    InfiniBand sends with the NVLink forwarding), so the slower one sets the time.
    """
    n = members[-1]
    if n <= 1 or buffer_bytes <= 0:
        return 0.0, "none"
    scale_out = 1.0
    first = members[0]
    nodes = n // first if first else 1
    routed = route is not None and nodes > 1
    if routed:
        top_k, groups, per_token = route  # type: ignore[misc]
        reached = min(nodes, per_token * max(1.0, nodes / groups))
        scale_out = min(1.0, reached / top_k)
    bw_term, alpha, prev = 0.0, 0.0, 1
    for i, tier in enumerate(fabric.tiers):
        m = members[i]
        if m == prev:
            continue
        # the node's own tier (routed): forwarding to the experts inside it
        share = (m - 1) / m if routed and i == 0 else (m - prev) / n * scale_out
        bw_term = max(bw_term, share * buffer_bytes / tier.bw_Bps)
        alpha += tier.latency_s
        prev = m
    return bw_term + alpha, "node-limited" if routed else "direct"


def collective_time_s(kind: CollKind, comm_bytes: float, members: Sequence[int], fabric: Fabric,
                      route: tuple[int, int, int] | None = None) -> tuple[float, str]:
    """Time and algorithm of a collective given its ASTRA-sim ``comm_size`` and group placement
    (``route``: an MoE token all-to-all's group-limited routing, :func:`all_to_all_s`)."""
    if kind == CollKind.ALL_REDUCE:
        return all_reduce_s(comm_bytes, members, fabric)
    if kind == CollKind.ALL_GATHER:
        return all_gather_s(comm_bytes, members, fabric)
    if kind == CollKind.REDUCE_SCATTER:
        return reduce_scatter_s(comm_bytes, members, fabric)
    if kind == CollKind.ALL_TO_ALL:
        return all_to_all_s(comm_bytes, members, fabric, route)
    raise SpecError("comm", f"unsupported collective {kind!r}", [k.name for k in CollKind])


def p2p_time_s(message_bytes: float, tier: int, fabric: Fabric) -> float:
    """One send/recv of ``message_bytes`` over tier ``tier``: ``alpha + S/B``."""
    t = fabric.tiers[tier]
    return t.latency_s + message_bytes / t.bw_Bps
