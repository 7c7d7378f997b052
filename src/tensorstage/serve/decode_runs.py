"""Runs of decode-only steps planned as one event (a speed device with results equal to single steps).

When every running request of a replica is decoding and none waits, consecutive steps differ only
by each context growing by one, so their durations can be computed together
(:meth:`tensorstage.serve.predictor.IterationPredictor.decode_run_s`) and the run becomes one event
of the loop; a request arriving at the replica during the run cuts it after the step in progress
(:meth:`DecodeRuns.truncate_run`). Mixed into :class:`tensorstage.serve.replica.Replica`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from tensorstage.serve.engines import EngineProfile
from tensorstage.serve.predictor import IterationPredictor


@dataclass(slots=True)
class StepPlan:
    """What one step runs: slots and their new tokens, and its predicted duration."""

    slots: np.ndarray
    new_tokens: np.ndarray
    is_decode: np.ndarray
    duration_s: float
    prefill_tokens: int
    decodes: int
    emits: int  # output tokens this step produces (decodes + prefills reaching their end)
    steps: int = 1  # > 1: a run of identical decode-only steps (see Replica.plan_decode_run)
    step_durations_s: np.ndarray | None = None
    step_kv_blocks: np.ndarray | None = None


class DecodeRuns:
    """Decode-run planning; uses the replica's slot arrays, KV blocks and predictor."""

    # provided by Replica
    profile: EngineProfile
    predictor: IterationPredictor
    waiting: deque[int]
    slot_req: np.ndarray
    computed: np.ndarray
    target: np.ndarray
    gen: np.ndarray
    out: np.ndarray
    blocks: np.ndarray
    block: int
    free_blocks: int
    decode_runs: bool
    _run_cap: int
    _held: np.ndarray

    def _blocks_for(self, tokens: np.ndarray | int) -> np.ndarray | int:
        return (tokens + (self.block - 1)) // self.block  # ceil(tokens / block) for integers

    def kv_blocks_used(self) -> int:
        """KV blocks held by running requests (total - free; Replica defines the total)."""
        raise NotImplementedError

    def truncate_run(self, plan: StepPlan, start_s: float, t: float) -> bool:
        """Shorten a planned run to the steps that start at or before ``t``; False if none is cut."""
        d = plan.step_durations_s
        assert d is not None and plan.step_kv_blocks is not None
        # steps that begin at or before t (begin of step i: start + the running sum of the first i)
        k = 0
        elapsed = 0.0
        for x in d.tolist():
            if start_s + elapsed > t:
                break
            k += 1
            elapsed += x
        if k >= plan.steps:
            return False
        act = plan.slots
        c = self.computed[act]
        old = self.blocks[act].copy()
        self.blocks[act] = np.maximum(self._blocks_for(c + k), self._held[act])
        self.free_blocks += int((old - self.blocks[act]).sum())
        self._run_cap = max(4, 2 * k)  # runs here get cut after about k steps: plan shorter ones
        plan.steps = k
        plan.new_tokens = np.full(len(act), k, dtype=np.int64)
        plan.step_durations_s = d[:k]
        plan.step_kv_blocks = plan.step_kv_blocks[:k]
        plan.duration_s = float(d[:k].sum())
        plan.emits = plan.decodes * k
        return True

    def plan_decode_run(self, start_s: float, max_steps: int | None = None) -> StepPlan | None:
        """Several decode-only steps as one event, when nothing can change between them.

        Applies when every running request is decoding, none waits, and the batch fits the token
        budget: then each step runs the same requests with contexts one longer, until the first
        request finishes (or ``max_steps``); the event loop cuts the run short when a request
        arrives (:meth:`truncate_run`). Durations are the predictor's for each step
        (:meth:`IterationPredictor.decode_run_s`), so the result equals stepping one at a time.
        Returns None when fewer than two steps qualify (the caller plans a single step)."""
        prof = self.profile
        if self.waiting or not self.decode_runs or prof.policy != "continuous":
            return None
        act = (self.slot_req >= 0).nonzero()[0]
        n = len(act)
        if n == 0 or (prof.max_num_batched_tokens and n > prof.max_num_batched_tokens):
            return None
        c = self.computed[act]
        if (c < self.target[act]).any():
            return None
        k = min(int((self.out[act] - self.gen[act]).min()), max_steps or self._run_cap)
        if k < 2:
            return None
        have = self.blocks[act]
        # each slot needs at most k // block + 1 new blocks: check exactly only when that may not fit
        while k >= 2 and self.free_blocks < n * (k // self.block + 1) and \
                int(np.maximum(self._blocks_for(c + k) - have, 0).sum()) > self.free_blocks:
            k //= 2
        if k < 2:
            return None
        graph = prof.cuda_graph and n <= prof.cuda_graph_max_batch
        d = self.predictor.decode_run_s(c + 1.0, k, prof.scheduler_cpu_s, prof.cuda_graph_kernel_gap_s if graph else None)
        self._held[act] = have
        # new blocks by the end of each step j = 1..k: ceil((c + j) / block) - have, at least 0
        need = self._blocks_for(np.add.outer(np.arange(1, k + 1), c))  # row j - 1: blocks after step j
        grow = np.maximum(need - have, 0).sum(axis=1)
        used_before = self.kv_blocks_used()
        self.blocks[act] = np.maximum(need[-1], have)
        self.free_blocks -= int(grow[-1])
        if k == self._run_cap:
            self._run_cap = min(2 * k, 1024)
        return StepPlan(act, np.full(n, k, dtype=np.int64), np.ones(n, dtype=bool), float(np.add.reduce(d)), 0, n,
                        n * k, steps=k, step_durations_s=d, step_kv_blocks=used_before + grow)
