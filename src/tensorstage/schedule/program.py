"""`Program`: the ordered DAG one *class* of ranks executes, shared by trace writers and the simulator.

Ranks that play the same role (same pipeline stage, same position pattern) share one Program; a
rank is a class plus coordinates. Nothing in a Program names a concrete rank: collectives name
the mesh axes their group spans, and point-to-point nodes name a peer as an offset along an
axis. Writers stamp concrete ``pg_name``/``comm_src``/``comm_dst`` per rank from the `Mesh`.

Node ids are dense ``0..n-1`` in a topological order (every dependency has a smaller id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class NodeKind(IntEnum):
    """Node kinds, numbered as Chakra's ``NodeType``."""

    COMP = 4
    SEND = 5
    RECV = 6
    COLL = 7


class CollKind(IntEnum):
    """Collective kinds, numbered as Chakra's ``CollectiveCommType``."""

    ALL_REDUCE = 0
    ALL_GATHER = 2
    ALL_TO_ALL = 6
    REDUCE_SCATTER = 7


@dataclass(slots=True)
class Node:
    """One operation of a Program.

    ``comm_bytes`` follows ASTRA-sim's convention: all-gather = the per-rank input (the shard),
    reduce-scatter = the full input, all-reduce / all-to-all = the per-rank buffer; send/recv =
    the message. ``tensor_bytes`` of a COMP node is the bytes it reads plus writes (roofline).
    ``mem_alloc_bytes``/``mem_free_bytes`` describe memory that becomes live / dead when the node
    runs (saved activations, gathered parameters, communication buffers) for the memory timeline.
    ``gemm`` = ``(batch, m, n, k)`` of a matmul COMP node (Chakra ``int64_list`` attribute
    ``gemm``).
    """

    id: int
    name: str
    kind: NodeKind
    data_deps: tuple[int, ...] = ()
    ctrl_deps: tuple[int, ...] = ()
    flops: int = 0
    tensor_bytes: int = 0
    comm: CollKind | None = None
    comm_bytes: int = 0
    axes: tuple[str, ...] = ()  # COLL: mesh axes the group spans
    peer_axis: str = ""  # SEND/RECV: peer = rank moved peer_offset steps along peer_axis
    peer_offset: int = 0
    tag: int = 0
    category: str = "fwd"  # fwd | bwd_input | bwd_weight | recompute | optimizer | comm
    op: str = ""  # op kind for breakdowns (matmul, attention, norm, ...)
    layer: int = -1
    microbatch: int = -1
    chunk: int = -1
    mem_alloc_bytes: int = 0
    mem_free_bytes: int = 0
    # COMP: the GEMM this node runs, (batch, m, n, k) per rank, for the compute model's shape
    # efficiency (sim/compute.py); a fused attention core carries its QK^T shape
    # (batch*heads, q_len, kv_len, head_dim) for the measured attention tables (sim/kernels.py);
    # None for other nodes and fused nodes (whose ``op`` lists parts)
    gemm: tuple[int, int, int, int] | None = None
    # COLL all-to-all of MoE tokens under group-limited routing: (top_k, groups, groups per token)
    # (ModelSpec.moe.route_*); the simulator charges one copy per target node across nodes and the
    # forwarding to the experts inside a node (sim/collectives.py all_to_all_s); None = uniform
    route: tuple[int, int, int] | None = None
    # of mem_free_bytes, the part that was allocated by a communication node (FSDP gathered parameters
    # freed by the last node of the use that reshards them): the summary takes it from comm_buffers
    mem_free_comm_bytes: int = 0


@dataclass
class Program:
    """The node list of one rank class, plus what identifies the class.

    ``class_key`` holds the coordinates that define the class (e.g. ``{"pp": 3}``): every rank
    whose coordinates match runs this Program. ``static_bytes`` and ``model_flops`` are facts the
    simulator needs that are not node-local.
    """

    class_key: dict[str, int]
    nodes: list[Node] = field(default_factory=list)
    # Memory resident for the whole step, by category (weights, gradients, optimizer_states, ...).
    static_bytes: dict[str, int] = field(default_factory=dict)
    # Model FLOPs of one step on one rank of this class without recompute (for MFU); the nodes'
    # FLOPs include recompute (for HFU).
    model_flops: int = 0

    def add(self, name: str, kind: NodeKind, **fields: object) -> Node:
        """Append a node with the next id and return it."""
        node = Node(id=len(self.nodes), name=name, kind=kind, **fields)  # type: ignore[arg-type]
        self.nodes.append(node)
        return node

    def communicator_kinds(self) -> set[tuple[str, ...]]:
        return {n.axes for n in self.nodes if n.kind == NodeKind.COLL}
