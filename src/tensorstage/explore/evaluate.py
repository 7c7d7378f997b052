"""Evaluators: the full training-step simulation of one configuration.

:func:`training_step` goes through the project's one simulation path: ``lower`` (fused compute
runs) then ``sim.simulate`` on the system, with the checked steady-state extrapolation of
:mod:`tensorstage.sim.steady` for long steps, exactly as ``tensorstage simulate`` and
``tensorstage validate`` do. It never raises for a bad configuration: an illegal plan or an
out-of-memory step is a result with a status, so a search records it and goes on.

The closed-form pre-screen over many candidates is :mod:`tensorstage.explore.fastpath`.
"""

from __future__ import annotations

import time
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.explore.setup import Task, build_system, task_plan

OK, INFEASIBLE, OOM, PRUNED, ERROR = "ok", "infeasible", "oom", "pruned", "error"


def metrics_from(step_time_s: float, mfu: float, tokens_per_step: float, world: int, peak_memory_bytes: float,
                 hbm_bytes: float) -> dict[str, float]:
    """The metric set every evaluator reports (:data:`tensorstage.explore.space.METRICS`)."""
    tps = tokens_per_step / step_time_s if step_time_s > 0 else 0.0
    return {
        "step_time_s": float(step_time_s),
        "mfu": float(mfu),
        "tokens_per_s": float(tps),
        "tokens_per_s_per_gpu": float(tps / world) if world else 0.0,
        "peak_memory_bytes": float(peak_memory_bytes),
        "hbm_bytes": float(hbm_bytes),
        "memory_fraction": float(peak_memory_bytes / hbm_bytes) if hbm_bytes else 0.0,
        "gpu_s_per_token": float(step_time_s * world / tokens_per_step) if tokens_per_step else 0.0,
    }


def simulate_plan(model: str, plan: Any, system: Any) -> Any:
    """``SimResult`` of ``model`` under ``plan`` on ``system`` (lower + simulate, steady-state when exact).

    The collector stays paused for the whole evaluation, not only inside each pass: the programs'
    millions of nodes are acyclic and die by reference counting when it ends, while collector
    passes between the lowering, the engine and the summary would walk all of them (6.8 of ~80 CPU s
    on the explorer's benchmark sample, docs/benchmarks.md).
    """
    from tensorstage.gcpause import paused_gc
    from tensorstage.lower import lower
    from tensorstage.model import resolve_model
    from tensorstage.sim import simulate
    from tensorstage.sim.steady import simulate_steady

    spec = resolve_model(model)

    def run(p: Any) -> Any:
        low = lower(spec, p, fuse=True)
        return simulate(low.programs, low.mesh, system, dtype=p.dtype, tokens_per_step=low.tokens_per_step)

    with paused_gc():
        got = simulate_steady(plan, run, lambda r: r)
        return got[0] if got is not None else run(plan)


def work_estimate(task: Task) -> float:
    """Relative cost of :func:`training_step` on ``task``, for scheduling only (never a result).

    The lowering and the engine cost about the same per node, and a step has about
    ``layers x simulated micro-batches`` block instances across its pipeline stages: all ``m``
    micro-batches, or the three short counts of the steady-state extrapolation when the plan
    qualifies. A pool that starts the costliest tasks first does not leave one worker alone with a
    deep pipeline at the end of a batch (longest-processing-time-first scheduling). Illegal
    plans cost nothing.
    """
    from tensorstage.model import resolve_model
    from tensorstage.sim.steady import steady_counts

    try:
        plan = task_plan(task)
        layers = resolve_model(task.model).num_layers
    except SpecError:
        return 0.0
    counts = steady_counts(plan)
    return float(layers * (sum(counts) if counts else plan.microbatches))


def training_step(task: Task) -> dict[str, Any]:
    """Simulate one configuration; returns ``{"status", "metrics", "message", "wall_s"}``.

    Status ``infeasible``: the plan is illegal for the model or system (the ``SpecError`` line is
    the message); ``oom``: simulated peak memory exceeds the device's HBM; ``ok`` otherwise.
    """
    t0 = time.perf_counter()
    try:
        plan = task_plan(task)
        system = build_system(task.system, task.gpus, task.network, task.device)
        from tensorstage.model import resolve_model

        plan.validate_for(resolve_model(task.model), task.gpus)
        res = simulate_plan(task.model, plan, system)
    except SpecError as exc:
        return {"status": INFEASIBLE, "metrics": {}, "message": str(exc), "wall_s": time.perf_counter() - t0}
    m = metrics_from(res.step_time_s, res.mfu, res.tokens_per_step, res.world, res.peak_memory_bytes,
                     res.hbm_capacity_bytes)
    status = OOM if res.oom else OK
    msg = f"peak memory {res.peak_memory_bytes / 2**30:.1f} GiB > HBM" if res.oom else ""
    return {"status": status, "metrics": m, "message": msg, "wall_s": time.perf_counter() - t0}
