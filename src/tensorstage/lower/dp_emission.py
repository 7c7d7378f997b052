"""Data-parallel emission for step assembly: DDP / ZeRO-1/2 buckets, ZeRO-3 / FSDP units, finalize.

Step assembly (:mod:`.assemble`) expands the pipeline schedule into a stage's node list; this
module adds, at the hooks the expansion calls, every node that data parallelism and the
optimizer step bring, so the framework protocols (Megatron's distributed data parallel and
``finalize_model_grads``, torch FSDP2) live apart from the schedule expansion. Sizes (bucket
contents, per-unit collectives, static memory) come from :mod:`.dataparallel`; the stage
layout and schedule expansion they hook into are :mod:`.assemble`'s.

* **Data parallelism** (training only). DDP / ZeRO-1/2: flat
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
  not before the unit's previous reshard); gathered bytes live until the reshard. Gradient
  reduce-scatters per unit: with pipelining one per step after its last backward (torch's pipeline
  stages turn FSDP2's sync off until then; the gradients accumulate unsharded), without it one after
  every micro-batch's backward (FSDP2's default; gradients stay sharded); the root's once all its
  blocks are done. ZeRO-2 buckets likewise reduce after every micro-batch (sharded gradients). Hybrid sharding adds the all-reduce over
  ``dp_replicate``. ``reshard_after_forward=int`` (reshard to a smaller group) is not modelled.
* **Tied embeddings** with the embedding and head on different ranks: the last stage keeps a
  copy of the embedding table (Megatron), and the first and last stages sum their gradients
  (Megatron's all-reduce over its 2-rank embedding group). The mesh has no communicator for
  just those two ranks, and a collective over ``("pp",)`` that middle stages skip would hang
  ASTRA-sim (every group member must issue it; the trace validator rejects it), so it is an
  exchange: each end sends its gradient to the other along ``pp`` (offset -1 / +1, wrapping) —
  per rank exactly the bytes of a 2-rank ring all-reduce, 2(n-1)/n x S = S.
* **Finalize + optimizer** (Megatron's ``finalize_model_grads``, see :meth:`DataParallelEmitter.finish_step`):
  TP all-reduce of Partial weight grads, tied-embedding exchange, gradient-norm all-reduce
  (``ddp_style="megatron"`` only); then each block instance's optimizer nodes, FLOPs and bytes
  divided by the ZeRO shard factor, head first; ZeRO-1/2 then all-gather each bucket's updated
  parameters: without ``overlap_param_gather`` (Megatron-core's default) synchronously, one after
  the other, after the whole optimizer step; with it, during the (next) step's forward: with PP,
  Megatron-LM's default ``--align-param-gather`` dispatches every bucket's gather at the start of
  the schedule on all stages (chained in forward order) and the forward pre-hooks only wait; without
  PP the gathers are dispatched lazily from the step's first forward: the first forward of the module that starts a bucket (forward
  order) waits for that bucket's gather, dispatching it there if nothing did, and its completion
  dispatches the next bucket's (Megatron's ``finish_param_sync`` / ``next_param_gather_bucket_group``,
  per buffer: dense and expert chains, per model chunk). Like every framework's
  ``optimizer.step()``, the step waits for all reductions.

Hooks, in the order :class:`~tensorstage.lower.assemble.StageBuilder` calls them:

* :meth:`DataParallelEmitter.plan` — before the first action: FSDP use/gather/reshard plan and
  the initial gathers; DDP / ZeRO-1/2 buckets and the ``overlap_param_gather`` chains;
* :meth:`gathered` / :meth:`forward_waits` — the dependencies of a block instance's first node
  (its FSDP gather; its bucket's overlapped parameter all-gather);
* :meth:`after_use` — after a block instance: FSDP reshard (free) and the gathers issued there;
* :meth:`after_backward` — after a block's last-micro-batch backward: its gradient reductions;
* :meth:`forward_done` — after a forward action;
* :meth:`finish_step` — after the last action: finalize, optimizer, ZeRO-1/2 parameter gathers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tensorstage.lower.dataparallel import (
    Bucket,
    CommOp,
    UnitComm,
    make_buckets,
    reduces_every_microbatch,
    shard_axes,
    shard_factor,
    unit_comm,
)
from tensorstage.schedule.pipeline import Kind, StepComm
from tensorstage.schedule.program import CollKind, NodeKind

if TYPE_CHECKING:
    from tensorstage.lower.assemble import StageBuilder


class DataParallelEmitter:
    """DP / ZeRO / FSDP nodes and the optimizer step of one pipeline stage's Program."""

    def __init__(self, stage: StageBuilder) -> None:
        self.stage = stage
        ctx = self.ctx = stage.ctx
        plan = ctx.plan
        self.final_bwd_last: dict[int, int] = {}  # slot -> last backward node of its last micro-batch
        self.reduce_last: dict[int, list[int]] = {}  # slot -> ids of the reductions covering it
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
        self.root_slots = [s for s in (0, last_slot) if any(s in ss for ss in stage.chunk_slots)]
        self.root_pending = set(self.root_slots)
        self.root_pending_mb = set(self.root_slots)  # the same, for a non-final micro-batch's reductions
        self.reductions: dict[int, int] = {}  # reductions issued per slot (names)
        self._root_unit: UnitComm | None = None

    # --- hooks of the schedule expansion ----------------------------------------------------
    def plan(self, steps: Sequence[StepComm]) -> None:
        """Before the first action: FSDP plan and its first gathers, then the DP buckets."""
        if self.zero3:
            self.plan_fsdp(steps)
            self.emit_gathers(-1, None)
        self.plan_buckets()

    def gathered(self, i: int, slot: int) -> tuple[int | None, tuple[int, ...]]:
        """(FSDP use index or None, the gather the use of ``slot`` in action ``i`` waits for)."""
        j = self.use_index.get((i, slot))
        return j, ((self.gather_last[j],) if j is not None and j in self.gather_last else ())

    def forward_waits(self, chunk: int, slot: int, here: tuple[int, ...]) -> tuple[int, ...]:
        """Overlapped ZeRO-1/2 parameter gathers the first forward of ``slot`` in ``chunk`` waits for."""
        if self.pg_starts and chunk not in self.pg_chunks_done:
            return self.param_gather_waits(slot, here)
        return ()

    def forward_done(self, chunk: int) -> None:
        """A forward action of ``chunk`` ended: later micro-batches find the parameters gathered."""
        self.pg_chunks_done.add(chunk)

    def after_use(self, j: int | None, slot: int, last: int | None) -> None:
        """After FSDP use ``j`` of ``slot``: free its gathered params if it reshards, issue gathers."""
        if j is None:
            return
        if j in self.reshard_at and last is not None:
            node = self.stage.nodes[last]
            node.mem_free_bytes += self.unit(slot).gathered_bytes
            node.mem_free_comm_bytes += self.unit(slot).gathered_bytes
        self.emit_gathers(j, last)

    # --- emission ---------------------------------------------------------------------------
    def emit_ops(self, ops: Sequence[CommOp], name: str, deps: tuple[int, ...], ctrl: tuple[int, ...] = (),
                  **kw: object) -> int | None:
        """A chain of DP collectives (each after the previous); returns the last id."""
        last = None
        for k, op in enumerate(ops):
            d = deps if last is None else (last,)
            last = self.stage.add(f"{name}.{CollKind(op.kind).name.lower()}" + (f"{k}" if len(ops) > 1 else ""),
                             NodeKind.COLL, data_deps=d, ctrl_deps=ctrl if k == 0 else (), comm=op.kind,
                             comm_bytes=op.comm_bytes, axes=op.axes, category="comm", **kw)
        return last


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

    def plan_fsdp(self, steps: Sequence[StepComm]) -> None:
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
            for slot in self.stage.slots_of(st.action):
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

    def emit_gathers(self, after_use: int, dep: int | None) -> None:
        for j in self.gather_after.get(after_use, ()):
            _, slot = self.uses[j]
            unit = self.unit(slot)
            deps = (dep,) if dep is not None else ()
            first = len(self.stage.nodes)
            label = "root" if self.unit_key(slot) == -1 else self.ctx.label(slot)
            last = self.emit_ops(unit.gather, f"fsdp.use{j}.{label}.param", deps, layer=slot - 1)
            if last is not None:
                self.stage.nodes[first].mem_alloc_bytes += unit.gathered_bytes
                self.gather_last[j] = last

    def plan_buckets(self) -> None:
        ctx, plan = self.ctx, self.ctx.plan
        if not ctx.train or plan.zero == 3:
            return
        for slots in self.stage.chunk_slots:
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
                    if plan.pp > 1:
                        # Megatron-LM's default --align-param-gather: with PP the schedule dispatches
                        # every bucket's all-gather at its start on all stages at once (param_sync_func);
                        # the forward pre-hook only waits. (Lazy per-stage dispatch would put each stage's
                        # gathers on the first micro-batch's path through the whole pipeline.)
                        prev: tuple[int, ...] = ()
                        for k in fwd_order:
                            prev = (self._param_gather(k, prev),)


    def _param_gather(self, k: int, deps: tuple[int, ...]) -> int:
        """Emit the post-step parameter all-gather of bucket ``k`` (once); returns its last node."""
        if k not in self.pg_issued:
            b = self.all_buckets[k]
            last = self.emit_ops(b.gather, f"dp.{'expert_' if b.expert else ''}bucket{k}.param",
                                  tuple(dict.fromkeys(deps)))
            assert last is not None
            self.pg_issued[k] = last
        return self.pg_issued[k]

    def param_gather_waits(self, slot: int, here: tuple[int, ...]) -> tuple[int, ...]:
        """Megatron's forward pre-hook with ``overlap_param_gather`` (``finish_param_sync``): the
        first forward of a module waits for its bucket's all-gather of the parameters the previous
        step updated, dispatching it now if nothing did; once it completes, the next bucket's
        all-gather (forward order) is dispatched, so it overlaps this bucket's forward."""
        waits = []
        for k in self.pg_starts.get(slot, ()):
            g = self._param_gather(k, here)
            waits.append(g)
            if k in self.pg_next and self.ctx.plan.pp == 1:  # PP > 1: all dispatched at the start
                self._param_gather(self.pg_next[k], (g,))
        return tuple(waits)


    def after_backward(self, slot: int, last: int | None, final: bool) -> None:
        """After a block's backward: issue the reductions it completes (the last micro-batch's, or
        every micro-batch's when :func:`.dataparallel.reduces_every_microbatch`)."""
        if last is None or not (final or reduces_every_microbatch(self.ctx.plan)):
            return
        ctx = self.ctx
        label = ctx.label(slot)
        n = self.reductions.get(slot, 0)
        self.reductions[slot] = n + 1
        tag = "" if final else f".mb{n}"
        if final:
            self.final_bwd_last[slot] = last
        if self.zero3:
            covered = [slot]
            if self.unit_key(slot) == -1:  # the root unit reduces once all its blocks are done
                pending = self.root_pending if final else self.root_pending_mb
                pending.discard(slot)
                if pending:
                    return
                if not final:
                    self.root_pending_mb = set(self.root_slots)
                label, covered = "root", self.root_slots
            red = self.emit_ops(self.unit(slot).reduce, f"fsdp.{label}.grad{tag}", (last,), layer=slot - 1)
            if red is not None:
                for s in covered:
                    self.reduce_last.setdefault(s, []).append(red)
            return
        for k, b in enumerate(self.buckets.get(slot, ())):
            name = f"dp.{'expert_' if b.expert else ''}bucket.{label}.{k}.grad{tag}"
            red = self.emit_ops(b.reduce, name, (last,), layer=slot - 1)
            if red is not None:
                for s in b.slots:
                    self.reduce_last.setdefault(s, []).append(red)

    def finish_step(self) -> None:
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
        slots = sorted({s for ss in self.stage.chunk_slots for s in ss}, reverse=True)
        done = tuple(dict.fromkeys([i for s in slots for i in self.reduce_last.get(s, ())]
                                   + [self.final_bwd_last[s] for s in slots if s in self.final_bwd_last
                                      and not self.reduce_last.get(s)]))
        tp_partial = sum(int(ctx.low(s).extra.get("tp_partial_grad_bytes", 0) or 0) for s in slots)
        if tp_partial and ctx.mesh.size("tp") > 1:
            done = (self.stage.add("finalize.tp_partial_grads.all_reduce", NodeKind.COLL, data_deps=done,
                              comm=CollKind.ALL_REDUCE, comm_bytes=tp_partial, axes=("tp",), category="comm"),)
        if ctx.tied_copy is not None and (0 in slots or len(ctx.slot_block) - 1 in slots):
            # a 2-rank all-reduce as an exchange: same bytes per rank (ring: 2(n-1)/n x S = S) and,
            # unlike a collective over ("pp",), every member of the communicator takes part
            first = 0 in slots
            slot = 0 if first else len(ctx.slot_block) - 1
            kw = dict(comm_bytes=ctx.tied_copy.numel * ctx.grad_bytes, peer_axis="pp", peer_offset=-1 if first else 1,
                      tag=ctx.tag_tied, category="comm", layer=slot - 1)
            name = f"finalize.tied_embedding.{ctx.label(slot)}.grad"
            send = self.stage.add(f"{name}.send", NodeKind.SEND, data_deps=done, **kw)
            recv = self.stage.add(f"{name}.recv", NodeKind.RECV, data_deps=done, **kw)
            done = (send, recv)
        norm_axes = tuple(a for a in ("tp", *(shard_axes(plan, False) if plan.zero else ()), "pp")
                          if ctx.mesh.size(a) > 1)
        if norm_axes and plan.ddp_style == "megatron":  # torch style: a plain step, no clipping
            done = (self.stage.add("finalize.grad_norm.all_reduce", NodeKind.COLL, data_deps=done,
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
                last = self.stage.emit_list(low.optimizer, chain, (k,), done, (last,) if last is not None else (), {},
                                       f"opt.{ctx.label(slot)}.", -1, slot - 1, -1, 0, scale=n)
        if plan.overlap_param_gather:
            return  # gathered during the next step's forward (emitted at its start, see param_gather_waits)
        # Megatron without overlap_param_gather: after the whole optimizer step, every bucket's
        # all-gather, synchronously one after the other (``start_param_sync`` per model chunk)
        prev = (last,) if last is not None else done
        for k, b in enumerate(self.all_buckets):
            if b.gather:
                prev = (self._param_gather(k, prev),)



__all__ = ["DataParallelEmitter"]
