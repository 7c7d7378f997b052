"""Benchmark the serving simulator (issue 13 speed target).

Target: 100,000 requests of Llama-3.1-70B, TP4 x 8 replicas on H100, vLLM profile, Poisson at 80 %
of capacity: <= 20 s and <= 2 GiB on 2 cores; ``--find-max-qps`` <= 2 min.

Usage::

    .venv/bin/python bench/bench_serve.py                    # the target case
    .venv/bin/python bench/bench_serve.py --requests 20000   # smaller
    .venv/bin/python bench/bench_serve.py --find-max-qps     # also time the rate search

Capacity is the offline rate (requests/s with all requests queued at t = 0) of the same
deployment on ``--capacity-requests`` requests; its time is reported separately. Prints one table:
wall seconds, CPU seconds, peak RSS, engine steps, steps per second and the simulated metrics.
"""

from __future__ import annotations

import argparse
import resource
import time

from tensorstage.hardware.system import load_system
from tensorstage.model.resolve import resolve_model
from tensorstage.report.console import print_table
from tensorstage.serve import ServingPlan, Workload, load_profile, simulate
from tensorstage.serve.capacity import find_max_qps
from tensorstage.serve.serving import build_predictor


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.1-70b")
    ap.add_argument("--system", default="dgx-h100-superpod")
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--capacity-requests", type=int, default=8_000)
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=256)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the offline rate")
    ap.add_argument("--find-max-qps", action="store_true")
    args = ap.parse_args()

    spec, system = resolve_model(args.model), load_system(args.system)
    plan = ServingPlan(engine=load_profile(args.engine), tp=args.tp, replicas=args.replicas,
                       router="least_tokens")
    pred, t_pred, _ = _timed(lambda: build_predictor(spec, system, plan))
    wl = Workload(args.capacity_requests, args.isl, args.osl, lengths="lognormal", spread=0.5, seed=1)
    off, t_off, c_off = _timed(lambda: simulate(spec, system, plan, wl, predictor=pred))
    rate = args.load * off.metrics.requests_per_s
    wl = Workload(args.requests, args.isl, args.osl, arrival="poisson", rate_per_s=rate, lengths="lognormal",
                  spread=0.5, seed=2)
    res, t_run, c_run = _timed(lambda: simulate(spec, system, plan, wl, predictor=pred))
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    m = res.metrics
    rows = [
        ["predictor build", round(t_pred, 2), "", "", "", ""],
        [f"offline capacity ({args.capacity_requests} req)", round(t_off, 2), round(c_off, 2), off.metrics.steps,
         round(off.metrics.steps / t_off), f"{off.metrics.requests_per_s:.2f} req/s"],
        [f"Poisson {rate:.2f}/s ({args.requests} req)", round(t_run, 2), round(c_run, 2), m.steps,
         round(m.steps / t_run), f"TTFT p99 {m.ttft_s['p99'] * 1e3:.0f} ms, TPOT p99 {m.tpot_s['p99'] * 1e3:.1f} ms"],
    ]
    if args.find_max_qps:
        wl_s = Workload(args.capacity_requests, args.isl, args.osl, lengths="lognormal", spread=0.5, seed=3)
        cap, t_cap, c_cap = _timed(lambda: find_max_qps(spec, system, plan, wl_s, 2.0, 0.1, predictor=pred))
        rows.append([f"find-max-qps ({len(cap.probes)} probes)", round(t_cap, 2), round(c_cap, 2), "", "",
                     f"{cap.max_rate_per_s:.2f} req/s (TTFT 2 s, TPOT 100 ms)"])
    print_table(f"{args.model} TP{args.tp} x {args.replicas} on {args.system}, {args.engine}, ISL {args.isl} OSL "
                f"{args.osl} (lognormal 0.5); peak RSS {rss_gib:.2f} GiB",
                ["run", "wall s", "cpu s", "steps", "steps/s", "result"], rows)


if __name__ == "__main__":
    main()
