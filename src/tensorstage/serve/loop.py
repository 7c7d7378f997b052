"""The discrete-event loop: arrivals, routing and engine steps of every replica.

Events are kept in one heap of ``(time_s, seq, replica)`` step completions; arrivals are a sorted
array walked with a pointer (open loop) or created when a request finishes (closed loop: each of
``concurrency`` clients sends its next request when the previous one completes, as the benchmark
clients of vLLM, SGLang and genai-perf do). Ties are broken by insertion order, so a run is
deterministic. A replica that is idle starts a step as soon as work arrives; a step's requests and
duration are fixed when it starts (the engine schedules once per iteration). A run of decode-only
steps (:meth:`Replica.plan_decode_run`) is one event; a request routed to that replica during the
run cuts it after the step in progress (a newer plan version; the old end event is skipped), so
results equal stepping one iteration at a time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np

from tensorstage.gcpause import paused_gc
from tensorstage.serve.entities import RequestTable, StepLog
from tensorstage.serve.replica import Replica, StepPlan
from tensorstage.serve.routers import Router


def run_loop(req: RequestTable, replicas: Sequence[Replica], router: Router, concurrency: int = 0,
             log: StepLog | None = None, progress: Callable[[int], None] | None = None,
             decode_pool: Sequence[Replica] = (), decode_router: Router | None = None,
             transfer_s: Callable[[int], float] | None = None) -> float:
    """Simulate until every request finished; returns the time of the last event (s).

    ``concurrency`` > 0: closed loop; request ``i`` (i >= concurrency) arrives when an earlier one
    finishes, and ``req.arrival_s`` is filled in. Otherwise ``req.arrival_s`` must be sorted.
    Disaggregated serving: ``replicas`` are the prefill pool (role ``prefill``), ``decode_pool`` the
    decode replicas; a handed-off request reaches ``decode_router``'s choice ``transfer_s(r)``
    seconds after its first token (the KV transfer).

    Python's cycle collector is paused for the loop (restored after, also on error): the loop's
    objects are acyclic and freed by reference counting, while the collector's passes over the
    growing step log cost about 7 % of a long run.
    """
    with paused_gc():
        return _run_loop(req, replicas, router, concurrency, log, progress, decode_pool, decode_router, transfer_s)


def _run_loop(req: RequestTable, replicas: Sequence[Replica], router: Router, concurrency: int,
              log: StepLog | None, progress: Callable[[int], None] | None, decode_pool: Sequence[Replica],
              decode_router: Router | None, transfer_s: Callable[[int], float] | None) -> float:
    """:func:`run_loop`'s body (the same arguments)."""
    n = len(req)
    pools = list(replicas)
    replicas = pools + list(decode_pool)
    transfers: list[tuple[float, int, int]] = []  # (arrival at the decode pool, seq, request)
    heap: list[tuple[float, int, int, int]] = []  # (end time, seq, replica, plan version)
    plans: dict[int, StepPlan] = {}
    starts: dict[int, float] = {}
    version = [0] * len(replicas)
    seq = 0
    now = 0.0
    nxt = 0  # next request index to arrive
    if concurrency > 0:
        req.arrival_s[: min(concurrency, n)] = 0.0
        req.arrival_s[min(concurrency, n):] = np.inf
    released = min(concurrency, n) if concurrency > 0 else n
    done = 0

    def push(rep: Replica, end: float) -> None:
        nonlocal seq
        heapq.heappush(heap, (end, seq, rep.index, version[rep.index]))
        seq += 1

    def start(rep: Replica, t: float) -> None:
        plan = rep.plan_decode_run(t) or rep.plan()
        if plan is None:
            rep.busy = False
            return
        rep.busy = True
        plans[rep.index] = plan
        starts[rep.index] = t
        if log is not None and plan.step_durations_s is None:
            log.add(rep.index, t, t + plan.duration_s, plan.prefill_tokens + plan.decodes, plan.prefill_tokens,
                    plan.decodes, rep.running(), len(rep.waiting), rep.kv_blocks_used(), plan.emits)
        push(rep, t + plan.duration_s)

    def interrupt(rep: Replica, t: float) -> None:
        """A request arrived at a replica inside a run of decode steps: the run ends with the step in
        progress at ``t`` (the arrival joins the next step, as it would stepping one at a time)."""
        plan = plans[rep.index]
        if plan.step_durations_s is not None and rep.truncate_run(plan, starts[rep.index], t):
            version[rep.index] += 1
            push(rep, starts[rep.index] + plan.duration_s)

    # open loop: arrival times as Python floats (cheaper to compare than numpy scalars; same values)
    arrivals = req.arrival_s if concurrency > 0 else req.arrival_s.tolist()
    while done < n:
        t_arr = arrivals[nxt] if nxt < released else np.inf
        if transfers and transfers[0][0] <= t_arr and (not heap or transfers[0][0] < heap[0][0]):
            now, _, r = heapq.heappop(transfers)
            i = len(pools) + decode_router(r, req, decode_pool)  # type: ignore[misc]
            replicas[i].enqueue_prefilled(r)
            if not replicas[i].busy:
                start(replicas[i], now)
            else:
                interrupt(replicas[i], now)
            continue
        if heap and heap[0][0] <= t_arr:
            now, _, i, ver = heapq.heappop(heap)
            if ver != version[i]:
                continue  # a run cut short by an arrival: its old end event
            rep = replicas[i]
            plan = plans.pop(i)
            if log is not None and plan.step_durations_s is not None:
                log.add_run(i, starts[i], plan.step_durations_s, plan.decodes, rep.running(),
                            plan.step_kv_blocks)  # type: ignore[arg-type]
            finished = rep.complete(plan, now)
            done += len(finished)
            if rep.handoffs:
                for r in rep.handoffs:
                    heapq.heappush(transfers, (now + transfer_s(r), seq, r))  # type: ignore[misc]
                    seq += 1
                rep.handoffs.clear()
            if progress is not None and finished:
                progress(len(finished))
            if concurrency > 0:
                for _ in finished:
                    if released < n:
                        req.arrival_s[released] = now
                        released += 1
            start(rep, now)
            continue
        if not math.isfinite(t_arr):
            raise RuntimeError("serving loop stalled: requests remain but no step is scheduled")
        now = float(t_arr)
        # route every request arriving at this instant, then start idle replicas
        touched = []
        while nxt < released and arrivals[nxt] <= now:
            i = router(nxt, req, pools)
            replicas[i].enqueue(nxt)
            touched.append(i)
            nxt += 1
        for i in dict.fromkeys(touched):
            if not replicas[i].busy:
                start(replicas[i], now)
            else:
                interrupt(replicas[i], now)
    return now


__all__ = ["run_loop"]
