"""Transient memory of activation recompute: what a layer re-materializes right before its backward.

With recompute, a layer keeps only part of its activations from forward to backward
(``BlockLowering.saved_bytes``). Right before the layer's backward the recompute pass re-runs
the dropped part of the forward, and the tensors it produces that the backward reads stay alive
until that backward is done: one layer's full activations minus its input with ``full``
recompute, the attention core's (scores, softmax, dropout mask / flash output and log-sum-exp)
with ``selective``. :mod:`.assemble` allocates these bytes on the layer's first recompute node
and frees them with the saved activations on its last backward node.

Per block the bytes are the local (per-rank) sizes of the tensors that the re-run forward ops
save for their backward and that the block does not keep anyway (:func:`recomputed_saved`).
Block lowering measures them with its own placements, the same local-size rule as
``saved_bytes``, and reports them as ``BlockLowering.extra["recompute_bytes"]``: only it knows
the final placement of each tensor, so measuring here would mean lowering the block again.
"""

from __future__ import annotations

from tensorstage.graph.ir import Block, Tensor
from tensorstage.lower.steps import BlockLowering

#: ``BlockLowering.extra`` key under which block lowering reports the transient bytes.
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


def recompute_transient_bytes(blocks: dict[str, BlockLowering]) -> dict[str, int]:
    """Per block name: bytes a recompute pass makes live on one rank until the block's backward ends.

    Blocks without recompute nodes get 0, as do lowerings that do not report
    ``extra["recompute_bytes"]`` (hand-built ones in tests).
    """
    out: dict[str, int] = {}
    for name, low in blocks.items():
        reported = low.extra.get(EXTRA_KEY) if low.recompute else None
        out[name] = int(reported) if reported is not None else 0  # type: ignore[call-overload]
    return out


__all__ = ["EXTRA_KEY", "recompute_transient_bytes", "recomputed_saved"]
