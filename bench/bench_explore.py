"""Benchmark the design-space explorer: pre-screen throughput, its ranking against the full
simulator, and full simulations per minute.

Usage::

    .venv/bin/python bench/bench_explore.py                       # GPT-3 175B on 1,024 A100, 200 samples
    .venv/bin/python bench/bench_explore.py --samples 50 --workers 2
    .venv/bin/python bench/bench_explore.py --model megatron-18.4b --gpus 256 --global-batch 1024

1. Throughput: every layout of :func:`tensorstage.explore.bestplan.layout_space` (TP, PP, VPP,
   micro-batch, recompute, ZeRO) is enumerated, checked against the plan rules and screened;
   reported as configurations per minute of one process (the screen itself is one numpy pass; the
   per-candidate plan check dominates), and the screen alone on the legal ones.
2. Ranking: a seeded random sample of the legal layouts the screen puts within memory is simulated
   in full (lower + simulate, steady-state extrapolation as ``tensorstage simulate``) on a process
   pool; Spearman rank correlation of the step times, the median and worst relative difference.
3. Full simulations per minute: from the same runs (wall clock of the pool).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tensorstage.explore.bestplan import layout_space, screen_layouts, spearman
from tensorstage.explore.executors import LocalExecutor
from tensorstage.explore.fastpath import SCREEN_FIELDS, screen
from tensorstage.explore.search import PRUNE_MEMORY_FRACTION
from tensorstage.explore.setup import build_system, task_plan
from tensorstage.report.console import print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt3-175b")
    ap.add_argument("--system", default="dgx-a100-selene")
    ap.add_argument("--gpus", type=int, default=1024)
    ap.add_argument("--global-batch", type=int, default=1536)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", help="write every sampled layout's plan, screened and simulated result (JSON)")
    args = ap.parse_args()

    space = layout_space(args.model, args.system, args.gpus, args.global_batch, args.seq, args.dtype)
    screen_layouts(layout_space(args.model, args.system, 8 * 8, 64, args.seq, args.dtype))  # warm graph caches
    t0 = time.perf_counter()
    tasks, fast, enumerated = screen_layouts(space)
    t_all = time.perf_counter() - t0
    plans = [task_plan(t) for t in tasks]
    cols = {f: np.array([getattr(p, f) for p in plans]) for f in SCREEN_FIELDS}
    system = build_system(args.system, args.gpus)
    t0 = time.perf_counter()
    screen(args.model, system, cols, len(plans))
    t_screen = time.perf_counter() - t0
    print_table(f"pre-screen: {args.model} on {args.gpus} x {args.system}", ["stage", "configurations", "wall_s",
                                                                               "configurations_per_min"],
                [["enumerate + plan rules + screen", enumerated, round(t_all, 3), round(60 * enumerated / t_all)],
                 ["screen alone (legal layouts)", len(plans), round(t_screen, 3), round(60 * len(plans) / t_screen)]])

    fits = [i for i, r in enumerate(fast) if r["metrics"]["memory_fraction"] <= PRUNE_MEMORY_FRACTION]
    rng = np.random.default_rng(args.seed)
    pick = sorted(rng.choice(fits, size=min(args.samples, len(fits)), replace=False).tolist())
    ex = LocalExecutor(args.workers)
    t0 = time.perf_counter()
    full = {j: r for j, r in ex.run([tasks[i] for i in pick])}
    t_full = time.perf_counter() - t0
    ex.close()
    ok = [j for j in range(len(pick)) if full[j]["status"] in ("ok", "oom")]
    a = np.array([fast[pick[j]]["metrics"]["step_time_s"] for j in ok])
    b = np.array([full[j]["metrics"]["step_time_s"] for j in ok])
    rel = np.abs(a / b - 1)
    feas = [k for k, j in enumerate(ok) if full[j]["status"] == "ok"]
    mem_a = np.array([fast[pick[j]]["metrics"]["peak_memory_bytes"] for j in ok])
    mem_b = np.array([full[j]["metrics"]["peak_memory_bytes"] for j in ok])
    print_table(f"screen vs full simulation ({len(ok)} random legal layouts within memory, seed {args.seed})",
                ["metric", "value"],
                [["spearman step_time_s (all sampled)", round(spearman(a, b), 4)],
                 ["spearman step_time_s (simulated fits in HBM)", round(spearman(a[feas], b[feas]), 4)
                  if len(feas) > 2 else "n/a"],
                 ["median |screen/full - 1| step time", round(float(np.median(rel)), 4)],
                 ["max |screen/full - 1| step time", round(float(np.max(rel)), 4)],
                 ["median |screen/full - 1| peak memory", round(float(np.median(np.abs(mem_a / mem_b - 1))), 4)],
                 ["spearman peak_memory_bytes", round(spearman(mem_a, mem_b), 4)],
                 ["full simulations", len(pick)],
                 ["full simulations per minute", round(60 * len(pick) / t_full, 1)],
                 ["workers", args.workers]])
    if args.dump:
        import json

        rows = [{"plan": tasks[pick[j]].plan, "screen": fast[pick[j]]["metrics"], "full": full[j]["metrics"],
                 "status": full[j]["status"]} for j in ok]
        with open(args.dump, "w") as f:
            json.dump(rows, f, indent=1, sort_keys=True, default=list)
    worst = sorted(range(len(ok)), key=lambda k: -rel[k])[:3]
    print_table("largest screen errors", ["tp", "pp", "dp", "vpp", "micro_batch", "recompute", "zero", "screen_s",
                                          "full_s"],
                [[*(tasks[pick[ok[k]]].plan.get(f) for f in ("tp", "pp", "dp", "vpp", "micro_batch", "recompute",
                                                            "zero")), round(a[k], 3), round(b[k], 3)] for k in worst])


if __name__ == "__main__":
    main()
