"""Context-parallel emission for block lowering: the K/V exchange around the attention core.

Block lowering (:mod:`.blocks`) decides *where* in a pass the attention core sits; this module
decides *what communication* context parallelism puts around it, so the CP protocols (each a
copy of one Transformer Engine / flash-decoding implementation) can be read and changed in one
place without the per-op costing around them.

* ``ring`` (TE's ``AttnFuncWithCPAndKVP2P``): per attention forward ``cp - 1`` SEND/RECV pairs of
  the local K/V block (one buffer) along ``cp`` (send +1, receive -1), interleaved with ``cp``
  chunks of the core so transfers overlap compute; backward runs the ring the other way for
  ``cp`` steps (K/V, then K/V + dK/dV, finally dK/dV; see :meth:`ContextParallelEmitter.ring`).
  When the core is not one fused op the transfers are issued before it instead (:meth:`before`).
* ``allgather`` (TE's ``AttnFuncWithCPAndKVAllGather``): all-gather of K and of V over ``("cp",)``
  before the core; backward all-gathers them again (only the local chunk is saved) and
  reduce-scatters dK and dV. TE supports only the all-gather (or a2a) mode for sliding-window
  layers; ``ring`` on them is costed as for full attention over the window.
* decode: the cache of ``c`` tokens is split, ``c -> c / cp``; the partial outputs and fp32
  log-sum-exp are all-gathered over ``cp`` after the last op reading the cache
  (:meth:`decode_combine`, flash-decoding style).

K/V bytes are the local sequence chunk of each K/V tensor the core reads, TP-local heads
(:meth:`ContextParallelEmitter.kv_parts`).
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil, prod
from typing import TYPE_CHECKING

from tensorstage.graph.ir import Op, Tensor
from tensorstage.lower.chain import NodeList
from tensorstage.lower.op_roles import is_core, reads_kv
from tensorstage.lower.propagate import Placed
from tensorstage.lower.steps import StepNode
from tensorstage.parallel.placement import REPLICATE, Collective, Shard
from tensorstage.schedule.program import CollKind, NodeKind

if TYPE_CHECKING:
    from tensorstage.lower.blocks import BlockLowerer


class ContextParallelEmitter:
    """CP communication of one block's passes; owns the block's p2p tag counter."""

    def __init__(self, lw: BlockLowerer) -> None:
        self.lw = lw
        self.tag = 0
        self.kv_parts = self._kv_parts_bytes()
        self.kv_payload = sum(self.kv_parts)

    def _kv_parts_bytes(self) -> list[int]:
        """Local bytes of each K/V tensor the attention core reads (before GQA repetition; MLA:
        the up-projected K and V): local sequence chunk, TP-local heads."""
        core = [op for op in self.lw.blk.forward if is_core(op)]
        produced = {id(t) for op in core for t in op.outputs}
        kv: dict[int, Tensor] = {}
        for op in core:
            for t in op.inputs:
                if any(d in t.dims for d in ("sk", "skw")) and id(t) not in produced and t.role != "weight":
                    kv[id(t)] = t
        parts = []
        for t in kv.values():
            head = next((d for d in ("nkv", "nh") if d in t.dims), None)
            parts.append(self.lw.local_bytes(t, Shard(head) if head else REPLICATE))
        return parts

    def _next_tag(self) -> int:
        self.tag += 1
        return self.tag

    def _p2p_pair(
        self,
        nl: NodeList,
        name: str,
        nbytes: int,
        category: str,
        deps: set[int | None],
        direction: int = 1,
    ) -> int:
        """Append a SEND (to ``+direction``) / RECV (from ``-direction``) pair along ``cp``; returns
        the RECV's index."""
        tag = self._next_tag()
        out = -1
        for kind, off in ((NodeKind.SEND, direction), (NodeKind.RECV, -direction)):
            node = StepNode(
                f"{name}:{kind.name.lower()}",
                kind,
                category,
                "comm",
                comm_bytes=nbytes,
                peer_axis="cp",
                peer_offset=off,
                tag=tag,
            )
            out = nl.add(node, deps)
        return out

    def ring(self, nl: NodeList, op: Op, placed: Placed, category: str, backward: bool) -> None:
        """The core op split in ``cp`` chunks with the ring transfers interleaved (Transformer
        Engine's ``AttnFuncWithCPAndKVP2P``): the transfer of step i is in flight while chunk i
        computes; chunk i waits for the transfer of step i-1.

        Forward: ``cp - 1`` K/V blocks, sent to ``+1``, received from ``-1``. Backward runs the ring
        the other way (send ``-1``, receive ``+1``) for ``cp`` steps: step 0 sends K/V, steps
        1..cp-2 send K/V together with the dK/dV accumulated so far (one message, twice the
        bytes), the last step sends dK/dV only; the last received dK/dV is added after the last
        chunk (``dkv_update``).
        """
        cp = self.lw.ctx.cp
        node = self.lw.comp(op, placed, category, parts=cp)
        uses = nl.entry(op)
        steps = cp if backward else cp - 1
        chunk = -1
        for i in range(cp):
            recv = None
            if i < steps:
                nbytes = self.kv_payload * (2 if backward and 0 < i < cp - 1 else 1)
                name = f"{op.name}.{'dkv' if backward and i == cp - 1 else 'kv'}{i}"
                recv = self._p2p_pair(nl, name, nbytes, category, uses, -1 if backward else 1)
            chunk = nl.add(replace(node, name=f"{op.name}.chunk{i}"), uses)
            nl.stream(chunk)
            uses = {chunk, recv}
        if backward and cp > 1:
            numel = self.kv_payload // max(self.lw.ctx.act_bytes, 1)
            update = StepNode(
                f"{op.name}.dkv_update",
                NodeKind.COMP,
                category,
                "elementwise",
                flops=numel,
                tensor_bytes=3 * self.kv_payload,
            )
            chunk = nl.add(update, uses)
        nl.stream(chunk, op.outputs)

    def before(self, nl: NodeList, op: Op, cat: str, backward: bool) -> None:
        """CP exchange before a core that is not split in chunks (ring) or all-gather mode."""
        c = self.lw.ctx
        if c.plan.cp_mode == "ring":
            steps = c.cp if backward else c.cp - 1
            deps = nl.entry(op)
            recvs = []
            for i in range(steps):
                nbytes = self.kv_payload * (2 if backward and 0 < i < c.cp - 1 else 1)
                recv = self._p2p_pair(nl, f"{op.name}.kv{i}", nbytes, cat, deps, -1 if backward else 1)
                recvs.append(recv)
                deps = {recv}
            nl.pending.extend(recvs)
            return
        # TE's AttnFuncWithCPAndKVAllGather gathers K and V separately, again in backward
        kv = [t for t in op.inputs if reads_kv(t)]
        for i, part in enumerate(self.kv_parts):
            ag = Collective.make(CollKind.ALL_GATHER, ("cp",), part, c.cp)
            nl.comm(
                self.lw.coll(f"{op.name}.{'kv'[i] if i < 2 else i}", ag, cat), kv[i] if i < len(kv) else None
            )

    def after(self, nl: NodeList, op: Op, cat: str, backward: bool) -> None:
        """All-gather mode backward: reduce-scatter dK and dV (full-sequence gradients)."""
        c = self.lw.ctx
        if not backward or c.plan.cp_mode == "ring":
            return
        grads = [t for t in op.outputs if reads_kv(t)]
        for i, part in enumerate(self.kv_parts):
            rs = Collective.make(CollKind.REDUCE_SCATTER, ("cp",), part * c.cp, c.cp)
            node = self.lw.coll(f"{op.name}.d{'kv'[i] if i < 2 else i}", rs, cat)
            nl.comm(node, grads[i] if i < len(grads) else op.outputs[0])

    def decode_combine(self, nl: NodeList, op: Op, placed: Placed, cat: str) -> None:
        """Decode with CP: all-gather each rank's partial attention output and fp32 log-sum-exp."""
        out = op.outputs[0]
        p = placed.outputs[0]
        nbytes = self.lw.local_bytes(out, p)
        shape, dims = self.lw.shape(out)
        per_row = shape[-1]
        rows = prod(shape) // max(per_row, 1)
        if isinstance(p, Shard) and p.dim in dims:
            rows = ceil(rows / self.lw.ctx.tp)
        nbytes += rows * 4
        ag = Collective.make(CollKind.ALL_GATHER, ("cp",), nbytes, self.lw.ctx.cp)
        nl.comm(self.lw.coll(f"{op.name}.cp_combine", ag, cat), out)


__all__ = ["ContextParallelEmitter"]
