"""Sequence parallelism of an embedding with learned positions (Megatron's ``LanguageModelEmbedding``).

Plain placement propagation would reduce-scatter the vocab-parallel lookup straight into the SP
region; Megatron instead all-reduces the lookup, adds the positions on the full sequence and
scatters (slices) the sum into the SP region; backward all-gathers the gradient before the add,
so the position table's gradient is complete on every TP rank. This exception to the generic
rule is kept here, out of :mod:`.blocks`, and only applies to the ``embedding`` block with SP on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensorstage.graph.ir import Op
from tensorstage.lower.chain import NodeList
from tensorstage.lower.propagate import Change
from tensorstage.parallel.placement import REPLICATE

if TYPE_CHECKING:
    from tensorstage.lower.blocks import BlockLowerer


class LearnedPositionSP:
    """Hooks of one block's passes; inactive unless the block is an SP embedding with learned positions."""

    def __init__(self, lw: BlockLowerer) -> None:
        self.lw = lw
        self.hook = self._find()

    def _find(self) -> tuple[Op, Op] | None:
        """(token lookup, position add) of the embedding block, or None when not applicable."""
        c = self.lw.ctx
        if not (c.sp and self.lw.name == "embedding" and c.graph.spec.positions == "learned"):
            return None
        fwd = self.lw.blk.forward
        tok = next((op for op in fwd if op.kind == "gather" and "v" in op.inputs[0].dims), None)
        if tok is None:
            return None
        add = next((op for op in fwd if op.kind == "add" and tok.outputs[0] in op.inputs), None)
        return (tok, add) if add is not None else None

    def reduce(self, nl: NodeList, op: Op, cat: str) -> None:
        """Forward, after ``op``: all-reduce the lookup; the add's output is scattered (a free slice)."""
        if self.hook is None:
            return
        tok, add = self.hook
        prop = self.lw.prop
        if op is tok:
            y = op.outputs[0]
            changes: list[Change] = []
            prop.need(y, REPLICATE, changes)
            self.lw.changes(nl, changes, cat)
            prop.set(y, REPLICATE)
        elif op is add:
            prop.set(op.outputs[0], prop.home(op.outputs[0]))

    def grad_gather(self, nl: NodeList, op: Op) -> None:
        """Backward, before ``op``: all-gather the gradient of the position add's output."""
        if self.hook is None:
            return
        prop = self.lw.prop
        grad_name = f"{self.hook[1].outputs[0].name}.grad"
        for t in op.inputs:
            if t.name == grad_name and prop.get(t) != REPLICATE:
                changes: list[Change] = []
                prop.need(t, REPLICATE, changes)
                self.lw.changes(nl, changes, op.category)
                prop.set(t, REPLICATE)


__all__ = ["LearnedPositionSP"]
