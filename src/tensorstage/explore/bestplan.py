"""``best-plan``: the best training layout of a model on a system and GPU count, like Calculon's
optimal execution search, in two stages.

1. Enumerate the layout space (:func:`layout_space`: TP, PP (an uneven
   :func:`balanced_split` when PP does not divide the layers), DP, micro-batch, interleaving,
   recompute, ZeRO 0/1/3; for MoE models EP and expert TP, folded or not) as a :class:`Space`, keep what the plan rules accept, and screen every
   survivor in closed form (:mod:`.fastpath`); drop what the screen puts out of memory.
2. Simulate the best-screened layouts in full (:func:`.evaluate.training_step`) until ``top`` of
   them fit in memory (at most :data:`MAX_SIMULATED_FACTOR` x ``top`` simulations) and rank those by
   the simulated objective.

The screen ranks layouts with Spearman ~0.98 against the simulator (``bench/bench_explore.py``),
so the true optimum is almost always among the top few; ``top`` trades time for certainty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.explore.evaluate import OK, OOM, training_step
from tensorstage.explore.executors import LocalExecutor
from tensorstage.explore.search import PRUNE_MEMORY_FRACTION, screen_tasks
from tensorstage.explore.setup import Task, make_task
from tensorstage.explore.space import Space, parse_space
from tensorstage.parallel.plan import ParallelPlan

#: best-plan simulates down the screened ranking until ``top`` layouts fit, at most this many x ``top``.
MAX_SIMULATED_FACTOR = 3
#: Objectives best-plan ranks by, with their goal.
OBJECTIVES = {"step_time_s": "min", "mfu": "max", "tokens_per_s": "max", "peak_memory_bytes": "min",
              "gpu_s_per_token": "min"}


@dataclass
class Ranked:
    """One layout with its screened and (if simulated) full metrics."""

    plan: dict[str, Any]
    fast: dict[str, float]
    full: dict[str, float] | None = None
    status: str = ""
    message: str = ""


@dataclass
class BestPlan:
    """The outcome of :func:`best_plan`."""

    model: str
    system: str
    gpus: int
    objective: str
    enumerated: int
    legal: int
    screened_s: float
    simulated: list[Ranked] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def best(self) -> Ranked | None:
        ok = [r for r in self.simulated if r.status == OK]
        if not ok:
            return None
        sign = 1.0 if OBJECTIVES[self.objective] == "min" else -1.0
        return min(ok, key=lambda r: sign * r.full[self.objective])  # type: ignore[index]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_space(model: str, system: str, gpus: int, global_batch: int, seq: int, dtype: str = "bf16",
                 fixed: dict[str, Any] | None = None, uneven: bool = True) -> Space:
    """The training-layout space best-plan searches (a regular :class:`Space`: the same rules,
    derived values and constraints a space file would give). ``uneven``: stages (and, interleaved,
    model chunks) may hold unequal layer counts (:func:`balanced_split`; Megatron-Core's first/last
    stage and pipeline-layout options); False keeps Megatron-LM 2021's rule that ``pp * vpp``
    divides the layers."""
    from tensorstage.hardware import load_system
    from tensorstage.model import resolve_model

    spec = resolve_model(model)
    node = load_system(system, gpus).gpus_per_node
    layers = spec.num_layers
    tps = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= node and gpus % t == 0]
    # stage counts that divide the layers, and powers of two (uneven split: see balanced_split)
    pps = sorted({p for p in _divisors(layers) if p <= gpus} | {2**k for k in range(1, 8) if 2**k < layers})
    fx = {"seq": seq, "global_batch": global_batch, "dtype": dtype, **(fixed or {})}
    params: dict[str, Any] = {"tp": tps, "pp": pps, "vpp": [1, 2, 3, 4], "micro_batch": [1, 2, 4, 8],
                              "recompute": ["none", "selective", "full"], "zero": [0, 1, 3]}
    moe_rules: list[str] = []
    if spec.moe is not None:
        # MoE: expert parallelism (powers of two dividing the experts) carved out of dp*cp, or with
        # expert TP 1 (Megatron's parallel folding) out of tp*dp*cp
        params["ep"] = [e for e in (2**k for k in range(0, 12)) if e <= gpus and spec.moe.num_experts % e == 0]
        params["etp"] = sorted({1, *tps})
        moe_rules = ["etp == 1 or etp == tp",
                     "(etp == tp and (dp * cp) % ep == 0) or "
                     "(etp == 1 and tp > 1 and ep % tp == 0 and (tp * dp * cp) % ep == 0)"]
    # ZeRO shards over the data-parallel ranks: with dp * cp = 1 (and no expert data parallelism) every
    # stage is ZeRO-0, so only ZeRO-0 is searched there (no duplicate rows with the same numbers)
    zero_rules = ["zero == 0 or dp * cp > 1"] if spec.moe is None and "zero" not in fx else []
    for k in list(params):
        if k in fx:
            params.pop(k)
    derived = {"dp": "gpus // (tp * pp * cp)", "sp": "tp > 1",
               "schedule": "'interleaved' if vpp > 1 else '1f1b'"}
    derived = {k: v for k, v in derived.items() if k not in fx}
    data = {"name": f"layouts-{model}-{gpus}", "model": model, "system": system, "gpus": gpus, "fixed": fx,
            "parameters": {"plan": params}, "derived": derived,
            "constraints": ["gpus % (tp * pp * cp) == 0", "global_batch % (dp * micro_batch) == 0",
                            "model.num_layers % (pp * vpp) == 0" + (" or pp * vpp < model.num_layers" if uneven else ""),
                            "vpp == 1 or pp > 1", *moe_rules, *zero_rules],
            "objectives": [{"metric": "step_time_s", "goal": "min"}]}
    return parse_space(data, where="best-plan")


def _layout_tasks(space: Space, rows: np.ndarray) -> list[Task]:
    """Tasks of the index ``rows`` of ``space``, with a balanced uneven split where ``pp * vpp``
    does not divide the layers (and none is pinned)."""
    tasks = []
    layers = int(space.constants["model.num_layers"])
    for row in rows:
        cfg = space.decode(tuple(int(v) for v in row))
        env = space.env(cfg)  # pp may be a parameter or pinned in fixed
        if layers % (env["pp"] * env["vpp"]) and "pp_layer_split" not in space.fixed:
            # one entry per model chunk: pp * vpp of them when interleaved
            cfg["pp_layer_split"] = balanced_split(layers, int(env["pp"] * env["vpp"]))
        tasks.append(make_task(space.model, space.system, space.gpus, space.fixed, cfg))
    return tasks


def screen_layouts(space: Space) -> tuple[list[Task], list[dict[str, Any]], int]:
    """Every legal layout of ``space`` and its screened result, plus the grid size enumerated."""
    idx = space.enumerate_indices()
    mask, _ = space.feasible_mask(idx)
    tasks = _layout_tasks(space, idx[mask])
    results = screen_tasks(tasks)
    legal = [(t, r) for t, r in zip(tasks, results, strict=True) if r["status"] == OK]
    return [t for t, _ in legal], [r for _, r in legal], len(idx)


def best_plan(model: str, system: str, gpus: int, global_batch: int, seq: int, *, objective: str = "step_time_s",
              dtype: str = "bf16", top: int = 8, fixed: dict[str, Any] | None = None, workers: int = 1,
              uneven: bool = True, memory_reserve_bytes: float = 0.0) -> BestPlan:
    """Search training layouts (module docstring); ``fixed`` pins plan keys (e.g. ``{"tp": 8}``);
    ``workers > 1`` simulates on a process pool of that size (same result); ``uneven``: see
    :func:`layout_space`.

    ``memory_reserve_bytes``: HBM kept free of what the simulator counts (model state, activations,
    communication buffers). The CUDA context, library workspaces, NCCL's own buffers and the
    allocator's fragmentation are not modelled and depend on the software stack, so the reserve is
    the user's to give (default none): a layout whose simulated peak exceeds the HBM less the
    reserve is reported ``oom``, and the screen prunes against the same limit."""
    if objective not in OBJECTIVES:
        raise SpecError("objective", f"unknown objective {objective!r}", OBJECTIVES)
    if top < 1:
        raise SpecError("top", f"must be >= 1, got {top}")
    if workers < 1:
        raise SpecError("workers", f"must be >= 1, got {workers}")
    if not memory_reserve_bytes >= 0:  # also rejects NaN
        raise SpecError("memory_reserve_bytes", f"must be >= 0, got {memory_reserve_bytes}")
    t0 = time.perf_counter()
    for name, value in (("dtype", dtype), ("seq", seq), ("global_batch", global_batch)):
        ParallelPlan.check_field(name, value, "")  # named as the option, not as a space's fixed value
    for name, value in (("gpus", gpus), ("global_batch", global_batch), ("seq", seq)):
        if value < 1:
            raise SpecError(name, f"must be >= 1, got {value}")
    space = layout_space(model, system, gpus, global_batch, seq, dtype, fixed, uneven)
    tasks, fast, enumerated = screen_layouts(space)
    if not tasks:
        raise SpecError(*_no_layout_reason(space, gpus, global_batch, fixed))
    t1 = time.perf_counter()
    sign = 1.0 if OBJECTIVES[objective] == "min" else -1.0
    hbm = fast[0]["metrics"]["hbm_bytes"]  # one system for every layout
    if not memory_reserve_bytes < hbm:
        raise SpecError("memory_reserve_bytes", f"must be below the device's HBM ({hbm / 2**30:.1f} GiB), got "
                        f"{memory_reserve_bytes / 2**30:.1f} GiB")
    limit = hbm - memory_reserve_bytes
    fits = [i for i, r in enumerate(fast) if r["metrics"]["peak_memory_bytes"] <= PRUNE_MEMORY_FRACTION * limit]
    order = sorted(fits, key=lambda i: (sign * fast[i]["metrics"][objective], tasks[i].key))
    out = BestPlan(model, system, gpus, objective, enumerated, len(tasks), t1 - t0)
    found = 0
    todo = order[: MAX_SIMULATED_FACTOR * top]  # past layouts the simulator finds out of memory
    ex = LocalExecutor(workers) if workers > 1 else None
    try:
        # in screened order until `top` fit; a pool simulates `workers` at a time and drops what it
        # ran past that point, so the outcome is the one-at-a-time outcome
        for start in range(0, len(todo), max(1, workers)):
            chunk = todo[start: start + max(1, workers)]
            done = dict(ex.run([tasks[i] for i in chunk])) if ex else {0: training_step(tasks[chunk[0]])}
            for j, i in enumerate(chunk):
                res = _within_reserve(done[j], limit, memory_reserve_bytes)
                out.simulated.append(Ranked(tasks[i].plan, fast[i]["metrics"], res["metrics"] or None,
                                            res["status"], res["message"]))
                found += res["status"] == OK
                if found == top:
                    break
            if found == top:
                break
    finally:
        if ex is not None:
            ex.close()
    ok = [r for r in out.simulated if r.status == OK]
    ok.sort(key=lambda r: sign * r.full[objective])  # type: ignore[index]
    out.simulated = ok + [r for r in out.simulated if r.status != OK]
    out.wall_s = time.perf_counter() - t0
    return out


def _within_reserve(res: dict[str, Any], limit: float, reserve: float) -> dict[str, Any]:
    """``res`` with status ``oom`` when its simulated peak fits the HBM but not the HBM less the reserve."""
    if not reserve or res["status"] != OK or res["metrics"]["peak_memory_bytes"] <= limit:
        return res
    gib = 2**30
    return {**res, "status": OOM, "message": f"peak memory {res['metrics']['peak_memory_bytes'] / gib:.1f} GiB > "
            f"HBM less the {reserve / gib:.1f} GiB reserve ({limit / gib:.1f} GiB)"}


def _no_layout_reason(space: Space, gpus: int, global_batch: int, fixed: dict[str, Any] | None
                      ) -> tuple[str, str]:
    """``(field, message)`` of the one-line error when no layout of ``space`` is legal: the first
    constraint that no candidate meets, else the most common reason the closed-form screen gave (an
    illegal plan for the model or the system), with the pinned fields named. The field is ``fixed``
    when fields were pinned, else ``global_batch`` when that alone is what a failing rule reads,
    else ``gpus``."""
    from collections import Counter

    pins = ", ".join(f"{k}={v}" for k, v in sorted((fixed or {}).items()))
    where = f"no legal layout on {gpus} GPUs with global batch {global_batch}" + (f" and {pins}" if pins else "")

    def field_of(names: frozenset[str]) -> str:
        return "fixed" if fixed else ("global_batch" if "global_batch" in names and "gpus" not in names else "gpus")

    idx = space.enumerate_indices()
    env = space.env(space.columns(idx))
    for c in space.pre_constraints():
        if not np.broadcast_to(np.asarray(c(env), dtype=bool), (len(idx),)).any():
            return field_of(c.names), f"{where}: no candidate satisfies {c.text}"
    mask, _ = space.feasible_mask(idx)
    if not mask.any():
        return field_of(frozenset()), f"{where}: no candidate satisfies all of " + "; ".join(
            c.text for c in space.pre_constraints())
    reasons = Counter(r["message"] for r in screen_tasks(_layout_tasks(space, idx[mask][:2000]))
                      if r["status"] != OK)
    return field_of(frozenset()), f"{where}: {reasons.most_common(1)[0][0]}" if reasons else where


def balanced_split(layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage (or per model chunk, ``pp`` = stages x virtual stages when interleaved) when
    ``pp`` does not divide them: ``layers // pp`` each, one more on the middle ones first (the first
    and last also hold the embedding and the head), as Llama 3 405B's 126 layers on 16 stages
    (7, 8 x 14, 7)."""
    base, extra = divmod(layers, pp)
    split = [base] * pp
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 2 else list(range(pp))  # middle, first, last
    for i in order[:extra]:
        split[i] += 1
    return tuple(split)


def layout_of(plan: dict[str, Any]) -> tuple[int, int, int]:
    """(TP, PP, DP) of a plan mapping."""
    return int(plan.get("tp", 1)), int(plan.get("pp", 1)), int(plan.get("dp", 1))


def rank_table(bp: BestPlan) -> list[dict[str, Any]]:
    """Rows for printing: layout, knobs, screened and simulated objective, MFU and peak memory."""
    rows = []
    for r in bp.simulated:
        tp, pp, dp = layout_of(r.plan)
        moe = {"ep": r.plan["ep"], "etp": r.plan.get("etp") or tp} if "ep" in r.plan else {}
        cp = {"cp": r.plan["cp"]} if r.plan.get("cp", 1) != 1 else {}
        rows.append({"tp": tp, "pp": pp, "dp": dp, **cp, **moe, "vpp": r.plan.get("vpp", 1),
                     "micro_batch": r.plan.get("micro_batch", 1), "recompute": r.plan.get("recompute"),
                     "zero": r.plan.get("zero", 0), f"screen_{bp.objective}": r.fast.get(bp.objective),
                     bp.objective: None if r.full is None else r.full.get(bp.objective),
                     "mfu": None if r.full is None else r.full.get("mfu"),
                     # simulated peak over the ranks: how close to the HBM the layout runs (no headroom
                     # for the CUDA context, NCCL buffers or allocator fragmentation is modelled)
                     "peak_memory_GiB": None if r.full is None or "peak_memory_bytes" not in r.full
                     else r.full["peak_memory_bytes"] / 2**30, "status": r.status})
    return rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties), numpy only."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average tied ranks
            sel = x == v
            r[sel] = r[sel].mean()
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])
