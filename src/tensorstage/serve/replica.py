"""One model replica: a waiting queue, running slots, a paged KV cache and the engine's step policy.

**Continuous batching** (vLLM / SGLang / TensorRT-LLM in-flight batching), per step:

1. Running requests in decode take one token each from the token budget
   (``max_num_batched_tokens``; 0 = unlimited) in admission order. A decode that needs a new KV
   block when none is free preempts the most recently admitted running request (vLLM's
   preemption by recompute: its blocks are freed, it goes back to the front of the queue and later
   re-prefills its prompt plus the tokens it had generated).
2. Running requests still in prefill take a chunk of their remaining prompt (chunked prefill), in
   admission order, while budget and KV blocks last. Without chunked prefill a prompt runs whole
   (one longer than the budget only in a step with no other prefill).
3. Waiting requests are admitted in FCFS order while a slot (``max_num_seqs``), budget and KV
   blocks for their first chunk remain (with ``kv_reserve_full``, TensorRT-LLM's
   GUARANTEED_NO_EVICT: blocks for the whole prompt + output, reserved at admission, so step 1
   never preempts). With a prefix cache, a request whose prefix this replica has
   computed before starts with those tokens already in its KV (whole blocks only).
4. The step's cost comes from the predictor; at its end every decode produced one token and every
   prefill that reached the end of its prompt produced the first (or next) token. A request that
   has all its output tokens frees its slot and blocks.

**Static batching** (TensorRT-LLM gptSession): when nothing runs, up to ``max_num_seqs`` waiting
requests are admitted with KV for their whole prompt + output reserved; the first step prefills
every prompt, then decode steps run until the batch's longest request finishes.

**Disaggregation** (``role``): a ``prefill`` replica hands a request off when its first token is
out (slot and KV blocks freed; the loop delivers it to the decode pool after the KV transfer); a
``decode`` replica admits handed-off requests with their prompt already in its KV cache, ahead of
any scheduling, while slots and blocks last (decode admission).

Per-slot state is numpy arrays over ``max_num_seqs`` slots, so a step costs a few vector
operations whatever the batch size.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from tensorstage.serve.decode_runs import DecodeRuns, StepPlan
from tensorstage.serve.engines import EngineProfile
from tensorstage.serve.entities import RequestTable
from tensorstage.serve.predictor import IterationPredictor

_sum = np.add.reduce  # np.sum of a 1-d array without its Python wrapper (the same result)


def _joined(dec_slots: np.ndarray, pre_slots: list[int], pre_new: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, new tokens, is-decode) of a continuous step: its decodes, then its prefill chunks."""
    n_dec = len(dec_slots)
    if not pre_slots:
        return dec_slots, np.ones(n_dec, dtype=np.int64), np.ones(n_dec, dtype=bool)
    slots = np.concatenate((dec_slots, np.array(pre_slots, dtype=np.int64)))
    new = np.concatenate((np.ones(n_dec, dtype=np.int64), np.array(pre_new, dtype=np.int64)))
    is_dec = np.zeros(len(slots), dtype=bool)
    is_dec[:n_dec] = True
    return slots, new, is_dec


class Replica(DecodeRuns):
    """One replica's scheduler state (module docstring); runs of decode steps: :class:`DecodeRuns`."""

    def __init__(self, index: int, profile: EngineProfile, predictor: IterationPredictor,
                 kv_capacity_tokens: int, requests: RequestTable, role: str = "both") -> None:
        self.index = index
        self.role = role  # both | prefill (hands requests off after the first token) | decode
        self.handoffs: list[int] = []  # prefill role: requests whose KV leaves after the last step
        self._prefilled: set[int] = set()  # decode role: queued requests whose prompt KV arrived
        self.profile = profile
        self.predictor = predictor
        self.req = requests
        self.block = profile.block_tokens
        self.total_blocks = kv_capacity_tokens // self.block
        self.free_blocks = self.total_blocks
        n = profile.max_num_seqs
        self.slot_req = np.full(n, -1, dtype=np.int64)
        self._running = 0  # slots holding a request (slot_req >= 0), kept as requests come and go
        self.computed = np.zeros(n, dtype=np.int64)  # tokens whose KV is in the cache
        self.target = np.zeros(n, dtype=np.int64)  # tokens to prefill (prompt, + generated after preemption)
        self.gen = np.zeros(n, dtype=np.int64)  # output tokens produced
        self.out = np.zeros(n, dtype=np.int64)  # output tokens wanted
        self.blocks = np.zeros(n, dtype=np.int64)
        self._held = np.zeros(n, dtype=np.int64)  # blocks held before the current run of decode steps
        self.order = np.zeros(n, dtype=np.int64)  # admission counter (FCFS priority)
        self._counter = 0
        self.waiting: deque[int] = deque()
        self.prefix_seen: set[int] = set()
        self._gen_store: dict[int, int] = {}  # output tokens of preempted requests, kept for their resume
        self.busy = False
        self.decode_runs = True  # plan runs of decode-only steps as one event (same results, faster)
        self._run_cap = 16  # longest run planned next: adapts to how soon arrivals cut runs (speed only)
        self.outstanding_tokens = 0  # prompt + output tokens of requests routed here and not finished
        self.preemptions = 0
        self.prefix_hits = 0
        self.prefix_lookups = 0

    # --- queue ------------------------------------------------------------------------------
    def enqueue(self, r: int) -> None:
        """A request routed to this replica joins the waiting queue."""
        self.waiting.append(r)
        self.outstanding_tokens += int(self.req.prompt_tokens[r] + self.req.output_tokens[r])

    def enqueue_prefilled(self, r: int) -> None:
        """Disaggregated decode: a request whose prompt KV (and first token) came from a prefill pool."""
        self._prefilled.add(r)
        self.enqueue(r)

    def _admit_prefilled(self) -> None:
        """Admit queued handed-off requests (FCFS) while slots and KV blocks for prompt + 1 last."""
        free_slots = np.flatnonzero(self.slot_req < 0)
        fi = 0
        while self.waiting and self.waiting[0] in self._prefilled and fi < len(free_slots):
            r = self.waiting[0]
            prompt = int(self.req.prompt_tokens[r])
            need = int(self._blocks_for(prompt + 1))
            if need > self.free_blocks:
                break
            self.waiting.popleft()
            self._prefilled.discard(r)
            s = int(free_slots[fi])
            fi += 1
            self.slot_req[s] = r
            self._running += 1
            self.computed[s] = prompt
            self.target[s] = prompt
            self.gen[s] = 1
            self.out[s] = int(self.req.output_tokens[r])
            self.order[s] = self._counter
            self._counter += 1
            self.blocks[s] = need
            self.free_blocks -= need
            self.req.replica[r] = self.index

    def has_work(self) -> bool:
        """Anything running or waiting."""
        return bool(self.waiting) or self._running > 0

    def running(self) -> int:
        """Requests holding a slot."""
        return self._running

    def kv_blocks_used(self) -> int:
        """KV blocks held by running requests."""
        return self.total_blocks - self.free_blocks

    # --- scheduling -------------------------------------------------------------------------
    def _preempt(self, s: int) -> None:
        r = int(self.slot_req[s])
        self.free_blocks += int(self.blocks[s])
        self.blocks[s] = 0
        self.slot_req[s] = -1
        self._running -= 1
        self._gen_store[r] = int(self.gen[s])
        self.req.preemptions[r] += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _admit(self, r: int, slot: int, static: bool) -> int:
        """Put request ``r`` in ``slot``; returns tokens already cached (prefix hit)."""
        prompt = int(self.req.prompt_tokens[r])
        gen = self._gen_store.pop(r, 0)
        cached = 0
        pid = int(self.req.prefix_id[r])
        if self.profile.prefix_caching and pid >= 0 and gen == 0:
            self.prefix_lookups += 1
            if pid in self.prefix_seen:
                self.prefix_hits += 1
                cached = (int(self.req.prefix_tokens[r]) // self.block) * self.block
                cached = min(cached, prompt - 1)
            self.prefix_seen.add(pid)
        self.slot_req[slot] = r
        self._running += 1
        self.computed[slot] = cached
        self.target[slot] = prompt + gen
        self.gen[slot] = gen
        self.out[slot] = int(self.req.output_tokens[r])
        self.order[slot] = self._counter
        self._counter += 1
        full = static or self.profile.kv_reserve_full
        need = int(self._blocks_for(prompt + self.out[slot] if full else cached))
        self.blocks[slot] = need
        self.free_blocks -= need
        self.req.replica[r] = self.index
        self.req.cached_tokens[r] = max(self.req.cached_tokens[r], cached)
        return cached

    def schedule(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Choose the next step's (slots, new tokens, is-decode); empty arrays when idle."""
        if self.profile.policy == "static":
            return self._schedule_static()
        dec_slots, pre_slots, pre_new = self._schedule_continuous()
        return _joined(dec_slots, pre_slots, pre_new)

    def _schedule_static(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        active = self.slot_req >= 0
        if not active.any():
            slot = 0
            while self.waiting and slot < len(self.slot_req):
                r = self.waiting[0]
                need = int(self._blocks_for(int(self.req.prompt_tokens[r] + self.req.output_tokens[r])))
                if need > self.free_blocks:
                    break
                self.waiting.popleft()
                self._admit(r, slot, static=True)
                slot += 1
            active = self.slot_req >= 0
        live = active & (self.gen < self.out)
        slots = np.flatnonzero(live)
        is_dec = self.computed[slots] >= self.target[slots]
        new = np.where(is_dec, 1, self.target[slots] - self.computed[slots])
        return slots, new, is_dec

    def _schedule_continuous(self) -> tuple[np.ndarray, list[int], list[int]]:
        """The step's decode slots (one token each, admission order when the budget cuts them) and
        its prefill slots with their chunks (running prefills oldest first, then admissions)."""
        prof = self.profile
        if self._prefilled:
            self._admit_prefilled()
        budget = prof.max_num_batched_tokens or (1 << 62)
        active = self.slot_req >= 0
        ready = self.computed >= self.target
        dec = active & ready
        # decodes: one token each, oldest first; a missing KV block preempts the newest request
        dec_slots = dec.nonzero()[0]
        if self.free_blocks < len(dec_slots):
            while self.free_blocks < int(np.count_nonzero(dec)):  # each decode needs at most one new block
                need = self._blocks_for(self.computed + 1) - self.blocks
                short = int(np.maximum(need[dec], 0).sum()) - self.free_blocks
                if short <= 0:
                    break
                victim = int(np.argmax(np.where(active, self.order, -1)))
                self._preempt(victim)
                active[victim] = False
                dec[victim] = False
            dec_slots = dec.nonzero()[0]
        if len(dec_slots) > budget:
            dec_slots = dec_slots[np.argsort(self.order[dec_slots], kind="stable")[:budget]]
            grow = np.maximum(self._blocks_for(self.computed[dec_slots] + 1) - self.blocks[dec_slots], 0)
            self.blocks[dec_slots] += grow
            self.free_blocks -= int(_sum(grow))
        elif len(dec_slots):
            # every decoding slot takes a token: its new block (if any) over the whole slot array,
            # ceil((computed + 1) / block) - blocks, kept where positive and decoding
            grow = (self.computed + self.block) // self.block - self.blocks
            grow[~dec] = 0
            np.maximum(grow, 0, out=grow)
            self.blocks += grow
            self.free_blocks -= int(_sum(grow))
        budget -= len(dec_slots)
        pre_slots: list[int] = []
        pre_new: list[int] = []
        # running prefills (partially computed), oldest first
        pre = (active & ~ready).nonzero()[0]
        if len(pre) > 1:
            pre = pre[np.argsort(self.order[pre], kind="stable")]
        stop = False
        for s in pre.tolist():
            if budget <= 0:
                break
            chunk = self._chunk(s, budget)
            if chunk == 0:
                stop = True
                break
            pre_slots.append(s)
            pre_new.append(chunk)
            budget -= chunk
        # admit waiting requests FCFS
        if stop or not self.waiting or budget <= 0:
            return dec_slots, pre_slots, pre_new
        free_slots = (self.slot_req < 0).nonzero()[0].tolist()
        fi = 0
        prompts = self.req.prompt_tokens
        while self.waiting and fi < len(free_slots) and budget > 0:
            r = self.waiting[0]
            first = int(prompts[r]) + self._gen_store.get(r, 0)
            # an unchunked prompt longer than the budget runs whole in a step with no other prefill
            prefilling = len(pre_slots) > 0
            if not prof.chunked_prefill and first > budget and prefilling:
                break
            if prof.kv_reserve_full:
                need = int(self._blocks_for(int(prompts[r]) + int(self.req.output_tokens[r])))
            else:
                need = int(self._blocks_for(min(first, budget) if prof.chunked_prefill else first))
            if need > self.free_blocks:
                break
            self.waiting.popleft()
            s = free_slots[fi]
            fi += 1
            self._admit(r, s, static=False)
            chunk = self._chunk(s, budget if prof.chunked_prefill or prefilling else 1 << 62)
            if chunk == 0:  # cannot happen after the block check; keep the request queued
                self._preempt_back(s, r)
                break
            pre_slots.append(s)
            pre_new.append(chunk)
            budget -= chunk
        return dec_slots, pre_slots, pre_new

    def _preempt_back(self, s: int, r: int) -> None:
        self.free_blocks += int(self.blocks[s])
        self.blocks[s] = 0
        self.slot_req[s] = -1
        self._running -= 1
        self.waiting.appendleft(r)

    def _chunk(self, s: int, budget: int) -> int:
        """Tokens of slot ``s``'s remaining prefill that fit the budget and free KV blocks (0: none)."""
        computed, held = int(self.computed[s]), int(self.blocks[s])
        remaining = int(self.target[s]) - computed
        chunk = min(remaining, budget) if self.profile.chunked_prefill else remaining
        if not self.profile.chunked_prefill and remaining > budget:
            return 0
        room = (held + self.free_blocks) * self.block - computed
        chunk = min(chunk, room) if self.profile.chunked_prefill else (chunk if chunk <= room else 0)
        if chunk <= 0:
            return 0
        grow = -(-(computed + chunk) // self.block) - held
        if grow > 0:
            self.blocks[s] += grow
            self.free_blocks -= grow
        return chunk

    # --- costing and completion -------------------------------------------------------------------
    def plan(self) -> StepPlan | None:
        """The next step with its duration, or None when there is nothing to run."""
        prof = self.profile
        if prof.policy == "static":
            slots, new, is_dec = self._schedule_static()
            if len(slots) == 0:
                return None
            dec_slots, pre_slots, n_pre = slots[is_dec], slots[~is_dec], new[~is_dec]
            prefix = self.computed[pre_slots]
            finishing = int(np.count_nonzero((prefix + n_pre) >= self.target[pre_slots]))
            prefill_tokens = int(_sum(n_pre))
        else:
            dec_slots, pre_list, n_pre = self._schedule_continuous()
            if len(dec_slots) == 0 and not pre_list:
                return None
            prefix = [int(self.computed[s]) for s in pre_list]
            finishing = sum(1 for s, p, c in zip(pre_list, prefix, n_pre, strict=True) if p + c >= self.target[s])
            prefill_tokens = sum(n_pre)
            slots, new, is_dec = _joined(dec_slots, pre_list, n_pre)
        dec_ctx = self.computed[dec_slots] + 1.0  # float64 of the integer contexts (what the predictor takes)
        n_dec = len(dec_slots)
        graph = prof.cuda_graph and n_dec == len(slots) and n_dec <= prof.cuda_graph_max_batch
        dur = self.predictor.step_s(n_pre, prefix, dec_ctx, n_dec + finishing, prof.scheduler_cpu_s,
                                    prof.cuda_graph_kernel_gap_s if graph else None)
        return StepPlan(slots, new, is_dec, dur, prefill_tokens, n_dec, n_dec + finishing)

    def complete(self, plan: StepPlan, end_s: float) -> list[int]:
        """Apply a finished step at ``end_s``; returns the requests that finished."""
        s = plan.slots
        if plan.steps > 1:
            # a run of decode steps: every slot was decoding (so has its first token) and emitted
            self.computed[s] += plan.steps
            es = s
            g = self.gen[es]
        else:
            self.computed[s] += plan.new_tokens
            es = s[self.computed[s] >= self.target[s]]
            g = self.gen[es]
            first = es[g == 0]
            if len(first):
                self.req.first_token_s[self.slot_req[first]] = end_s
        g += plan.steps
        self.gen[es] = g
        if self.role == "prefill":  # first token out: the request moves to the decode pool
            moving = es[(g == 1) & (self.out[es] > 1)]
            if len(moving):
                rs = [int(r) for r in self.slot_req[moving]]
                self.handoffs.extend(rs)
                for r in rs:
                    self.outstanding_tokens -= int(self.req.prompt_tokens[r] + self.req.output_tokens[r])
                self._release(moving)
                es = es[self.slot_req[es] >= 0]
                g = self.gen[es]
        done = es[g >= self.out[es]]
        finished: list[int] = []
        if len(done):
            rs = self.slot_req[done]
            finished = rs.tolist()
            self.req.finish_s[rs] = end_s
            self.outstanding_tokens -= int(_sum(self.req.prompt_tokens[rs] + self.req.output_tokens[rs]))
            if self.profile.policy == "continuous":
                self._release(done)
        if self.profile.policy == "static":
            active = self.slot_req >= 0
            if active.any() and not (self.gen[active] < self.out[active]).any():
                self._release(np.flatnonzero(active))
        return finished

    def _release(self, slots: np.ndarray) -> None:
        self.free_blocks += int(_sum(self.blocks[slots]))
        self.blocks[slots] = 0
        self.slot_req[slots] = -1
        self._running -= len(slots)
