"""Benchmark the built-in simulator (issue 6 speed target: Llama-3.1-405B on 16,384 H100 <= 5 s).

Usage::

    .venv/bin/python bench/bench_sim.py --case all           # the issue-6 cases, real lowering (below)
    .venv/bin/python bench/bench_sim.py                      # 405B-like, TP8 PP16 DP128, 16 microbatches
    .venv/bin/python bench/bench_sim.py --microbatches 16 64 # several sizes
    .venv/bin/python bench/bench_sim.py --source mypkg.lower:programs_for_bench

The program source is pluggable: ``--source module:function`` names a callable
``(tp, pp, dp, microbatches) -> (programs, mesh)``. The default is the synthetic
Llama-3.1-405B-like 1F1B step of ``bench/bench_trace.py`` (15 forward / 25 backward COMP nodes per
layer, TP all-reduces, pipeline send/recv, per-layer DP gradient all-reduce) until the real
lowering lands. Prints one table row per size: nodes, build / execute / summarize wall seconds,
simulated step time and MFU (the MFU of a synthetic program is only a sanity check).

``--case 405b|1t|all`` times what ``tensorstage simulate MODEL`` does, in process, on the real
lowering (fused compute runs): Llama-3.1-405B on 16,384 H100 (TP 8, PP 16 with 7/8x14/7 layers,
DP 128, SP, 1F1B, sequence 8192, global batch 2048 = 16 micro-batches) and the Megatron 1T case of
Narayanan et al. Table 1 on 3,072 A100 (TP 8, PP 64, DP 6, full recompute, sequence 2048, global
batch 3072 = 512 micro-batches). ``steady`` is the default path (steady-state extrapolation where
it applies), ``full`` simulates every node. Times include lowering; wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

from tensorstage.hardware.system import load_system
from tensorstage.report.console import print_json, print_table
from tensorstage.sim import execute, machine_from_system, summarize


def load_source(spec: str):
    """``module:function``; an empty module means ``bench/bench_trace.py`` beside this file."""
    mod, _, fn = spec.rpartition(":")
    if mod:
        return getattr(importlib.import_module(mod), fn)
    path = Path(__file__).with_name("bench_trace.py")
    module_spec = importlib.util.spec_from_file_location("bench_trace", path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    sys.modules["bench_trace"] = module
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return getattr(module, fn)


def run(tp: int, pp: int, dp: int, microbatches: int, source: str, system: str, tokens: int) -> dict[str, object]:
    build = load_source(source)
    t0 = time.perf_counter()
    programs, mesh = build(tp, pp, dp, microbatches)
    t1 = time.perf_counter()
    machine = machine_from_system(load_system(system), "bf16")
    ex = execute(programs, mesh, machine)
    t2 = time.perf_counter()
    res = summarize(ex, tokens)
    t3 = time.perf_counter()
    return {"ranks": mesh.world, "classes": len(programs), "microbatches": microbatches,
            "nodes": sum(len(p.nodes) for p in programs), "build_s": t1 - t0, "execute_s": t2 - t1,
            "summarize_s": t3 - t2, "simulate_s": t3 - t1, "step_time_s": res.step_time_s, "mfu": res.mfu}


CASES: dict[str, tuple[str, str, dict[str, object]]] = {
    "405b": ("llama3.1-405b", "dgx-h100-superpod",
             {"tp": 8, "pp": 16, "dp": 128, "sp": True, "schedule": "1f1b", "seq": 8192, "global_batch": 2048,
              "micro_batch": 1, "pp_layer_split": (7, *[8] * 14, 7)}),
    "1t": ("megatron-1t", "dgx-a100-selene",
           {"tp": 8, "pp": 64, "dp": 6, "schedule": "1f1b", "seq": 2048, "global_batch": 3072, "micro_batch": 1,
            "recompute": "full"}),
}


def _cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (the steady-state extrapolation forks
    two of its three short runs: their CPU counts too)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_case(name: str, full: bool) -> dict[str, object]:
    """One ``simulate MODEL`` call in process: lower (+ extrapolate) + simulate + summarize."""
    from tensorstage.api import simulate as simulate_model
    from tensorstage.parallel.plan import ParallelPlan

    model, system, plan_data = CASES[name]
    plan = ParallelPlan.parse(plan_data)
    t0, c0 = time.perf_counter(), _cpu_s()
    run = simulate_model(model, system, plan, full=full)
    t1, c1 = time.perf_counter(), _cpu_s()
    r = run.result
    return {"case": name, "mode": "full" if full else "steady", "gpus": plan.world,
            "microbatches": plan.microbatches, "nodes_simulated": sum(len(p.nodes) for p in run.programs),
            "wall_s": t1 - t0, "cpu_s": c1 - c0, "step_time_s": r.step_time_s, "mfu": r.mfu,
            "extrapolated": bool(run.notes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], help="time the real issue-6 cases instead")
    ap.add_argument("--modes", nargs="+", default=["steady", "full"], choices=["steady", "full"])
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=16)
    ap.add_argument("--dp", type=int, default=128)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[16])
    ap.add_argument("--system", default="dgx-h100-superpod")
    ap.add_argument("--seq", type=int, default=8192, help="tokens per sequence (for tokens/s)")
    ap.add_argument("--source", default=":synthetic_405b", help="module:function giving (programs, mesh)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.case:
        names = list(CASES) if args.case == "all" else [args.case]
        rows = [run_case(n, m == "full") for n in names for m in args.modes]
        if args.json:
            print_json(rows)
            return
        cols = list(rows[0])
        print_table("simulate MODEL benchmark (real lowering)", cols,
                    [[round(r[c], 4) if isinstance(r[c], float) else r[c] for c in cols] for r in rows])
        return
    rows = []
    for m in args.microbatches:
        tokens = args.dp * m * args.seq
        rows.append(run(args.tp, args.pp, args.dp, m, args.source, args.system, tokens))
    if args.json:
        print_json(rows)
        return
    cols = list(rows[0])
    print_table("simulator benchmark", cols, [[round(r[c], 4) if isinstance(r[c], float) else r[c] for c in cols]
                                               for r in rows])


if __name__ == "__main__":
    main()
