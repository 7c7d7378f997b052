"""Transient memory of activation recompute: what a layer re-materializes right before its backward.

With recompute, a layer keeps only part of its activations from forward to backward
(``BlockLowering.saved_bytes``). Right before the layer's backward the recompute pass re-runs
the dropped part of the forward, and the tensors it produces that the backward reads stay alive
until that backward is done: one layer's full activations minus its input with ``full``
recompute, the attention core's (scores, softmax, dropout mask / flash output and log-sum-exp)
with ``selective``. :mod:`.assemble` allocates these bytes on the layer's first recompute node
and frees them with the saved activations on its last backward node.

Per block the bytes are the local (per-rank) sizes of the tensors that the re-run forward ops
save for their backward and that the block does not keep anyway. The preferred source is block lowering
itself (``BlockLowering.extra["recompute_bytes"]``); when a lowering does not report it, it is
derived here by running block lowering's placement propagation once more for the block (a few
tens of milliseconds per layer kind) and measuring those tensors with the same local-size rule
block lowering uses for ``saved_bytes``.
"""

from __future__ import annotations

from tensorstage.graph.graph import Graph
from tensorstage.graph.ir import Block, Tensor
from tensorstage.lower.steps import BlockLowering
from tensorstage.parallel.plan import ParallelPlan

#: ``BlockLowering.extra`` key block lowering may set to report the transient bytes directly.
EXTRA_KEY = "recompute_bytes"


def recomputed_saved(blk: Block) -> list[Tensor]:
    """Tensors the backward reads that only the recompute pass re-creates: everything the
    re-run forward ops save for backward (norm statistics included) that the block does not
    keep from forward anyway (its ``saved``); unique, weights excluded."""
    rerun = {op.name for op in blk.recompute}
    kept = {id(t) for t in blk.saved}
    out: dict[int, Tensor] = {}
    for op in blk.forward:
        if f"{op.name}.recompute" not in rerun:
            continue
        for t in op.saved:
            if id(t) not in kept and t.role != "weight":
                out.setdefault(id(t), t)
    return list(out.values())


def recompute_transient_bytes(graph: Graph, plan: ParallelPlan,
                              blocks: dict[str, BlockLowering]) -> dict[str, int]:
    """Per block name: bytes a recompute pass makes live on one rank until the block's backward ends.

    Blocks without recompute nodes get 0. Uses ``extra["recompute_bytes"]`` where block lowering
    reports it, else measures :func:`recomputed_saved` with block lowering's placements.
    """
    out: dict[str, int] = {}
    ctx = None
    for name, low in blocks.items():
        if not low.recompute:
            out[name] = 0
            continue
        reported = low.extra.get(EXTRA_KEY)
        if reported is not None:
            out[name] = int(reported)  # type: ignore[call-overload]
            continue
        blk = graph.blocks().get(name)
        tensors = recomputed_saved(blk) if blk is not None else []
        if not tensors:
            out[name] = 0
            continue
        from tensorstage.lower import blocks as block_lowering  # placement propagation lives there

        if ctx is None:
            ctx = block_lowering._Context.make(graph, plan, True)
        lowerer = block_lowering.BlockLowerer(ctx, name, blk)
        lowerer.lower()
        out[name] = sum(lowerer._saved_bytes(t) for t in tensors)
    return out


__all__ = ["EXTRA_KEY", "recompute_transient_bytes", "recomputed_saved"]
