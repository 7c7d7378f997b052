"""The discrete-event loop: arrivals, routing and engine steps of every replica.

Events are kept in one heap of ``(time_s, seq, replica)`` step completions; arrivals are a sorted
array walked with a pointer (open loop) or created when a request finishes (closed loop: each of
``concurrency`` clients sends its next request when the previous one completes, as the benchmark
clients of vLLM, SGLang and genai-perf do). Ties are broken by insertion order, so a run is
deterministic. A replica that is idle starts a step as soon as work arrives; a step's requests and
duration are fixed when it starts (the engine schedules once per iteration).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import numpy as np

from tensorstage.serve.entities import RequestTable, StepLog
from tensorstage.serve.replica import Replica, StepPlan
from tensorstage.serve.routers import Router


def run_loop(req: RequestTable, replicas: Sequence[Replica], router: Router, concurrency: int = 0,
             log: StepLog | None = None, progress: Callable[[int], None] | None = None) -> float:
    """Simulate until every request finished; returns the time of the last event (s).

    ``concurrency`` > 0: closed loop; request ``i`` (i >= concurrency) arrives when an earlier one
    finishes, and ``req.arrival_s`` is filled in. Otherwise ``req.arrival_s`` must be sorted.
    """
    n = len(req)
    heap: list[tuple[float, int, int]] = []
    plans: dict[int, StepPlan] = {}
    seq = 0
    now = 0.0
    nxt = 0  # next request index to arrive
    if concurrency > 0:
        req.arrival_s[: min(concurrency, n)] = 0.0
        req.arrival_s[min(concurrency, n):] = np.inf
    released = min(concurrency, n) if concurrency > 0 else n
    done = 0

    def start(rep: Replica, t: float) -> None:
        nonlocal seq
        plan = rep.plan()
        if plan is None:
            rep.busy = False
            return
        rep.busy = True
        plans[rep.index] = plan
        end = t + plan.duration_s
        if log is not None:
            log.add(rep.index, t, end, int(plan.new_tokens.sum()), plan.prefill_tokens, plan.decodes,
                    rep.running(), len(rep.waiting), rep.kv_blocks_used(), plan.emits)
        heapq.heappush(heap, (end, seq, rep.index))
        seq += 1

    while done < n:
        t_arr = req.arrival_s[nxt] if nxt < released else np.inf
        if heap and heap[0][0] <= t_arr:
            now, _, i = heapq.heappop(heap)
            rep = replicas[i]
            finished = rep.complete(plans.pop(i), now)
            done += len(finished)
            if progress is not None and finished:
                progress(len(finished))
            if concurrency > 0:
                for _ in finished:
                    if released < n:
                        req.arrival_s[released] = now
                        released += 1
            start(rep, now)
            continue
        if not np.isfinite(t_arr):
            raise RuntimeError("serving loop stalled: requests remain but no step is scheduled")
        now = float(t_arr)
        # route every request arriving at this instant, then start idle replicas
        touched = []
        while nxt < released and req.arrival_s[nxt] <= now:
            i = router(nxt, req, replicas)
            replicas[i].enqueue(nxt)
            touched.append(i)
            nxt += 1
        for i in dict.fromkeys(touched):
            if not replicas[i].busy:
                start(replicas[i], now)
    return now


__all__ = ["run_loop"]
