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
* **Data parallelism** (training only; :mod:`.dataparallel` for sizes). DDP / ZeRO-1/2: flat
  buckets per model chunk, filled in reverse layer order; each bucket's reduction is issued
  right after the backward (``B``, or ``W`` for zero-bubble) of the last micro-batch of the
  block that completes it, so it overlaps the rest of the backward (one bucket per chunk, at
  the end, without ``overlap_grad_reduce``). ZeRO-3 / FSDP (torch FSDP2 semantics): one unit per
  layer instance plus one *root* unit per stage holding the embedding and head weights there (the
  root module's own parameters). A use (forward, or ``I``/``B`` backward) all-gathers its unit
  only if it is not still unsharded: after its forward a unit reshards per
  ``fsdp_reshard_after_forward`` (``default`` = torch's ``None``: layers yes, root no; ``true``;
  ``false``), after a backward always, except that torch pipelining (``pp > 1``) keeps it until
  the chunk's last backward. A gather is issued when use ``j - 1 - fsdp_prefetch`` ends (and
  not before the unit's previous reshard); gathered bytes live until the reshard. One gradient
  reduce-scatter per unit per step after its last backward (torch pipelining + FSDP2 reduce once
  per step; the root once all its blocks are done). Hybrid sharding adds the all-reduce over
  ``dp_replicate``. ``reshard_after_forward=int`` (reshard to a smaller group) is not modelled.
* **Tied embeddings** with the embedding and head on different ranks: the last stage keeps a
  copy of the embedding table (Megatron), and the first and last stages sum their gradients
  (Megatron's all-reduce over its 2-rank embedding group). The mesh has no communicator for
  just those two ranks, and a collective over ``("pp",)`` that middle stages skip would hang
  ASTRA-sim (every group member must issue it; the trace validator rejects it), so it is an
  exchange: each end sends its gradient to the other along ``pp`` (offset -1 / +1, wrapping) —
  per rank exactly the bytes of a 2-rank ring all-reduce, 2(n-1)/n x S = S.
* **Finalize + optimizer** (Megatron's ``finalize_model_grads``, see :meth:`_Stage._finish_step`):
  TP all-reduce of Partial weight grads, tied-embedding exchange, gradient-norm all-reduce
  (``ddp_style="megatron"`` only); then each block instance's optimizer nodes, FLOPs and bytes
  divided by the ZeRO shard factor, head first; ZeRO-1/2 then all-gather each bucket's updated
  parameters: without ``overlap_param_gather`` (Megatron-core's default) synchronously, one after
  the other, after the whole optimizer step; with it, during the (next) step's forward, emitted
  in the step's first forward: the first forward of the module that starts a bucket (forward
  order) waits for that bucket's gather, dispatching it there if nothing did, and its completion
  dispatches the next bucket's (Megatron's ``finish_param_sync`` / ``next_param_gather_bucket_group``,
  per buffer: dense and expert chains, per model chunk). Like every framework's
  ``optimizer.step()``, the step waits for all reductions.
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

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from tensorstage.graph.dims import dtype_bytes
from tensorstage.graph.graph import Graph
from tensorstage.lower.dataparallel import (
    Bucket,
    CommOp,
    UnitComm,
    grad_elem_bytes,
    make_buckets,
    shard_axes,
    shard_factor,
    static_bytes,
    unit_comm,
)
from tensorstage.lower.recompute_memory import recompute_transient_bytes
from tensorstage.lower.steps import BlockLowering, LocalWeight, StepNode
from tensorstage.parallel.mesh import Mesh
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.microbatch import assign_layers
from tensorstage.schedule.pipeline import Action, Kind, StepComm, p2p_plan, pipeline_order
from tensorstage.schedule.program import CollKind, NodeKind, Program

LIST_FWD, LIST_REC, LIST_BWD = 0, 1, 2


@contextmanager
def _paused_gc() -> Iterator[None]:
    """Pause the cyclic GC: assembly allocates many small acyclic objects (nodes, tuples)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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


@dataclass
class _Prepared:
    """A block's lists with resolved dependencies and the I/W split of its backward."""

    low: BlockLowering
    fwd: list[tuple[int, ...]]
    rec: list[tuple[int, ...]]
    bwd: list[tuple[int, ...]]
    i_idx: list[int]
    w_idx: list[int]
    all_bwd: list[int]

    @staticmethod
    def build(name: str, low: BlockLowering) -> _Prepared:
        bwd = _resolve(low.backward, name, "backward")
        w_idx = [j for j, s in enumerate(low.backward) if s.category == "bwd_weight"]
        i_idx = [j for j, s in enumerate(low.backward) if s.category != "bwd_weight"]
        return _Prepared(low, _resolve(low.forward, name, "forward"), _resolve(low.recompute, name, "recompute"),
                         bwd, i_idx, w_idx, list(range(len(low.backward))))


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


class _Stage:
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
        self.final_bwd_last: dict[int, int] = {}  # slot -> last backward node of its last micro-batch
        self.reduce_last: dict[int, list[int]] = {}  # slot -> ids of the reductions covering it
        self.prev_end: int | None = None
        self.zero3 = ctx.train and plan.zero == 3
        self.buckets: dict[int, list[Bucket]] = {}  # close slot -> buckets
        self.all_buckets: list[Bucket] = []
        # ZeRO-1/2 with overlap_param_gather: bucket -> next bucket of its chain (forward order),
        # first slot -> buckets whose forward starts there, dispatched gathers (bucket index -> id)
        self.pg_next: dict[int, int] = {}
        self.pg_starts: dict[int, list[int]] = {}
        self.pg_issued: dict[int, int] = {}
        self.pg_chunks_done: set[int] = set()
        # FSDP (ZeRO-3) uses: (action index, slot) in program order, and gather bookkeeping
        self.uses: list[tuple[int, int]] = []
        self.use_index: dict[tuple[int, int], int] = {}
        self.gather_last: dict[int, int] = {}
        self.gather_after: dict[int, list[int]] = {}
        self.reshard_at: set[int] = set()  # uses after which the unit's gathered params are freed
        last_slot = len(ctx.slot_block) - 1
        self.root_slots = [s for s in (0, last_slot) if any(s in ss for ss in self.chunk_slots)]
        self.root_pending = set(self.root_slots)
        self._root_unit: UnitComm | None = None

    # --- node helpers --------------------------------------------------------------------
    def _add(self, name: str, kind: NodeKind, **kw: object) -> int:
        return self.p.add(name, kind, **kw).id

    def _emit_ops(self, ops: Sequence[CommOp], name: str, deps: tuple[int, ...], ctrl: tuple[int, ...] = (),
                  **kw: object) -> int | None:
        """A chain of DP collectives (each after the previous); returns the last id."""
        last = None
        for k, op in enumerate(ops):
            d = deps if last is None else (last,)
            last = self._add(f"{name}.{CollKind(op.kind).name.lower()}" + (f"{k}" if len(ops) > 1 else ""),
                             NodeKind.COLL, data_deps=d, ctrl_deps=ctrl if k == 0 else (), comm=op.kind,
                             comm_bytes=op.comm_bytes, axes=op.axes, category="comm", **kw)
        return last

    def _emit_list(self, steps: Sequence[StepNode], deps: list[tuple[int, ...]], idx: Sequence[int],
                   entry: tuple[int, ...], ctrl: tuple[int, ...], idmap: dict[int, int], prefix: str,
                   mb: int, layer: int, chunk: int, tag_off: int, scale: int = 1) -> int | None:
        """Append ``steps[j] for j in idx``; roots depend on ``entry``; ``idmap`` maps list index to id.

        A dependency on an index not emitted (an input-grad node after a weight-grad node in a
        split backward) becomes a dependency on the previous emitted node (order only).
        """
        last = None
        add = self.p.add
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
            data = tuple(dict.fromkeys(dd)) if dd else entry
            tag = s.tag + tag_off if s.kind in (NodeKind.SEND, NodeKind.RECV) else 0
            flops, tbytes = s.flops, s.tensor_bytes
            if scale > 1:
                flops, tbytes = -(-flops // scale), -(-tbytes // scale)
            cd = tuple(c for c in ctrl if c not in data) if n == 0 else ()
            node = add(prefix + s.name, s.kind, data_deps=data, ctrl_deps=cd, flops=flops,
                       tensor_bytes=tbytes, comm=s.comm, comm_bytes=s.comm_bytes, axes=s.axes,
                       peer_axis=s.peer_axis, peer_offset=s.peer_offset, tag=tag, category=s.category, op=s.op,
                       layer=layer, microbatch=mb, chunk=chunk, gemm=s.gemm)
            idmap[j] = node.id
            last = node.id
        return last

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

    def _slots_of(self, a: Action) -> list[int]:
        slots = self.chunk_slots[a.chunk]
        return slots if a.kind is Kind.F else slots[::-1]

    def unit_key(self, slot: int) -> int:
        """FSDP unit of a block instance: the slot itself, or -1 for the stage's *root* unit.

        As with torch's ``fully_shard(model)`` after ``fully_shard`` on each block, the embedding
        and head weights of a stage (the root module's own parameters) form one unit.
        """
        return -1 if slot in self.root_slots else slot

    def unit(self, slot: int) -> UnitComm:
        """Collectives of the FSDP unit ``slot`` belongs to (the merged root unit for embedding/head)."""
        if self.unit_key(slot) != -1:
            return self.ctx.unit(slot)
        if self._root_unit is None:
            ctx = self.ctx
            weights = [w for s in self.root_slots for w in ctx.weights(s)]
            self._root_unit = unit_comm(weights, ctx.plan, ctx.mesh, ctx.param_bytes, ctx.grad_bytes)
        return self._root_unit

    def _reshard_after_forward(self, key: int) -> bool:
        """torch ``reshard_after_forward``: ``None`` (our "default") is False for the root only."""
        mode = self.ctx.plan.fsdp_reshard_after_forward
        return mode == "true" or (mode == "default" and key != -1)

    def _plan_fsdp(self, steps: Sequence[StepComm]) -> None:
        """Which uses all-gather, where each gather is issued and where the params are freed.

        A unit is gathered at a use only if it is not still unsharded from an earlier use. After
        its forward it reshards per ``reshard_after_forward``; after a backward it reshards unless
        the step is pipelined (``pp > 1``) and this is not the chunk's last backward: torch
        pipelining calls ``set_reshard_after_backward(last_backward)`` (torchref fact FSDP2-9).
        A gather is issued when use ``j - 1 - fsdp_prefetch`` ends, but not before the unit's
        previous reshard.
        """
        last_bwd: dict[int, int] = {}
        for i, st in enumerate(steps):
            if st.action.kind in (Kind.B, Kind.I):
                last_bwd[st.action.chunk] = i
        ends: dict[tuple[int, int], int] = {}  # (action, unit) -> its last use in the action
        for i, st in enumerate(steps):
            if st.action.kind is Kind.W:
                continue
            for slot in self._slots_of(st.action):
                if self.unit(slot).gather:
                    self.use_index[(i, slot)] = len(self.uses)
                    ends[(i, self.unit_key(slot))] = len(self.uses)
                    self.uses.append((i, slot))
        depth = self.ctx.plan.fsdp_prefetch
        resharded_at: dict[int, int] = {}  # unit -> use after which it was last freed (-1: start)
        gathered: set[int] = set()
        for j, (i, slot) in enumerate(self.uses):
            key = self.unit_key(slot)
            if key not in gathered:
                gathered.add(key)
                self.gather_after.setdefault(max(j - 1 - depth, resharded_at.get(key, -1)), []).append(j)
            if ends[(i, key)] != j:
                continue
            a = steps[i].action
            if a.kind is Kind.F:
                free = self._reshard_after_forward(key)
            else:
                free = self.ctx.plan.pp == 1 or last_bwd.get(a.chunk) == i
            if free:
                gathered.discard(key)
                resharded_at[key] = j
                self.reshard_at.add(j)

    def _emit_gathers(self, after_use: int, dep: int | None) -> None:
        for j in self.gather_after.get(after_use, ()):
            _, slot = self.uses[j]
            unit = self.unit(slot)
            deps = (dep,) if dep is not None else ()
            first = len(self.nodes)
            label = "root" if self.unit_key(slot) == -1 else self.ctx.label(slot)
            last = self._emit_ops(unit.gather, f"fsdp.use{j}.{label}.param", deps, layer=slot - 1)
            if last is not None:
                self.nodes[first].mem_alloc_bytes += unit.gathered_bytes
                self.gather_last[j] = last

    def _plan_buckets(self) -> None:
        ctx, plan = self.ctx, self.ctx.plan
        if not ctx.train or plan.zero == 3:
            return
        for slots in self.chunk_slots:
            for expert in (False, True):
                entries = [(slot, w) for slot in reversed(slots) for w in reversed(ctx.weights(slot))
                           if w.expert == expert]
                if not entries:
                    continue
                chain: list[int] = []
                for b in make_buckets(entries, expert, plan, ctx.mesh, ctx.param_bytes, ctx.grad_bytes,
                                      ctx.shared_embedding):
                    if b.reduce or b.gather:
                        self.buckets.setdefault(b.close_slot, []).append(b)
                        if b.gather:
                            chain.append(len(self.all_buckets))
                        self.all_buckets.append(b)
                if plan.overlap_param_gather and chain:
                    # Megatron chains a buffer's bucket groups in reverse creation (= forward) order
                    fwd_order = chain[::-1]
                    self.pg_next.update(zip(fwd_order, fwd_order[1:], strict=False))
                    for k in fwd_order:
                        self.pg_starts.setdefault(min(self.all_buckets[k].slots), []).append(k)

    # --- the step --------------------------------------------------------------------------
    def build(self) -> Program:
        ctx = self.ctx
        steps = ctx.comms[self.rank]
        final = self._final_actions(steps) if ctx.train else set()
        if self.zero3:
            self._plan_fsdp(steps)
            self._emit_gathers(-1, None)
        self._plan_buckets()
        for i, st in enumerate(steps):
            self._action(i, st, i in final)
        if ctx.train:
            self._finish_step()
        self._memory_and_flops()
        return self.p

    def _boundary_bytes(self, stage: int) -> int:
        """Bytes of the activation leaving virtual stage ``stage`` (= gradient coming back into it)."""
        return self.ctx.low(self.ctx.stage_slots[stage][-1]).output_bytes

    def _action(self, i: int, st: StepComm, final: bool) -> None:
        a = st.action
        mb, chunk, kind = a.microbatch, a.chunk, a.kind
        ctrl = (self.prev_end,) if self.prev_end is not None else ()
        entry: tuple[int, ...] = ()
        pre = f"mb{mb}."
        if st.recv is not None:
            fwd = st.recv.payload == "activation"
            src_stage = a.stage - 1 if fwd else a.stage
            entry = (self._add(f"{pre}c{chunk}.recv_{'act' if fwd else 'grad'}", NodeKind.RECV, ctrl_deps=ctrl,
                               comm_bytes=self._boundary_bytes(src_stage), peer_axis="pp",
                               peer_offset=-1 if fwd else 1, tag=st.recv.tag, category="comm", microbatch=mb,
                               chunk=chunk),)
        last: int | None = None
        first_ctrl = ctrl
        for slot in self._slots_of(a):
            prep = self.ctx.prepared[self.ctx.slot_block[slot]]
            prefix = f"{pre}{self.ctx.label(slot)}."
            layer = slot - 1
            j = self.use_index.get((i, slot))
            gathered = (self.gather_last[j],) if j is not None and j in self.gather_last else ()
            if kind is Kind.F:
                if self.pg_starts and chunk not in self.pg_chunks_done:
                    gathered += self._param_gather_waits(slot, entry + first_ctrl)
                out = self._emit_list(prep.low.forward, prep.fwd, range(len(prep.fwd)), entry + gathered,
                                      first_ctrl, {}, prefix, mb, layer, chunk, self._tag_off(mb, slot, LIST_FWD))
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
                rec = self._emit_list(prep.low.recompute, prep.rec, range(len(prep.rec)), base, first_ctrl, {},
                                      prefix, mb, layer, chunk, self._tag_off(mb, slot, LIST_REC))
                if rec is not None:
                    base, first_ctrl = (rec,), ()
                    self.nodes[rec_first].mem_alloc_bytes += self.ctx.recompute_bytes.get(self.ctx.slot_block[slot], 0)
                idmap: dict[int, int] = {}
                idx = prep.all_bwd if kind is Kind.B else prep.i_idx
                out = self._emit_list(prep.low.backward, prep.bwd, idx, base, first_ctrl, idmap, prefix, mb,
                                      layer, chunk, self._tag_off(mb, slot, LIST_BWD))
                out = out if out is not None else rec
                if kind is Kind.I:
                    self.bwd_ids[(mb, slot)] = idmap
                if out is not None:
                    if kind is Kind.B or not prep.w_idx:
                        self.nodes[out].mem_free_bytes += self._held_bytes(slot)
                    last = out
                    entry = (out,)
                if kind is Kind.B:
                    self._after_backward(slot, last, final)
            else:  # W
                idmap = self.bwd_ids.pop((mb, slot), {})
                base = entry if entry else ((self.fwd_last[(mb, slot)],) if (mb, slot) in self.fwd_last else ())
                out = self._emit_list(prep.low.backward, prep.bwd, prep.w_idx, base, first_ctrl, idmap, prefix, mb,
                                      layer, chunk, self._tag_off(mb, slot, LIST_BWD))
                if out is not None:
                    self.nodes[out].mem_free_bytes += self._held_bytes(slot)
                    last = out
                    entry = (out,)
                self._after_backward(slot, last, final)
            if last is not None:
                first_ctrl = (last,)
            if j is not None:
                if j in self.reshard_at and last is not None:
                    self.nodes[last].mem_free_bytes += self.unit(slot).gathered_bytes
                self._emit_gathers(j, last)
        if kind is Kind.F:
            self.pg_chunks_done.add(chunk)  # later micro-batches find the parameters gathered
        if last is None:  # an action with no nodes (empty blocks): keep the order chain intact
            last = self._add(f"{pre}c{chunk}.{kind.value}.noop", NodeKind.COMP, data_deps=entry, ctrl_deps=ctrl,
                             category="fwd" if kind is Kind.F else "bwd_input", microbatch=mb, chunk=chunk)
        if st.send is not None:
            fwd = st.send.payload == "activation"
            dst_stage = a.stage if fwd else a.stage - 1
            self._add(f"{pre}c{chunk}.send_{'act' if fwd else 'grad'}", NodeKind.SEND, data_deps=(last,),
                      comm_bytes=self._boundary_bytes(dst_stage), peer_axis="pp", peer_offset=1 if fwd else -1,
                      tag=st.send.tag, category="comm", microbatch=mb, chunk=chunk)
        self.prev_end = last

    def _param_gather(self, k: int, deps: tuple[int, ...]) -> int:
        """Emit the post-step parameter all-gather of bucket ``k`` (once); returns its last node."""
        if k not in self.pg_issued:
            b = self.all_buckets[k]
            last = self._emit_ops(b.gather, f"dp.{'expert_' if b.expert else ''}bucket{k}.param",
                                  tuple(dict.fromkeys(deps)))
            assert last is not None
            self.pg_issued[k] = last
        return self.pg_issued[k]

    def _param_gather_waits(self, slot: int, here: tuple[int, ...]) -> tuple[int, ...]:
        """Megatron's forward pre-hook with ``overlap_param_gather`` (``finish_param_sync``): the
        first forward of a module waits for its bucket's all-gather of the parameters the previous
        step updated, dispatching it now if nothing did; once it completes, the next bucket's
        all-gather (forward order) is dispatched, so it overlaps this bucket's forward."""
        waits = []
        for k in self.pg_starts.get(slot, ()):
            g = self._param_gather(k, here)
            waits.append(g)
            if k in self.pg_next:
                self._param_gather(self.pg_next[k], (g,))
        return tuple(waits)

    def _held_bytes(self, slot: int) -> int:
        """Activation bytes a block's backward releases: saved ones plus any recomputed ones."""
        low = self.ctx.low(slot)
        return low.saved_bytes + (self.ctx.recompute_bytes.get(self.ctx.slot_block[slot], 0) if low.recompute else 0)

    def _after_backward(self, slot: int, last: int | None, final: bool) -> None:
        """After a block's backward of the last micro-batch: issue the reductions it completes."""
        if not final or last is None:
            return
        self.final_bwd_last[slot] = last
        ctx = self.ctx
        label = ctx.label(slot)
        if self.zero3:
            covered = [slot]
            if self.unit_key(slot) == -1:  # the root unit reduces once all its blocks are done
                self.root_pending.discard(slot)
                if self.root_pending:
                    return
                label, covered = "root", self.root_slots
            red = self._emit_ops(self.unit(slot).reduce, f"fsdp.{label}.grad", (last,), layer=slot - 1)
            if red is not None:
                for s in covered:
                    self.reduce_last.setdefault(s, []).append(red)
            return
        for k, b in enumerate(self.buckets.get(slot, ())):
            name = f"dp.{'expert_' if b.expert else ''}bucket.{label}.{k}.grad"
            red = self._emit_ops(b.reduce, name, (last,), layer=slot - 1)
            if red is not None:
                for s in b.slots:
                    self.reduce_last.setdefault(s, []).append(red)

    def _finish_step(self) -> None:
        """Megatron's ``finalize_model_grads`` then the optimizer step.

        After the DP reductions (issued during backward): one coalesced all-reduce over ``tp`` of
        the weight gradients block lowering leaves Partial over TP (``extra["tp_partial_grad_bytes"]``:
        SP norm weights, router, row biases), the tied-embedding gradient exchange (first and
        last stage), and the global gradient-norm all-reduce (fp32 scalar, gradient clipping) over
        the model-parallel axes, plus the DP shard axes when ZeRO shards gradients (it syncs all
        stages before the step, as Megatron's ``clip_grad_norm`` with its default ``clip_grad=1.0``;
        ``ddp_style="torch"`` models a plain ``optimizer.step()`` without it). Then every block's
        optimizer nodes (head first, scaled by the ZeRO shard factor) and, for ZeRO-1/2, each
        bucket's parameter all-gather.
        """
        ctx, plan = self.ctx, self.ctx.plan
        slots = sorted({s for ss in self.chunk_slots for s in ss}, reverse=True)
        done = tuple(dict.fromkeys([i for s in slots for i in self.reduce_last.get(s, ())]
                                   + [self.final_bwd_last[s] for s in slots if s in self.final_bwd_last
                                      and not self.reduce_last.get(s)]))
        tp_partial = sum(int(ctx.low(s).extra.get("tp_partial_grad_bytes", 0) or 0) for s in slots)
        if tp_partial and ctx.mesh.size("tp") > 1:
            done = (self._add("finalize.tp_partial_grads.all_reduce", NodeKind.COLL, data_deps=done,
                              comm=CollKind.ALL_REDUCE, comm_bytes=tp_partial, axes=("tp",), category="comm"),)
        if ctx.tied_copy is not None and (0 in slots or len(ctx.slot_block) - 1 in slots):
            # a 2-rank all-reduce as an exchange: same bytes per rank (ring: 2(n-1)/n x S = S) and,
            # unlike a collective over ("pp",), every member of the communicator takes part
            first = 0 in slots
            slot = 0 if first else len(ctx.slot_block) - 1
            kw = dict(comm_bytes=ctx.tied_copy.numel * ctx.grad_bytes, peer_axis="pp", peer_offset=-1 if first else 1,
                      tag=ctx.tag_tied, category="comm", layer=slot - 1)
            name = f"finalize.tied_embedding.{ctx.label(slot)}.grad"
            send = self._add(f"{name}.send", NodeKind.SEND, data_deps=done, **kw)
            recv = self._add(f"{name}.recv", NodeKind.RECV, data_deps=done, **kw)
            done = (send, recv)
        norm_axes = tuple(a for a in ("tp", *(shard_axes(plan, False) if plan.zero else ()), "pp")
                          if ctx.mesh.size(a) > 1)
        if norm_axes and plan.ddp_style == "megatron":  # torch style: a plain step, no clipping
            done = (self._add("finalize.grad_norm.all_reduce", NodeKind.COLL, data_deps=done,
                              comm=CollKind.ALL_REDUCE, comm_bytes=4, axes=norm_axes, category="comm"),)
        last: int | None = None
        dense_n = shard_factor(plan, ctx.mesh, False)
        expert_n = shard_factor(plan, ctx.mesh, True)
        for slot in slots:
            low = ctx.low(slot)
            aligned = len(low.optimizer) == len(low.weights)
            chain = [()] * len(low.optimizer)  # independent per weight; serialized by ``last`` below
            for k in range(len(low.optimizer)):
                n = expert_n if aligned and low.weights[k].expert else dense_n
                last = self._emit_list(low.optimizer, chain, (k,), done, (last,) if last is not None else (), {},
                                       f"opt.{ctx.label(slot)}.", -1, slot - 1, -1, 0, scale=n)
        if plan.overlap_param_gather:
            return  # gathered during the next step's forward (emitted at its start, see _param_gather_waits)
        # Megatron without overlap_param_gather: after the whole optimizer step, every bucket's
        # all-gather, synchronously one after the other (``start_param_sync`` per model chunk)
        prev = (last,) if last is not None else done
        for k, b in enumerate(self.all_buckets):
            if b.gather:
                prev = (self._param_gather(k, prev),)

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


def assemble(graph: Graph, plan: ParallelPlan, blocks: dict[str, BlockLowering], mesh: Mesh) -> list[Program]:
    """One Program per pipeline stage (``class_key {"pp": r}``) for one step of ``plan``.

    ``blocks`` maps ``"embedding"``, every layer kind of ``graph.layer_kinds`` and ``"head"`` to
    its :class:`BlockLowering`. See the module docstring for what is added.
    """
    with _paused_gc():
        ctx = _build_context(graph, plan, blocks, mesh)
        return [_Stage(ctx, r).build() for r in range(plan.pp)]


__all__ = ["assemble"]
