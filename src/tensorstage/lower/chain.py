"""The node list of one pass (forward, recompute or backward) with data-flow dependencies.

Two modes. ``overlap=True`` — why not a plain chain: Megatron overlaps model-parallel communication with independent compute —
in backward the input-gradient all-reduce (reduce-scatter with SP) runs during the weight-gradient
GEMM, and SP's re-gather of a layer input runs during the input-gradient GEMM. A chain would
serialise them. Here compute nodes form one stream (each depends on the previous compute node)
and every communication node depends only on what produces its data (or, for data from outside
the list, on the compute node before it: its issue point); a compute node waits for the
communication of the tensors it reads. Forward TP collectives stay blocking because their
consumer comes right after them. ``overlap=False`` keeps the same order but makes every node
wait for the one before it (communication blocks the stream): the simulator models concurrent
kernels without their contention for SMs and memory bandwidth, and Korthikanti et al.'s measured
layer times (SP backward 11.8 ms vs 11.9 ms without) show the async overlap gains little in practice.

``pipelined=True`` (with ``overlap``) adds Megatron-Core's ``--tp-comm-overlap`` (Transformer
Engine userbuffers): an SP all-gather over ``tp`` that feeds a GEMM runs *during* that GEMM (the
GEMM is split into TP chunks, each computed as its slice arrives; linear layers only, not attention), and a reduce-scatter over
``tp`` of a GEMM's output runs during the GEMM that produces it (chunk by chunk). Here the pair
starts together: the GEMM does not wait for its all-gather and the reduce-scatter does not wait
for its GEMM; whatever reads the GEMM's (or the reduce-scatter's) output waits for both. The
exposed time is ``max(0, comm - gemm)``, plus the simulator's overlap slowdown of the GEMM while
the transfer is in flight. The GEMM itself runs as Transformer Engine runs it: in chunks over its
tokens (:func:`split_gemm`: ``tp`` chunks for the "ring_exchange" all-gather overlaps of the qkv/fc1
forward and proj/fc2 input gradient, :data:`TE_PIPELINE_SPLITS` for the "pipeline" reduce-scatter
overlaps of the proj/fc2 forward; weight gradients run whole), each chunk timed at its own shape.
The one chunk a real pipeline cannot hide (``min(comm, gemm) / tp``) is not charged (an
optimistic approximation, documented in docs/calibration.md).

Indices are positions in :attr:`NodeList.nodes` (every dependency points backwards). Zero-cost
ops (views) emit no node: their outputs inherit the producer and pending communication of their
inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from tensorstage.graph.ir import Op, Tensor
from tensorstage.lower.steps import StepNode
from tensorstage.schedule.program import CollKind, NodeKind
from tensorstage.sim.compute import FUSED_PREFIX, fused_op


@dataclass
class NodeList:
    """Nodes of one pass and the bookkeeping that derives their dependencies."""

    #: False: communication joins the stream (every node waits for the previous one), as measured
    #: Megatron timings behave; True: data-flow dependencies (perfect compute/communication overlap)
    overlap: bool = True
    #: Megatron-Core ``--tp-comm-overlap``: TP all-gather / reduce-scatter run during the GEMM they
    #: feed / drain (needs ``overlap``; see module docstring)
    pipelined: bool = False
    #: TP degree: Transformer Engine's ring-exchange overlap splits an all-gather-fed GEMM into this
    #: many chunks (``TE_PIPELINE_SPLITS`` for a reduce-scatter-drained one; see module docstring)
    tp: int = 1
    nodes: list[StepNode] = field(default_factory=list)
    last_comp: int | None = None  # the stream's tail (any node kind when not overlapping)
    producer: dict[int, int] = field(default_factory=dict)  # tensor id -> compute node index
    ready: dict[int, frozenset[int]] = field(default_factory=dict)  # tensor id -> comm nodes to await
    pending: list[int] = field(default_factory=list)  # comm nodes the next compute node awaits
    deferred: set[int] = field(default_factory=set)  # TP all-gathers pipelined with their GEMMs
    epilogue: dict[int, int] = field(default_factory=dict)  # bias-add node -> the GEMM it finishes
    linear: set[int] = field(default_factory=set)  # GEMM nodes of linear layers (they read a weight)

    def add(self, node: StepNode, deps: Iterable[int | None]) -> int:
        """Append ``node`` with explicit ``deps`` (``None`` entries dropped); returns its index."""
        self.nodes.append(replace(node, deps=tuple(sorted({d for d in deps if d is not None}))))
        return len(self.nodes) - 1

    def waits(self, tensors: Iterable[Tensor]) -> set[int]:
        """Communication nodes that must finish before ``tensors`` can be read."""
        out: set[int] = set()
        for t in tensors:
            out |= self.ready.get(id(t), frozenset())
        return out

    def comm(self, node: StepNode, tensor: Tensor | None = None) -> int:
        """A collective moving ``tensor`` (``None``: it only gates the next compute node)."""
        if tensor is None:
            i = self.add(node, (self.last_comp,))
            self.pending.append(i)
            if not self.overlap:
                self.last_comp = i
            return i
        if self.overlap:
            src = self.producer.get(id(tensor), self.last_comp)
            gemm = self._gemm_of(src) if self.pipelined and _tp_scatter(node) else None
            if gemm is not None:
                # GEMM + reduce-scatter pipelined: start with the GEMM (wait for what it waits for);
                # a forward GEMM runs in TE's "pipeline" method, TE_PIPELINE_SPLITS chunks
                if self.nodes[gemm].category == "fwd":
                    self.nodes[gemm] = split_gemm(self.nodes[gemm], TE_PIPELINE_SPLITS)
                i = self.add(node, (*self._deps_of(gemm), *self.ready.get(id(tensor), ())))
            else:
                i = self.add(node, (src, *self.ready.get(id(tensor), ())))
        else:
            i = self.add(node, (self.last_comp,))
        self.ready[id(tensor)] = frozenset({i})
        if not self.overlap:
            self.last_comp = i
        return i

    def comp(self, node: StepNode, op: Op) -> int | None:
        """The compute node of ``op`` (skipped when it costs nothing: a view)."""
        comms = set(self.pending) | self.waits(op.inputs)
        self.pending = []
        if node.flops == 0 and node.tensor_bytes == 0:
            src = [self.producer[id(t)] for t in op.inputs if id(t) in self.producer]
            for o in op.outputs:
                self.ready[id(o)] = frozenset(comms)
                if src:
                    self.producer[id(o)] = max(src)
            return None
        deferred: set[int] = set()
        epilogue_of: int | None = None
        linear = node.gemm is not None and any(t.role == "weight" for t in op.inputs)
        if self.overlap and self.pipelined:
            if linear:
                # all-gather + GEMM pipelined: the GEMM starts with its all-gather; readers of the
                # GEMM's output wait for both
                deferred = {j for j in comms if _tp_gather(self.nodes[j])}
                self.deferred |= deferred
                if deferred and node.category in ("fwd", "bwd_input"):
                    # TE's "ring_exchange" method: the GEMM runs chunk by chunk as the tp slices
                    # of its gathered input arrive (qkv/fc1 forward, proj/fc2 input gradient)
                    node = split_gemm(node, self.tp)
            elif _bias_epilogue(op) and self.last_comp in self.linear:
                # a bias add runs in the GEMM's epilogue (Transformer Engine): it is part of the GEMM
                deferred = set(comms) & self.deferred
                epilogue_of = self.last_comp
            comms = set(comms) - deferred
        i = self.add(node, (self.last_comp, *comms) if self.overlap else (self.last_comp,))
        self.stream(i, op.outputs)
        if linear:
            self.linear.add(i)
        if epilogue_of is not None:
            self.epilogue[i] = epilogue_of
        if deferred:
            for o in op.outputs:
                self.ready[id(o)] = frozenset(deferred)
        return i

    def _deps_of(self, i: int) -> tuple[int, ...]:
        d = self.nodes[i].deps
        return () if d is None else d

    def _gemm_of(self, i: int | None) -> int | None:
        """The linear-layer GEMM node ``i`` is (or whose bias epilogue ``i`` is), else None."""
        if i is None:
            return None
        if i in self.linear:
            return i
        return self.epilogue.get(i)

    def stream(self, i: int, outputs: Iterable[Tensor] = ()) -> None:
        """Make compute node ``i`` the stream's tail and the producer of ``outputs``."""
        if self.nodes[i].kind == NodeKind.COMP or not self.overlap:
            self.last_comp = i
        for o in outputs:
            self.producer[id(o)] = i
            self.ready.pop(id(o), None)

    def entry(self, op: Op) -> set[int | None]:
        """What a hand-built sequence for ``op`` (a CP ring) must wait for before it starts."""
        deps: set[int | None] = {self.last_comp, *self.pending, *self.waits(op.inputs)}
        self.pending = []
        return deps


#: Transformer Engine's default ``num_splits`` for its "pipeline" GEMM + reduce-scatter overlap
#: (``transformer_engine/pytorch/module/base.py`` ``initialize_ub``: 4 for "pipeline", tp for
#: "ring_exchange"; methods: ring_exchange = qkv_fprop, fc1_fprop, proj_dgrad, fc2_dgrad; pipeline =
#: proj_fprop, fc2_fprop; bulk = the dgrad/wgrad overlaps, which run the whole GEMM)
TE_PIPELINE_SPLITS = 4


def split_gemm(node: StepNode, splits: int) -> StepNode:
    """``node``'s GEMM run as ``splits`` GEMMs over chunks of its rows (the token dim ``m``), as
    Transformer Engine's comm-GEMM overlap computes it: the same FLOPs and bytes, each chunk timed at
    its own (smaller) shape and paying its own launch (a fused node of the chunks,
    :func:`tensorstage.sim.compute.fused_op`). Unchanged when it cannot split."""
    g = node.gemm
    if g is None or splits <= 1 or g[1] < splits or node.op.startswith(FUSED_PREFIX):
        return node
    b, m, n, k = g
    ends = [m * (i + 1) // splits for i in range(splits)]  # chunk boundaries over the m rows
    starts = [0, *ends[:-1]]

    def share(total: int, lo: int, hi: int) -> int:  # the chunk's part of ``total`` (parts sum to it)
        return total * hi // m - total * lo // m

    parts = [(node.op, share(node.flops, lo, hi), share(node.tensor_bytes, lo, hi), node.category, (b, hi - lo, n, k))
             for lo, hi in zip(starts, ends, strict=True)]
    return replace(node, op=fused_op(parts), gemm=None)


def _bias_epilogue(op: Op) -> bool:
    """A bias add (an ``add`` reading a weight): GEMM libraries fuse it into the GEMM's epilogue."""
    return op.kind == "add" and any(t.role == "weight" for t in op.inputs)


def _tp_gather(node: StepNode) -> bool:
    """An all-gather over the TP group alone (SP's gather before a column-parallel GEMM)."""
    return node.kind == NodeKind.COLL and node.comm == CollKind.ALL_GATHER and node.axes == ("tp",)


def _tp_scatter(node: StepNode) -> bool:
    """A reduce-scatter over the TP group alone (SP's scatter after a row-parallel GEMM)."""
    return node.kind == NodeKind.COLL and node.comm == CollKind.REDUCE_SCATTER and node.axes == ("tp",)
