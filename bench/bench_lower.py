"""Benchmark the lowering of Llama-3.1-405B: the timings the tests used to assert, printed instead.

Targets: ``lower_blocks`` of the 405B graph (TP 8 + SP, CP 2, PP 16, DP 4, selective recompute)
< 1 s including the graph build; the full ``lower`` of issue 5's plan (TP 8 + SP, PP 16 split
7/8x14/7, DP 1024, 4 micro-batches of 8192 tokens: 131,072 ranks in 16 rank classes) < 2 s.
The tests check the deterministic reasons these are fast (blocks lowered once whatever the depth;
one program per rank class); wall time depends on the machine and its load, so it lives here.
Run: ``.venv/bin/python bench/bench_lower.py [--repeat N]`` (best of N).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tensorstage.graph import build_graph
from tensorstage.lower import graph_options, lower
from tensorstage.lower.blocks import lower_blocks
from tensorstage.model.resolve import resolve_model
from tensorstage.parallel import ParallelPlan
from tensorstage.report.console import print_table


def _best_s(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    args = ap.parse_args()
    spec = resolve_model("llama3.1-405b")

    blocks_plan = ParallelPlan(tp=8, sp=True, cp=2, pp=16, dp=4, seq=8192, recompute="selective")
    opts = graph_options(blocks_plan)

    def blocks() -> object:
        return lower_blocks(build_graph(spec, opts.phase, opts), blocks_plan)

    split = [7] + [8] * 14 + [7]
    full_plan = ParallelPlan.parse(dict(tp=8, pp=16, dp=1024, sp=True, seq=8192, micro_batch=1, global_batch=4096,
                                        pp_layer_split=split))

    def full() -> object:
        return lower(spec, full_plan)

    rows = [
        ["405B build_graph + lower_blocks (tp8 sp cp2 pp16 dp4)", round(_best_s(blocks, args.repeat) * 1e3, 1), 1000],
        ["405B lower (tp8 sp pp16 dp1024, 4 micro-batches)", round(_best_s(full, args.repeat) * 1e3, 1), 2000],
    ]
    print_table(f"bench_lower (milliseconds, best of {args.repeat})", ["case", "ms", "target ms"], rows)


if __name__ == "__main__":
    main()
