"""The contract between the two halves of the lowering.

The lowering turns ``Graph + ParallelPlan`` into one :class:`~tensorstage.schedule.program.Program`
per rank class. It is split in two so each half has one job:

* :mod:`tensorstage.lower.blocks` (**block lowering**) shards every *block* of the graph
  (embedding, each layer kind, head) by the plan's TP / SP / CP / EP placements and returns, per
  block, the per-rank node chains of **one micro-batch**: forward, recompute, backward (input- and
  weight-grad nodes, in autodiff order, told apart by ``category``), with the model-parallel
  collectives (TP all-reduce / SP all-gather + reduce-scatter, vocab-parallel reductions, CP ring
  send/recv or KV all-gather, EP all-to-all) already inserted, plus the per-rank facts the step
  assembly needs (saved activation bytes, boundary message bytes, local weights, optimizer ops).
  It knows nothing of micro-batches, pipeline stages, DP or ZeRO.
* :mod:`tensorstage.lower.assemble` (**step assembly**) places blocks on pipeline stages, expands
  the pipeline order (:func:`tensorstage.schedule.pipeline.pipeline_order`) into node chains per
  micro-batch with stage-boundary send/recv, adds everything data parallelism and ZeRO/FSDP imply
  (bucketed gradient all-reduce / reduce-scatter overlapped with backward, parameter all-gathers
  with prefetch, optimizer step on the local shard, post-step all-gather for ZeRO-1/2), memory
  (``static_bytes``, ``mem_alloc_bytes``/``mem_free_bytes``) and ``model_flops``.

Both halves use the types below. Numbers are per rank and exact integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tensorstage.schedule.program import CollKind, NodeKind


@dataclass(frozen=True, slots=True)
class StepNode:
    """One node of a block's per-micro-batch chain on one rank (a template for a Program node).

    ``deps`` are indices into the *same list* this node is in; ``None`` means "the previous node
    of the list" (a chain; the first node of a list then depends on whatever the assembly puts
    before the list). ``flops`` = matrix + vector FLOPs (2 per multiply-add) this rank executes;
    ``tensor_bytes`` = bytes it reads plus writes. Collectives follow ``Node.comm_bytes``'s
    ASTRA-sim convention. SEND/RECV (CP ring) name the peer as ``peer_axis`` / ``peer_offset`` and
    carry ``tag``, unique within the block's list for one micro-batch; the assembly makes it
    globally unique by combining it with (micro-batch, layer).
    """

    name: str
    kind: NodeKind
    category: str  # fwd | bwd_input | bwd_weight | recompute | optimizer
    op: str = ""  # op kind for breakdowns: matmul, attention, norm, elementwise, loss, comm, ...
    flops: int = 0
    tensor_bytes: int = 0
    comm: CollKind | None = None
    comm_bytes: int = 0
    axes: tuple[str, ...] = ()
    peer_axis: str = ""
    peer_offset: int = 0
    tag: int = 0
    deps: tuple[int, ...] | None = None
    gemm: tuple[int, int, int, int] | None = None  # (batch, m, n, k) of a matmul on this rank
    route: tuple[int, int, int] | None = None  # MoE token all-to-all: see Node.route


@dataclass(frozen=True, slots=True)
class LocalWeight:
    """One weight tensor of a block as this rank holds it before any ZeRO/FSDP sharding.

    ``numel`` is the local element count after TP / EP (vocab padding included); ``expert`` weights
    reduce gradients over the expert-data-parallel axes (``edp``), the others over ``cp``+``dp``.
    ``dims`` are the graph-IR dim names (for :meth:`ParallelPlan.param_sharding`). ``shape`` is the
    local shape (same order as ``dims``, product ``numel``) when known: ZeRO-3/FSDP pads dim 0 to
    a multiple of the shard group (as torch FSDP2 does), which needs it; empty means "flat"
    (dim 0 = ``numel``).
    """

    name: str
    dims: tuple[str, ...]
    numel: int
    expert: bool = False
    shape: tuple[int, ...] = ()


@dataclass
class BlockLowering:
    """One block (one layer instance of a kind, or embedding / head) sharded for one rank.

    Chains are for **one micro-batch** of ``plan.micro_batch`` sequences. ``optimizer`` holds the
    block's optimizer-step nodes for the TP/EP-local weights, *not yet* divided by ZeRO sharding
    (the assembly scales them by the ZeRO shard factor). ``saved_bytes`` is what the block keeps
    from forward to backward per micro-batch under the recompute policy; ``output_bytes`` the
    local size of its output (the activation a stage boundary sends; the gradient sent back has
    the same size). ``model_flops`` = forward + backward FLOPs of one micro-batch on this rank
    without recompute (for MFU).
    """

    block: str  # "embedding" | layer kind | "head"
    forward: list[StepNode]
    recompute: list[StepNode]
    backward: list[StepNode]
    optimizer: list[StepNode]
    weights: list[LocalWeight]
    saved_bytes: int
    output_bytes: int
    model_flops: int
    # per-micro-batch KV-cache bytes this block writes (prefill) or reads (decode) on this rank
    kv_cache_bytes: int = 0
    extra: dict[str, object] = field(default_factory=dict)
