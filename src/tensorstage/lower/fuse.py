"""Fuse runs of compute nodes in a block's chains: fewer nodes, the same simulated time.

Why: a training step is (micro-batches x layers x ~70 graph ops) nodes per stage; the 1T
Megatron case (PP 64, 512 micro-batches) has ~5 M of them, and both the step assembly and the
simulator cost a few microseconds per node. Between two communication nodes the compute stream
runs the block's kernels back to back, so a run of COMP nodes can be one node whose ``op``
lists its parts (:func:`tensorstage.sim.compute.fused_op`); the simulator charges the sum of
the parts' own roofline times (launch overheads included), i.e. exactly the unfused run, and
splits the time back over the parts' ops and categories for the breakdowns.

A run is a sequence of consecutive COMP nodes in list order where every node after the first
depends only on nodes of the run or on nodes the first one depends on, and every node but the
last is used only inside the run (so the run starts once, when its first node could, and hands
one result on). Runs
do not cross categories when ``split_backward`` (zero-bubble schedules split a backward into
input- and weight-gradient actions by ``category``); otherwise input- and weight-gradient nodes
may share a run (the fused node's category is then ``bwd``; the breakdowns still split it by part). Optimizer lists are left alone: the assembly rescales their FLOPs and bytes by the
ZeRO shard factor, which a fused op string would not follow.

Limits of the equivalence: the simulator decides the overlap slowdown of a fused node at its
start (as it already does for merged chains), so the slowdown's share moves between the parts
of the breakdown (the step time stays the same when the communication ends within the run), and a lower-id compute node that becomes ready
while a run executes can no longer cut in between its parts (the engine's merged chains fall
back to node-by-node simulation in that case). Chakra traces of fused programs carry the run's
summed ``num_ops`` and ``tensor_size`` in one node.
"""

from __future__ import annotations

from dataclasses import replace

from tensorstage.lower.steps import BlockLowering, StepNode
from tensorstage.schedule.program import NodeKind
from tensorstage.sim.compute import FUSED_PREFIX, fused_op

_BACKWARD = {"bwd_input", "bwd_weight"}


def _deps(nodes: list[StepNode], i: int) -> tuple[int, ...]:
    if nodes[i].deps is None:
        return (i - 1,) if i else ()
    return nodes[i].deps


def fuse_list(nodes: list[StepNode], split_backward: bool = True) -> list[StepNode]:
    """``nodes`` with every run of fusible COMP nodes replaced by one fused node (see module doc)."""
    n = len(nodes)
    if n < 2:
        return list(nodes)
    deps = [_deps(nodes, i) for i in range(n)]
    last_use = list(range(n))  # highest index consuming each node (itself if none)
    for i in range(n):
        for d in deps[i]:
            last_use[d] = max(last_use[d], i)

    def compatible(a: StepNode, b: StepNode) -> bool:
        if a.kind != NodeKind.COMP or b.kind != NodeKind.COMP:
            return False
        if a.op.startswith(FUSED_PREFIX) or b.op.startswith(FUSED_PREFIX):
            return False
        return a.category == b.category or (not split_backward and {a.category, b.category} <= _BACKWARD)

    # candidate runs: consecutive compatible nodes whose dependencies (after the first) lie inside the
    # run or among the first node's dependencies (already met when the run starts)
    runs: list[list[int]] = []
    allowed: set[int] = set()
    for i in range(n):
        r = runs[-1] if runs else None
        if r is not None and compatible(nodes[i - 1], nodes[i]) and deps[i] and set(deps[i]) <= allowed:
            r.append(i)
        else:
            runs.append([i])
            allowed = set(deps[i])
        allowed.add(i)
    groups = [g for r in runs for g in _split(r, deps, last_use)]
    if len(groups) == n:
        return list(nodes)
    new_index = [0] * n
    for g, members in enumerate(groups):
        for i in members:
            new_index[i] = g
    out: list[StepNode] = []
    for members in groups:
        first = nodes[members[0]]
        fdeps = first.deps if first.deps is None else tuple(new_index[d] for d in first.deps)
        if len(members) == 1:
            out.append(replace(first, deps=fdeps))
            continue
        parts = [nodes[i] for i in members]
        cats = {p.category for p in parts}
        category = first.category if len(cats) == 1 else "bwd"
        out.append(
            StepNode(
                name=f"{first.name}..{parts[-1].name}",
                kind=NodeKind.COMP,
                category=category,
                op=fused_op([(p.op, p.flops, p.tensor_bytes, p.category, p.gemm) for p in parts]),
                flops=sum(p.flops for p in parts),
                tensor_bytes=sum(p.tensor_bytes for p in parts),
                deps=fdeps,
            )
        )
    return out


def _split(run: list[int], deps: list[tuple[int, ...]], last_use: list[int]) -> list[list[int]]:
    """``run`` cut into pieces that are each one node: no member but the last is used after the
    piece, and no member but the first depends on a node before the piece."""
    end = run[-1]
    cut = next((k for k, m in enumerate(run[:-1]) if last_use[m] > end), None)
    if cut is None:
        allowed = set(run) | set(deps[run[0]])
        cut = next((k - 1 for k, m in enumerate(run) if k and not set(deps[m]) <= allowed), None)
    if cut is None:
        return [run]
    return _split(run[: cut + 1], deps, last_use) + _split(run[cut + 1 :], deps, last_use)


def fuse_block(block: BlockLowering, split_backward: bool = True) -> BlockLowering:
    """A copy of ``block`` with its forward, recompute and backward chains fused."""
    return replace(
        block,
        forward=fuse_list(block.forward, split_backward),
        recompute=fuse_list(block.recompute, split_backward),
        backward=fuse_list(block.backward, split_backward),
    )


def fuse_blocks(blocks: dict[str, BlockLowering], split_backward: bool = True) -> dict[str, BlockLowering]:
    """:func:`fuse_block` over every block of a lowering (same keys and order)."""
    return {name: fuse_block(b, split_backward) for name, b in blocks.items()}
