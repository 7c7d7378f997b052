"""Every agent on one space: best-so-far curves in one plot, and the gap to the exhaustive optimum.

Usage::

    .venv/bin/python bench/bench_explore_agents.py examples/spaces/layouts_18b_64gpu.yaml --budget 57 --out runs/agents
    .venv/bin/python bench/bench_explore_agents.py examples/spaces/cosmic_gpt3_175b_1024.yaml --budget 200 --out runs/cosmic

When the space is small enough to enumerate (``--reference``, default on below 5,000 legal points),
the grid agent evaluates all of it first and its optimum is drawn as the reference line; every
other agent gets ``--budget`` evaluations and ``--seeds`` seeds. ``--evaluator`` defaults to the
closed-form screen (``fast``) so the comparison is about the agents; ``screened`` or ``full``
simulate. Writes ``convergence.png`` (seed 0 of each agent) and prints one row per agent and seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorstage.explore.outputs import convergence, plot_convergence
from tensorstage.explore.search import run_study
from tensorstage.explore.space import load_space
from tensorstage.report.console import print_table

AGENTS = ("random", "random_walk", "aco", "ga", "nsga2", "tpe")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--evaluator", default="fast")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--agents", nargs="*", default=list(AGENTS))
    args = ap.parse_args()
    sp = load_space(args.space)
    idx = sp.enumerate_indices() if sp.grid_size <= 2_000_000 else None
    legal = int(sp.feasible_mask(idx)[0].sum()) if idx is not None else None
    ref = None
    curves = {}
    rows = []
    if legal is not None and legal <= 5000:
        grid = run_study(sp, "grid", 10**7, None, evaluator=args.evaluator, batch=512)
        best = grid.best()
        ref = None if best is None else best.objectives[0]
        rows.append(["grid", 0, grid.evaluations, ref, 0.0])
    for agent in args.agents:
        for seed in range(args.seeds):
            res = run_study(sp, agent, args.budget, None, evaluator=args.evaluator, seed=seed)
            best = res.best()
            val = None if best is None else best.objectives[0]
            gap = None if ref is None or val is None else round(100 * (val / ref - 1), 2)
            rows.append([agent, seed, res.evaluations, val, gap])
            if seed == 0:
                curves[agent] = convergence(res)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_convergence(curves, sp.objectives[0].name, args.out / "convergence.png", reference=ref)
    print_table(f"{sp.name}: {legal if legal is not None else '?'} legal configurations, budget {args.budget}, "
                f"evaluator {args.evaluator}", ["agent", "seed", "evaluations", sp.objectives[0].name,
                                                "gap_to_exhaustive_pct"], rows)
    print(f"plot: {args.out / 'convergence.png'}")


if __name__ == "__main__":
    main()
