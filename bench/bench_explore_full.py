"""Benchmark full training-step simulations per minute, the way the explorer runs them.

Usage::

    .venv/bin/python bench/bench_explore_full.py                          # 2 workers, 60 plans
    .venv/bin/python bench/bench_explore_full.py --workers 1 --profile prof.txt
    .venv/bin/python bench/bench_explore_full.py --save before.json       # step times of every plan
    .venv/bin/python bench/bench_explore_full.py --check before.json      # same step times, to the last digit?

The sample (pinned in ``bench/data/explore_full_sample.json``; ``--sample FILE`` names another,
drawn and written first if missing): for each (model, GPUs, global batch) case below, every legal layout of
:func:`tensorstage.explore.bestplan.layout_space` (TP, PP, VPP, micro-batch, recompute, ZeRO) that
the closed-form screen puts within memory, then a seeded random pick of ``--samples`` of them
spread over the cases (the kind of plans a search simulates). Each is run through
:func:`tensorstage.explore.evaluate.training_step` (lower + simulate, steady-state extrapolation as
``tensorstage simulate``) on a :class:`~tensorstage.explore.executors.LocalExecutor` in the order
the sample gives, as a study would. ``--profile`` runs in one process under cProfile and writes
the top functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import numpy as np

from tensorstage.explore.bestplan import layout_space, screen_layouts
from tensorstage.explore.evaluate import training_step, work_estimate
from tensorstage.explore.executors import LocalExecutor
from tensorstage.explore.search import PRUNE_MEMORY_FRACTION
from tensorstage.explore.setup import Task
from tensorstage.report.console import print_table

#: the pinned 60-layout sample (seed 0, drawn 2026-12-03 from the layout space of b0d8015 onwards)
PINNED = Path(__file__).parent / "data" / "explore_full_sample.json"

#: (model, system, GPUs, global batch, sequence): published-scale training cases, 256 to 1,024 GPUs.
CASES = [
    ("gpt3-175b", "dgx-a100-selene", 1024, 1536, 2048),
    ("gpt3-175b", "dgx-a100-selene", 512, 1536, 2048),
    ("llama3-70b", "dgx-h100-superpod", 256, 512, 8192),
    ("llama3-70b", "dgx-h100-superpod", 1024, 1024, 8192),
]


def sample_tasks(samples: int, seed: int) -> list:
    """A seeded random sample of screened-to-fit layouts, spread evenly over :data:`CASES`."""
    rng = np.random.default_rng(seed)
    out = []
    for k, (model, system, gpus, gb, seq) in enumerate(CASES):
        tasks, fast, _ = screen_layouts(layout_space(model, system, gpus, gb, seq, "bf16"))
        fits = [i for i, r in enumerate(fast) if r["metrics"]["memory_fraction"] <= PRUNE_MEMORY_FRACTION]
        n = samples // len(CASES) + (k < samples % len(CASES))
        out += [tasks[i] for i in sorted(rng.choice(fits, size=min(n, len(fits)), replace=False).tolist())]
    order = rng.permutation(len(out))  # a study interleaves models and layouts
    return [out[i] for i in order]


def pinned_tasks(path: Path, samples: int, seed: int) -> list:
    """The sample in ``path`` (model, system, GPUs, plan keys, key of each task), or a fresh
    :func:`sample_tasks` written there first: the layout space the sample is drawn from changes
    with the code (a new layout option reshuffles the seeded draw), so runs compare like with like
    only on a pinned file."""
    if path.exists():
        rows = json.loads(path.read_text())
        return [Task(r["model"], r["system"], r["gpus"],
                     {k: tuple(v) if isinstance(v, list) else v for k, v in r["plan"].items()}, key=r["key"])
                for r in rows]
    tasks = sample_tasks(samples, seed)
    rows = [{"model": t.model, "system": t.system, "gpus": t.gpus, "plan": t.plan, "key": t.key} for t in tasks]
    assert all(not t.network and t.device is None for t in tasks)  # best-plan layouts change neither
    path.write_text(json.dumps(rows, indent=1, sort_keys=True, default=list) + "\n")
    return tasks


def timed_step(task: object) -> dict:
    """:func:`training_step` plus the CPU seconds of the worker process it ran in (the machine is
    shared: CPU time is what the plan costs, wall time also counts other jobs)."""
    t0 = time.process_time()
    res = training_step(task)  # type: ignore[arg-type]
    return {**res, "cpu_s": time.process_time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fifo", action="store_true", help="start tasks in sample order (default: costliest first)")
    ap.add_argument("--profile", help="run in one process under cProfile; write the report here")
    ap.add_argument("--sample", type=Path, default=PINNED,
                    help="layouts to run (JSON); written from a seeded draw first if missing (default: "
                         "the pinned sample beside this script)")
    ap.add_argument("--save", help="write every plan's step time and peak memory (JSON)")
    ap.add_argument("--check", help="compare with a --save file: identical to the last digit?")
    args = ap.parse_args()

    tasks = pinned_tasks(args.sample, args.samples, args.seed)
    ex = LocalExecutor(1 if args.profile else args.workers, timed_step, None if args.fifo else work_estimate)
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    results = dict(ex.run(tasks))
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    ex.close()

    got = {t.key + f"|{t.model}|{t.gpus}": [results[i]["status"], results[i]["metrics"].get("step_time_s"),
                                             results[i]["metrics"].get("peak_memory_bytes")]
           for i, t in enumerate(tasks)}
    slow = sorted(range(len(tasks)), key=lambda i: -results[i]["cpu_s"])[:5]
    statuses = {s: sum(r["status"] == s for r in results.values()) for s in sorted({r["status"] for r in
                                                                                    results.values()})}
    cpu = np.array([r["cpu_s"] for r in results.values()])
    print_table(f"full simulations: {len(tasks)} layouts of {len(CASES)} cases, seed {args.seed}",
                ["metric", "value"],
                [["workers", ex.workers], ["order", "sample" if args.fifo else "costliest first"],
                 ["wall_s", round(wall, 2)],
                 ["full simulations per minute", round(60 * len(tasks) / wall, 1)],
                 ["CPU s, all plans", round(float(cpu.sum()), 1)],
                 ["CPU s per plan: median / mean / max", f"{np.median(cpu):.2f} / {cpu.mean():.2f} / {cpu.max():.1f}"],
                 ["per minute if the workers had their cores (sum CPU / workers, or the longest plan)",
                  round(60 * len(tasks) / max(cpu.sum() / ex.workers, cpu.max()), 1)],
                 ["median per-plan wall_s", round(float(np.median([r["wall_s"] for r in results.values()])), 3)],
                 ["statuses", ", ".join(f"{k} {v}" for k, v in statuses.items())]])
    print_table("slowest plans", ["model", "gpus", "tp", "pp", "vpp", "micro_batch", "recompute", "zero", "cpu_s"],
                [[tasks[i].model, tasks[i].gpus, *(tasks[i].plan.get(f) for f in ("tp", "pp", "vpp", "micro_batch",
                                                                                    "recompute", "zero")),
                  round(results[i]["cpu_s"], 2)] for i in slow])
    if args.save:
        with open(args.save, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
    if args.check:
        with open(args.check) as f:
            ref = json.load(f)
        diff = [k for k in ref if ref[k] != got.get(k)]
        print(f"check against {args.check}: {len(ref) - len(diff)}/{len(ref)} identical")
        for k in diff[:5]:
            print("  differs:", k, ref[k], got.get(k))
    if prof:
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("cumulative").print_stats(60)
        st.sort_stats("tottime").print_stats(40)
        with open(args.profile, "w") as f:
            f.write(s.getvalue())


if __name__ == "__main__":
    main()
