"""Unit-time evaluation of a pipeline order: makespan, bubbles and in-flight microbatches.

This is deliberately tiny and independent of the full simulator: it exists so that tests (and
users comparing schedules) can check an order against closed forms such as the 1F1B bubble
``(p-1)/m``. Each rank runs its actions in list order; an action starts when the rank is free
and every action it depends on has finished (plus ``t_comm`` when that action ran on another
rank). Since the order per rank is fixed, start times are fully determined, and the evaluation
order below does not change them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tensorstage.errors import require
from tensorstage.schedule.pipeline import Action, DepKey, Kind, completes, dependencies


class DeadlockError(ValueError):
    """The order cannot run: some rank waits for an action that can never finish."""


@dataclass(frozen=True)
class SimResult:
    """Outcome of `simulate_order`.

    ``bubble_fraction`` = total idle time / total busy time over all ranks up to the makespan,
    i.e. the bubble relative to the ideal (bubble-free) time, the quantity of the closed forms.
    ``peak_inflight`` counts, per rank, microbatch-chunks whose forward ran and whose input-grad
    (B or I) has not: their full activations are alive. ``peak_inflight_until_w`` counts until
    the weight-grad (B or W), when the last saved tensors die; it differs only for split
    backward schedules. For interleaved orders a unit is one chunk's activations (1/vpp of a
    stage's).
    """

    makespan: float
    busy: tuple[float, ...]
    bubble_fraction: float
    peak_inflight: tuple[int, ...]
    peak_inflight_until_w: tuple[int, ...]
    start: dict[tuple[int, Action], float]
    finish: dict[tuple[int, Action], float]

    def rank_bubble_fraction(self, rank: int) -> float:
        """Idle time of one rank over its busy time."""
        return (self.makespan - self.busy[rank]) / self.busy[rank]


Time = float | Sequence[float]


def _at(t: Time, stage: int) -> float:
    return float(t) if isinstance(t, int | float) else float(t[stage])


def _duration(a: Action, t_f: Time, t_b: Time, t_w: Time | None) -> float:
    s = a.stage
    if a.kind is Kind.F:
        return _at(t_f, s)
    if a.kind is Kind.B:
        return _at(t_b, s) + (0.0 if t_w is None else _at(t_w, s))
    require(t_w is not None, "t_w", f"order has split backward actions ({a}); give the weight-grad time")
    return _at(t_b, s) if a.kind is Kind.I else _at(t_w, s)  # type: ignore[arg-type]


def _check_times(num_stages: int, **times: Time | None) -> None:
    for name, t in times.items():
        if t is None:
            continue
        values = [t] if isinstance(t, int | float) else list(t)
        require(
            isinstance(t, int | float) or len(values) == num_stages,
            name,
            f"needs one time per virtual stage ({num_stages}), got {len(values)}",
        )
        require(all(v >= 0 for v in values), name, "action times must be >= 0")


def _peaks(order: list[Action]) -> tuple[int, int]:
    live_act = live_w = peak_act = peak_w = 0
    for a in order:
        if a.kind is Kind.F:
            live_act += 1
            live_w += 1
        if a.kind in (Kind.B, Kind.I):
            live_act -= 1
        if a.kind in (Kind.B, Kind.W):
            live_w -= 1
        peak_act, peak_w = max(peak_act, live_act), max(peak_w, live_w)
    return peak_act, peak_w


def simulate_order(
    orders: list[list[Action]],
    t_f: Time,
    t_b: Time,
    t_w: Time | None = None,
    t_comm: float = 0.0,
) -> SimResult:
    """Run ``orders`` (one list per rank) with fixed action times.

    ``t_f``: forward time per action; ``t_b``: backward time — the whole backward when
    ``t_w`` is None, else the input-grad part, with ``t_w`` the weight-grad part (so a full B
    takes ``t_b + t_w`` and I / W take ``t_b`` / ``t_w``). ``t_comm`` is added to every
    dependency that crosses ranks. Each time is one number for every stage, or a sequence
    indexed by virtual stage (uneven splits, embedding / head stages). For interleaved orders
    give per-chunk times. Raises `DeadlockError` if the order cannot complete.
    """
    num_stages = 1 + max((a.stage for order in orders for a in order), default=0)
    _check_times(num_stages, t_f=t_f, t_b=t_b, t_w=t_w)
    require(t_comm >= 0, "t_comm", "communication time must be >= 0")
    where: dict[DepKey, tuple[int, float]] = {}  # key -> (rank, finish time)
    start: dict[tuple[int, Action], float] = {}
    finish: dict[tuple[int, Action], float] = {}
    pos = [0] * len(orders)
    free = [0.0] * len(orders)
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for rank, order in enumerate(orders):
            while pos[rank] < len(order):
                a = order[pos[rank]]
                deps = dependencies(a, num_stages)
                if any(d not in where for d in deps):
                    break
                t0 = free[rank]
                for d in deps:
                    src_rank, done = where[d]
                    t0 = max(t0, done + (t_comm if src_rank != rank else 0.0))
                t1 = t0 + _duration(a, t_f, t_b, t_w)
                start[(rank, a)], finish[(rank, a)] = t0, t1
                for key in completes(a):
                    where[key] = (rank, t1)
                free[rank] = t1
                pos[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = {r: str(o[pos[r]]) for r, o in enumerate(orders) if pos[r] < len(o)}
            raise DeadlockError(f"pipeline order deadlocks; blocked actions per rank: {blocked}")
    busy = tuple(sum(_duration(a, t_f, t_b, t_w) for a in order) for order in orders)
    makespan = max(free, default=0.0)
    total_busy = sum(busy)
    bubble = (len(orders) * makespan - total_busy) / total_busy if total_busy else 0.0
    peaks = [_peaks(order) for order in orders]
    return SimResult(
        makespan=makespan,
        busy=busy,
        bubble_fraction=bubble,
        peak_inflight=tuple(p for p, _ in peaks),
        peak_inflight_until_w=tuple(w for _, w in peaks),
        start=start,
        finish=finish,
    )


__all__ = ["DeadlockError", "SimResult", "simulate_order"]
