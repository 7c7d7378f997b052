"""Step assembly: per-block, per-micro-batch chains -> one :class:`Program` per pipeline stage.

Input is what :mod:`tensorstage.lower.blocks` produces (see :mod:`tensorstage.lower.steps`): for
each block (embedding, each layer kind, head) the node chains of one micro-batch on one rank,
model-parallel collectives included. This module adds everything that depends on *where* and
*when* a block runs:

* **Stages.** Layers go to virtual stages with :func:`~tensorstage.schedule.microbatch.
  assign_layers` (``pp_layer_split`` allowed); the embedding joins virtual stage 0 and the head
  (final norm, LM head, loss) the last one. Ranks of one pipeline stage are symmetric, so there
  is one Program per ``pp`` coordinate (``class_key {"pp": r}``).
* **Schedule.** :func:`~tensorstage.schedule.pipeline.pipeline_order` is expanded action by
  action: ``F`` = forward lists in layer order; ``B`` = recompute + backward per block in
  reverse layer order; zero-bubble ``I`` = recompute + the backward nodes that are not weight
  gradients, ``W`` = the weight-gradient nodes (``category == "bwd_weight"``). An ``I`` node
  listed after a ``W`` node of the same block depends on the previous ``I`` node instead (a
  weight gradient feeds nothing an input gradient needs, so such a dependency is list order
  only). Each action's first node has a control dependency on the previous action's last node,
  so no consumer can reorder the compute. Stage-boundary messages
  (:func:`~tensorstage.schedule.pipeline.p2p_plan`) become a RECV before the action and a SEND
  after it (nothing waits for a SEND), peers ``pp +- 1`` (the mesh wraps, which is the
  interleaved schedule's last-rank -> rank-0 hop), ``comm_bytes`` the boundary block's
  ``output_bytes``, tags the schedule's. Block-internal send/recv tags (CP ring) are made
  globally unique as ``base + ((mb * slots + slot) * 3 + list) * stride + tag``, above all
  pipeline tags.
* **Data parallelism, tied embeddings, finalize + optimizer** (training only): emitted by
  :mod:`.dp_emission` at hooks of the schedule expansion (its docstring has the rules).
* **Inference** (``phase`` prefill/decode): the forward actions of the schedule only (micro-batch
  order, GPipe-like), no DP, no optimizer; KV-cache bytes are static memory.
* **Memory**: ``static_bytes`` (weights, gradients, optimizer states, master weights per ZeRO
  stage; ``kv_cache`` for inference); ``mem_alloc_bytes = saved_bytes`` on each block's last
  forward node per micro-batch, freed by its last backward node (``W`` for zero-bubble); with
  recompute, the tensors the recompute pass re-creates for the backward
  (:mod:`.recompute_memory`: one layer's activations minus its input for ``full``, the attention
  core's for ``selective``) alloc on the block's first recompute node and free with the saved
  ones; ZeRO-3 gathered parameters alloc on the gather, free at the end of the use that reshards.
* ``model_flops`` = micro-batches x the blocks' ``model_flops``.

Nothing here loops over ranks other than the ``pp`` stages; cost is linear in nodes per stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tensorstage.gcpause import paused_gc
from tensorstage.graph.dims import dtype_bytes
from tensorstage.graph.graph import Graph
from tensorstage.lower.dataparallel import (
    UnitComm,
    grad_elem_bytes,
    static_bytes,
    unit_comm,
)
from tensorstage.lower.dp_emission import DataParallelEmitter
from tensorstage.lower.recompute_memory import recompute_transient_bytes
from tensorstage.lower.steps import BlockLowering, LocalWeight, StepNode
from tensorstage.parallel.mesh import Mesh
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.microbatch import assign_layers
from tensorstage.schedule.pipeline import Action, Kind, StepComm, p2p_plan, pipeline_order
from tensorstage.schedule.program import Node, NodeKind, Program

LIST_FWD, LIST_REC, LIST_BWD = 0, 1, 2


def _resolve(steps: Sequence[StepNode], block: str, which: str) -> list[tuple[int, ...]]:
    """In-list dependencies with ``None`` made explicit; every index must point backwards."""
    out: list[tuple[int, ...]] = []
    for j, s in enumerate(steps):
        if s.deps is None:
            out.append((j - 1,) if j else ())
            continue
        for d in s.deps:
            if not 0 <= d < j:
                raise ValueError(f"{block}.{which}[{j}] ({s.name}) depends on index {d}: must be in 0..{j - 1}")
        out.append(tuple(s.deps))
    return out


#: one node of a whole emitted list (:meth:`StageBuilder.emit_all`): its in-list dependencies
#: (deduplicated) and the Node fields that do not depend on where it is emitted; ``tag`` is -1
#: for nodes that carry none (not SEND/RECV)
_Template = tuple


def _templates(steps: Sequence[StepNode], deps: list[tuple[int, ...]]) -> tuple[_Template, ...]:
    p2p = (NodeKind.SEND, NodeKind.RECV)
    return tuple((tuple(dict.fromkeys(d)), s.name, s.kind, s.flops, s.tensor_bytes, s.comm, s.comm_bytes, s.axes,
                  s.peer_axis, s.peer_offset, s.tag if s.kind in p2p else -1, s.category, s.op, s.gemm, s.route)
                 for s, d in zip(steps, deps, strict=True))


@dataclass
class _Prepared:
    """A block's lists with resolved dependencies, the I/W split of its backward, and each whole
    list as templates (what most actions emit)."""

    low: BlockLowering
    fwd: list[tuple[int, ...]]
    rec: list[tuple[int, ...]]
    bwd: list[tuple[int, ...]]
    i_idx: list[int]
    w_idx: list[int]
    fwd_t: tuple[_Template, ...]
    rec_t: tuple[_Template, ...]
    bwd_t: tuple[_Template, ...]

    @staticmethod
    def build(name: str, low: BlockLowering) -> _Prepared:
        fwd = _resolve(low.forward, name, "forward")
        rec = _resolve(low.recompute, name, "recompute")
        bwd = _resolve(low.backward, name, "backward")
        w_idx = [j for j, s in enumerate(low.backward) if s.category == "bwd_weight"]
        i_idx = [j for j, s in enumerate(low.backward) if s.category != "bwd_weight"]
        return _Prepared(low, fwd, rec, bwd, i_idx, w_idx, _templates(low.forward, fwd),
                         _templates(low.recompute, rec), _templates(low.backward, bwd))


@dataclass
class _Context:
    """Everything shared by the stages of one assembly."""

    graph: Graph
    plan: ParallelPlan
    mesh: Mesh
    prepared: dict[str, _Prepared]
    slot_block: list[str]  # slot -> block name: 0 embedding, i + 1 layer i, L + 1 head
    stage_slots: list[list[int]]  # virtual stage -> slots in forward order
    comms: list[list[StepComm]]
    train: bool
    microbatches: int
    tag_base: int
    tag_stride: int
    param_bytes: int
    grad_bytes: int
    tied_copy: LocalWeight | None
    recompute_bytes: dict[str, int] = field(default_factory=dict)  # block -> recompute transient bytes
    units: dict[str, UnitComm] = field(default_factory=dict)

    @property
    def shared_embedding(self) -> frozenset[str]:
        """Names of Megatron's ``shared_embedding`` weights: the tied table and its last-stage copy
        when the embedding and head sit on different stages (they get their own DP bucket)."""
        if self.tied_copy is None:
            return frozenset()
        return frozenset({self.tied_copy.name, self.tied_copy.name.removesuffix(".tied_copy")})

    @property
    def tag_tied(self) -> int:
        """Tag of the tied-embedding gradient exchange: above every pipeline and block tag."""
        return self.tag_base + self.microbatches * len(self.slot_block) * 3 * self.tag_stride

    @property
    def num_layers(self) -> int:
        return len(self.slot_block) - 2

    def low(self, slot: int) -> BlockLowering:
        return self.prepared[self.slot_block[slot]].low

    def label(self, slot: int) -> str:
        if slot == 0:
            return "embed"
        return "head" if slot == len(self.slot_block) - 1 else f"L{slot - 1}"

    def unit(self, slot: int) -> UnitComm:
        """ZeRO-3 collectives of the block instance at ``slot`` (cached per block kind)."""
        name = self.slot_block[slot]
        key = f"{name}+tied" if self._has_tied_copy(slot) else name
        if key not in self.units:
            weights = list(self.low(slot).weights) + ([self.tied_copy] if key != name else [])
            self.units[key] = unit_comm(weights, self.plan, self.mesh, self.param_bytes, self.grad_bytes)
        return self.units[key]

    def _has_tied_copy(self, slot: int) -> bool:
        return self.tied_copy is not None and slot == len(self.slot_block) - 1

    def weights(self, slot: int) -> list[LocalWeight]:
        """Weights of one block instance as this rank holds them (the head's tied copy included)."""
        ws = list(self.low(slot).weights)
        return ws + [self.tied_copy] if self._has_tied_copy(slot) and self.tied_copy is not None else ws


def _build_context(graph: Graph, plan: ParallelPlan, blocks: dict[str, BlockLowering], mesh: Mesh) -> _Context:
    kinds = list(graph.layer_kinds)
    slot_block = ["embedding", *kinds, "head"]
    missing = sorted(set(slot_block) - set(blocks))
    if missing:
        raise ValueError(f"block lowering misses blocks {missing}")
    prepared = {name: _Prepared.build(name, blocks[name]) for name in dict.fromkeys(slot_block)}
    pp, vpp = plan.pp, plan.vpp
    ranges = assign_layers(len(kinds), pp, vpp, plan.pp_layer_split)
    stages = pp * vpp
    stage_slots = []
    for v, r in enumerate(ranges):
        slots = [i + 1 for i in r]
        if v == 0:
            slots.insert(0, 0)
        if v == stages - 1:
            slots.append(len(slot_block) - 1)
        stage_slots.append(slots)
    train = plan.phase == "train"
    m = plan.microbatches
    orders = pipeline_order(plan.schedule, pp, m, vpp)
    if not train:
        orders = [[a for a in order if a.kind is Kind.F] for order in orders]
    comms = p2p_plan(orders, pp, vpp)
    max_tag = max((s.tag for b in prepared.values() for lst in (b.low.forward, b.low.recompute, b.low.backward)
                   for s in lst if s.kind in (NodeKind.SEND, NodeKind.RECV)), default=0)
    options = graph.options
    param_bytes = dtype_bytes(options.precision_policy().param_dtype)
    grad_bytes = grad_elem_bytes(options, plan.ddp_style)
    tied_copy = None
    if graph.spec.tied_embeddings and pp > 1 and train:
        head_has_table = any("v" in w.dims for w in blocks["head"].weights)
        table = next((w for w in blocks["embedding"].weights if "v" in w.dims), None)
        if table is not None and not head_has_table:
            tied_copy = LocalWeight(f"{table.name}.tied_copy", table.dims, table.numel, table.expert, table.shape)
    rec_bytes = recompute_transient_bytes({n: blocks[n] for n in prepared}) if train else {}
    return _Context(graph, plan, mesh, prepared, slot_block, stage_slots, comms, train, m,
                    tag_base=2 * m * stages, tag_stride=max_tag + 1, param_bytes=param_bytes,
                    grad_bytes=grad_bytes, tied_copy=tied_copy, recompute_bytes=rec_bytes)


class StageBuilder:
    """Builds the Program of pipeline rank ``rank``."""

    def __init__(self, ctx: _Context, rank: int) -> None:
        self.ctx = ctx
        self.rank = rank
        plan = ctx.plan
        self.p = Program(class_key={"pp": rank})
        self.nodes = self.p.nodes
        self.chunk_slots = [ctx.stage_slots[c * plan.pp + rank] for c in range(plan.vpp)]
        self.fwd_last: dict[tuple[int, int], int] = {}
        self.bwd_ids: dict[tuple[int, int], dict[int, int]] = {}
        self.after: tuple[int, ...] = ()  # what the next action waits for (the order chain)
        self.dp = DataParallelEmitter(self)

    # --- node helpers --------------------------------------------------------------------
    def add(self, name: str, kind: NodeKind, **kw: object) -> int:
        return self.p.add(name, kind, **kw).id

    def emit_list(self, steps: Sequence[StepNode], deps: list[tuple[int, ...]], idx: Sequence[int],
                   entry: tuple[int, ...], ctrl: tuple[int, ...], idmap: dict[int, int], prefix: str,
                   mb: int, layer: int, chunk: int, tag_off: int, scale: int = 1) -> int | None:
        """Append ``steps[j] for j in idx``; roots depend on ``entry``; ``idmap`` maps list index to id.

        A dependency on an index not emitted (an input-grad node after a weight-grad node in a
        split backward) becomes a dependency on the previous emitted node (order only).
        """
        last = None
        nodes = self.p.nodes
        p2p = (NodeKind.SEND, NodeKind.RECV)
        # Hot loop of the lowering (one iteration per emitted node): positional Node construction and
        # a direct append are ~2x faster than Program.add(**kwargs); ids stay dense.
        for n, j in enumerate(idx):
            s = steps[j]
            dd = []
            for d in deps[j]:
                g = idmap.get(d)
                if g is None:
                    if last is not None:
                        dd.append(last)
                else:
                    dd.append(g)
            data = (tuple(dict.fromkeys(dd)) if len(dd) > 1 else tuple(dd)) if dd else entry
            tag = s.tag + tag_off if s.kind in p2p else 0
            flops, tbytes = s.flops, s.tensor_bytes
            if scale > 1:
                flops, tbytes = -(-flops // scale), -(-tbytes // scale)
            cd = tuple(c for c in ctrl if c not in data) if n == 0 else ()
            nid = len(nodes)
            nodes.append(Node(nid, prefix + s.name, s.kind, data, cd, flops, tbytes, s.comm, s.comm_bytes,
                              s.axes, s.peer_axis, s.peer_offset, tag, s.category, s.op, layer, mb, chunk,
                              0, 0, s.gemm, s.route))
            idmap[j] = nid
            last = nid
        return last

    def emit_all(self, tmpl: tuple[_Template, ...], entry: tuple[int, ...], ctrl: tuple[int, ...], prefix: str,
                 mb: int, layer: int, chunk: int, tag_off: int) -> int | None:
        """:meth:`emit_list` of a whole list (every index, nothing emitted before), from its
        templates: a dependency on list index ``d`` is node ``first id + d``. The hot path of the
        lowering: one Node per template, no per-node lookups."""
        if not tmpl:
            return None
        nodes = self.nodes
        append = nodes.append
        new = object.__new__
        base = nid = len(nodes)
        for rel, name, kind, flops, tbytes, comm, cbytes, axes, pax, poff, tag, cat, op, gemm, route in tmpl:
            # Node(...) with its dataclass __init__ inlined: every field, set directly (~0.3 us less per
            # node than the call through type.__call__ and the generated __init__; 11 M nodes on the
            # explorer's benchmark sample). tests/test_lower_node_fields.py checks that every field is set.
            x = new(Node)
            x.id = nid
            x.name = prefix + name
            x.kind = kind
            x.data_deps = ((base + rel[0],) if len(rel) == 1 else tuple([base + d for d in rel])) if rel else entry
            x.ctrl_deps = ()
            x.flops = flops
            x.tensor_bytes = tbytes
            x.comm = comm
            x.comm_bytes = cbytes
            x.axes = axes
            x.peer_axis = pax
            x.peer_offset = poff
            x.tag = tag + tag_off if tag >= 0 else 0
            x.category = cat
            x.op = op
            x.layer = layer
            x.microbatch = mb
            x.chunk = chunk
            x.mem_alloc_bytes = 0
            x.mem_free_bytes = 0
            x.gemm = gemm
            x.route = route
            x.mem_free_comm_bytes = 0
            append(x)
            nid += 1
        if ctrl:  # the order chain: the first node also waits for ``ctrl`` (what it does not already)
            first = nodes[base]
            first.ctrl_deps = tuple(c for c in ctrl if c not in first.data_deps)
        return nid - 1

    def _tag_off(self, mb: int, slot: int, which: int) -> int:
        ctx = self.ctx
        return ctx.tag_base + ((mb * len(ctx.slot_block) + slot) * 3 + which) * ctx.tag_stride

    # --- plan of the step ----------------------------------------------------------------
    def _final_actions(self, steps: Sequence[StepComm]) -> set[int]:
        """Indices of the actions that run the last backward (B or W) of each chunk."""
        last: dict[int, int] = {}
        for i, st in enumerate(steps):
            if st.action.kind in (Kind.B, Kind.W):
                last[st.action.chunk] = i
        return set(last.values())

    def slots_of(self, a: Action) -> list[int]:
        slots = self.chunk_slots[a.chunk]
        return slots if a.kind is Kind.F else slots[::-1]

    # --- the step --------------------------------------------------------------------------
    def build(self) -> Program:
        ctx = self.ctx
        steps = ctx.comms[self.rank]
        final = self._final_actions(steps) if ctx.train else set()
        paired = overlap_pairs(steps) if ctx.plan.moe_a2a_overlap else set()
        self.dp.plan(steps)
        i = 0
        while i < len(steps):
            # one action, or a backward and the next forward emitted block by block in turn (Megatron's
            # combined 1F1B): all wait for what came before; the next action waits for all of them
            group = (i, i + 1) if i + 1 in paired else (i,)
            ends: list[int] = []
            gens = [self._action(j, steps[j], j in final, self.after, ends) for j in group]
            while gens:
                gens = [g for g in gens if next(g, _DONE) is not _DONE]
            self.after = tuple(dict.fromkeys(ends))
            i += len(group)
        if ctx.train:
            self.dp.finish_step()
        self._memory_and_flops()
        # the emitter points back at this builder: drop it so that reference counting frees the
        # builder, and with it every node, when the Program dies (a cycle waits for the collector);
        # a builder builds once
        del self.dp
        return self.p

    def _boundary_bytes(self, stage: int) -> int:
        """Bytes of the activation leaving virtual stage ``stage`` (= gradient coming back into it)."""
        return self.ctx.low(self.ctx.stage_slots[stage][-1]).output_bytes

    def _action(self, i: int, st: StepComm, final: bool, ctrl: tuple[int, ...],
                ends: list[int]) -> Iterator[None]:
        """Emit action ``i`` (waiting for ``ctrl``), yielding after each block so that a paired action
        can be emitted in turn (``moe_a2a_overlap``); appends the action's last node to ``ends``."""
        a = st.action
        mb, chunk, kind = a.microbatch, a.chunk, a.kind
        entry: tuple[int, ...] = ()
        pre = f"mb{mb}."
        if st.recv is not None:
            fwd = st.recv.payload == "activation"
            src_stage = a.stage - 1 if fwd else a.stage
            entry = (self._boundary_p2p(f"{pre}c{chunk}.recv_{'act' if fwd else 'grad'}", NodeKind.RECV, (), ctrl,
                                        src_stage, -1 if fwd else 1, st.recv.tag, mb, chunk),)
        last: int | None = None
        first_ctrl = ctrl
        for slot in self.slots_of(a):
            prep = self.ctx.prepared[self.ctx.slot_block[slot]]
            prefix = f"{pre}{self.ctx.label(slot)}."
            layer = slot - 1
            j, gathered = self.dp.gathered(i, slot)
            if kind is Kind.F:
                gathered += self.dp.forward_waits(chunk, slot, entry + first_ctrl)
                out = self.emit_all(prep.fwd_t, entry + gathered, first_ctrl, prefix, mb, layer, chunk,
                                     self._tag_off(mb, slot, LIST_FWD))
                if out is not None:
                    self.fwd_last[(mb, slot)] = out
                    if self.ctx.train:
                        self.nodes[out].mem_alloc_bytes += prep.low.saved_bytes
                    last = out
                    entry = (out,)
            elif kind in (Kind.B, Kind.I):
                saved = (self.fwd_last[(mb, slot)],) if (mb, slot) in self.fwd_last else ()
                base = tuple(dict.fromkeys(entry + saved + gathered))
                rec_first = len(self.nodes)
                rec = self.emit_all(prep.rec_t, base, first_ctrl, prefix, mb, layer, chunk,
                                    self._tag_off(mb, slot, LIST_REC))
                if rec is not None:
                    base, first_ctrl = (rec,), ()
                    self.nodes[rec_first].mem_alloc_bytes += self.ctx.recompute_bytes.get(self.ctx.slot_block[slot], 0)
                if kind is Kind.B:
                    out = self.emit_all(prep.bwd_t, base, first_ctrl, prefix, mb, layer, chunk,
                                        self._tag_off(mb, slot, LIST_BWD))
                else:
                    idmap: dict[int, int] = {}
                    out = self.emit_list(prep.low.backward, prep.bwd, prep.i_idx, base, first_ctrl, idmap, prefix,
                                          mb, layer, chunk, self._tag_off(mb, slot, LIST_BWD))
                    self.bwd_ids[(mb, slot)] = idmap
                out = out if out is not None else rec
                if out is not None:
                    if kind is Kind.B or not prep.w_idx:
                        self.nodes[out].mem_free_bytes += self._held_bytes(slot)
                    last = out
                    entry = (out,)
                if kind is Kind.B:
                    self.dp.after_backward(slot, last, final)
            else:  # W
                idmap = self.bwd_ids.pop((mb, slot), {})
                base = entry if entry else ((self.fwd_last[(mb, slot)],) if (mb, slot) in self.fwd_last else ())
                out = self.emit_list(prep.low.backward, prep.bwd, prep.w_idx, base, first_ctrl, idmap, prefix, mb,
                                      layer, chunk, self._tag_off(mb, slot, LIST_BWD))
                if out is not None:
                    self.nodes[out].mem_free_bytes += self._held_bytes(slot)
                    last = out
                    entry = (out,)
                self.dp.after_backward(slot, last, final)
            if last is not None:
                first_ctrl = (last,)
            self.dp.after_use(j, slot, last)
            yield
        if kind is Kind.F:
            self.dp.forward_done(chunk)
        if last is None:  # an action with no nodes (empty blocks): keep the order chain intact
            last = self.add(f"{pre}c{chunk}.{kind.value}.noop", NodeKind.COMP, data_deps=entry, ctrl_deps=ctrl,
                             category="fwd" if kind is Kind.F else "bwd_input", microbatch=mb, chunk=chunk)
        if st.send is not None:
            fwd = st.send.payload == "activation"
            dst_stage = a.stage if fwd else a.stage - 1
            self._boundary_p2p(f"{pre}c{chunk}.send_{'act' if fwd else 'grad'}", NodeKind.SEND, (last,), (),
                               dst_stage, 1 if fwd else -1, st.send.tag, mb, chunk)
        ends.append(last)

    def _boundary_p2p(self, name: str, kind: NodeKind, data: tuple[int, ...], ctrl: tuple[int, ...], stage: int,
                      offset: int, tag: int, mb: int, chunk: int) -> int:
        """A stage-boundary SEND/RECV along ``pp`` of virtual stage ``stage``'s output (positional
        Node construction: two per action, a million in a deep pipeline)."""
        nid = len(self.nodes)
        self.nodes.append(Node(nid, name, kind, data, ctrl, 0, 0, None, self._boundary_bytes(stage), (), "pp", offset,
                               tag, "comm", "", -1, mb, chunk))
        return nid

    def _held_bytes(self, slot: int) -> int:
        """Activation bytes a block's backward releases: saved ones plus any recomputed ones."""
        low = self.ctx.low(slot)
        return low.saved_bytes + (self.ctx.recompute_bytes.get(self.ctx.slot_block[slot], 0) if low.recompute else 0)

    def _memory_and_flops(self) -> None:
        ctx = self.ctx
        slots = [s for ss in self.chunk_slots for s in ss]
        weights = [w for s in slots for w in ctx.weights(s)]
        static = static_bytes(weights, ctx.plan, ctx.mesh, ctx.graph.options, ctx.grad_bytes)
        if not ctx.train:
            kv = sum(ctx.low(s).kv_cache_bytes for s in slots) * ctx.microbatches
            if kv:
                static["kv_cache"] = kv
        self.p.static_bytes = static
        self.p.model_flops = ctx.microbatches * sum(ctx.low(s).model_flops for s in slots)


#: sentinel of an exhausted action generator
_DONE = object()


def overlap_pairs(steps: Sequence[StepComm]) -> set[int]:
    """Indices of actions emitted together with the action before them under ``moe_a2a_overlap`` (one
    pipeline stage: the order is F0 B0 F1 B1 ...): each backward B(i) with the next forward F(i+1),
    as Megatron-Core's combined 1F1B pairs them, so that the two interleave block by block and each
    one's expert-parallel all-to-alls run under the other's compute. (With pipeline stages a pair's
    backward would wait for a gradient that, through a communicator's program order, can wait for
    this rank's forward: the schedule has to receive before the pair starts, not modelled.)"""
    out: set[int] = set()
    for i in range(1, len(steps)):
        a, b = steps[i - 1].action, steps[i].action
        if i - 1 not in out and (a.kind, b.kind) == (Kind.B, Kind.F) and a.microbatch != b.microbatch:
            out.add(i)
    return out


def assemble(graph: Graph, plan: ParallelPlan, blocks: dict[str, BlockLowering], mesh: Mesh) -> list[Program]:
    """One Program per pipeline stage (``class_key {"pp": r}``) for one step of ``plan``.

    ``blocks`` maps ``"embedding"``, every layer kind of ``graph.layer_kinds`` and ``"head"`` to
    its :class:`BlockLowering`. See the module docstring for what is added.
    """
    with paused_gc():
        ctx = _build_context(graph, plan, blocks, mesh)
        return [StageBuilder(ctx, r).build() for r in range(plan.pp)]


__all__ = ["assemble"]
