"""Expert-parallel emission for block lowering: MoE token dispatch and combine over ``ep``.

Follows Megatron-core's alltoall token dispatcher, so the MoE communication protocol lives in
one place apart from the per-op costing in :mod:`.blocks`:

* forward, at the ``dispatch`` op: a counts all-to-all (``e`` int64 per rank) before it, then
  the token all-to-all over ``("ep",)`` after it (:func:`~tensorstage.parallel.apply.ep_alltoall`,
  sized by top-k, capacity factor and routing skew);
* at the ``combine`` op (forward and backward): the combine all-to-all before it; backward's
  dispatch gradient is the token all-to-all again (no counts: the split sizes are known).
* group-limited routing (``moe.route_groups``/``route_topk_groups``, DeepSeek-V3's node-limited
  routing): the token all-to-alls carry ``route = (top_k, groups, groups per token)`` so that the
  simulator charges one copy per target node across nodes plus the forwarding inside a node
  (:func:`tensorstage.sim.collectives.all_to_all_s`); the byte counts stay those of the flat
  all-to-all (what a Chakra trace records).
* ``moe_dispatch_fp8`` (DeepSeek-V3): the all-to-alls toward the experts (forward dispatch, the
  backward's combine gradient) carry FP8 rows with per-128 fp32 scales; the ones back to the tokens
  stay in the activation dtype.

The TP all-gather of the received rows before the expert-TP matmuls and the reduce-scatter after
them (all-reduces without SP; Megatron requires SP for MoE+TP) are not emitted here: they are
placement changes of the routed tensors that :mod:`.propagate` reports like any other TP change.
The counts all-to-all follows torchtitan / tests/torchref (newer Megatron all-gathers the counts
over tp x ep, and also moves one fp32 routing probability per row; both are a few KB).
"""

from __future__ import annotations

from math import ceil
from typing import TYPE_CHECKING

from tensorstage.graph.ir import Op
from tensorstage.lower.chain import NodeList
from tensorstage.parallel.apply import ep_alltoall
from tensorstage.parallel.placement import Collective
from tensorstage.schedule.program import CollKind

if TYPE_CHECKING:
    from tensorstage.lower.blocks import BlockLowerer


class ExpertParallelEmitter:
    """EP all-to-alls of one block's passes (a no-op with ``ep == 1``)."""

    def __init__(self, lw: BlockLowerer) -> None:
        self.lw = lw

    def before(self, nl: NodeList, op: Op, cat: str, backward: bool) -> None:
        """Combine all-to-all before ``combine``; counts all-to-all before a forward ``dispatch``."""
        c = self.lw.ctx
        if op.kind == "combine" and c.ep > 1:
            nl.comm(self.lw.coll(f"{op.name}.a2a", self._a2a()[1], cat, self._route()), op.inputs[0])
        if op.kind == "dispatch" and c.ep > 1 and not backward:
            counts = Collective.make(CollKind.ALL_TO_ALL, ("ep",), self._experts() * 8, c.ep)
            nl.comm(self.lw.coll(f"{op.name}.counts", counts, cat))

    def after(self, nl: NodeList, op: Op, cat: str) -> None:
        """Token all-to-all after ``dispatch`` (forward) or its gradient (backward)."""
        if op.kind == "dispatch" and self.lw.ctx.ep > 1:
            nl.comm(self.lw.coll(f"{op.name}.a2a", self._a2a()[0], cat, self._route()), op.outputs[0])

    def _route(self) -> tuple[int, int, int] | None:
        moe = self.lw.ctx.graph.spec.moe
        if moe is None or not moe.route_groups:
            return None
        return moe.top_k, moe.route_groups, moe.route_topk_groups

    def _experts(self) -> int:
        spec = self.lw.ctx.graph.spec
        return spec.moe.num_experts if spec.moe else 1

    def _a2a(self) -> list[Collective]:
        """(dispatch, combine) all-to-alls of this rank's tokens (SP: its TP shard of them)."""
        c = self.lw.ctx
        moe = c.graph.spec.moe
        assert moe is not None
        tokens = self.lw.tokens() // (c.tp if c.sp else 1)
        cf = None if c.dropless else float(c.graph.bindings["cf"])
        h = c.graph.spec.hidden
        both = ep_alltoall(tokens, h, moe.top_k, c.act_bytes, c.ep, cf, c.graph.options.routing_skew)
        if not c.plan.moe_dispatch_fp8:
            return both
        # DeepSeek-V3 (arXiv 2412.19437, sec. 3.3.2): the activations entering the experts' up-projection
        # (forward) and the gradients entering their down-projection (backward) travel in FP8 with one
        # fp32 scale per 128 elements; the combines stay BF16. Rows of h + 4 * ceil(h / 128) bytes.
        fp8 = ep_alltoall(tokens, h + 4 * ceil(h / 128), moe.top_k, 1, c.ep, cf, c.graph.options.routing_skew)
        return [fp8[0], both[1]]


__all__ = ["ExpertParallelEmitter"]
