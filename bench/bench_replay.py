"""Replay acceptance sweep: R gloo processes on emulated links, measured vs the ring/direct model.

Usage (root, for network namespaces; otherwise ``--network loopback``)::

    .venv/bin/python bench/bench_replay.py                       # 8 ranks, 100 Mbit/s per port, 64 KiB..64 MiB
    .venv/bin/python bench/bench_replay.py --node-size 4 --inter-GBps 0.00625   # two tiers
    .venv/bin/python bench/bench_replay.py --out result.json    # keep it for `tensorstage calibrate-network`
    .venv/bin/python bench/bench_replay.py --exchange --link-GBps 0.05   # one pair: one way vs both ways
    .venv/bin/python bench/bench_replay.py --collectives native   # gloo's own collectives instead of the p2p ones

Prints the Markdown of :func:`tensorstage.replay.report.bench_markdown` (every case: measured,
simulator model, model of the algorithm that ran, errors; largest errors from 1 MiB up; the alpha-beta fit per
tier against the tc rate) plus the acceptance checks of issue 15: model error within 15 % from
1 MiB up, fitted bandwidth within 10 % of the emulated rate. The rate is low on purpose: on a
small shared machine the host's own per-message cost (scheduling 8 processes on 2 cores, about a
millisecond) must stay small beside the bandwidth term of a 1 MiB message; the default sweep
takes about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tensorstage.replay.bench import JUDGED_MIN_BYTES, bench_dict, make_links, run_microbench
from tensorstage.replay.launch import Placement, run_ranks
from tensorstage.replay.microbench import DEFAULT_SIZES_BYTES
from tensorstage.replay.netns import EmulatedNetwork
from tensorstage.replay.ops import Op
from tensorstage.replay.report import bench_markdown


def exchange(rate_GBps: float, size_bytes: int, repeats: int) -> None:
    """Two ranks on a shaped link: ``S`` one way, then ``S`` both ways at once (each rank isend then
    recv, as a pipeline's tied-embedding exchange or an all-to-all pair does). Prints both times
    against ``S / rate``: a full-duplex link would give the model time for every direction."""
    ops: list[list[Op]] = [[], []]
    for rep in range(repeats):
        for r in range(2):
            ops[r].append(Op("barrier", record=False))
        ops[0].append(Op("send", size_bytes, peer=1, tag=1, key=f"one-way {rep}"))
        ops[1].append(Op("recv", size_bytes, peer=0, tag=1, key=f"one-way {rep}"))
        for r in range(2):
            ops[r].append(Op("barrier", record=False))
        for r in range(2):
            ops[r].append(Op("send", size_bytes, peer=1 - r, tag=2, key=f"both ways {rep}: {r}->{1 - r}"))
            ops[r].append(Op("recv", size_bytes, peer=1 - r, tag=2, key=f"both ways {rep}: {1 - r}->{r}"))
    with EmulatedNetwork(make_links(2, rate_GBps, 0.0)) as net:
        results = run_ranks([], ops, Placement((net.namespace(0), net.namespace(1)), net.address(0), "eth0"), 300)
    spans: dict[str, list[tuple[int, int]]] = {}
    for out in results:
        for rec in out["records"]:
            spans.setdefault(rec["key"], []).append((rec["start_ns"], rec["end_ns"]))
    model_ms = size_bytes / (rate_GBps * 1e9) * 1e3
    print(f"| transfer of {size_bytes / 2**20:g} MiB at {rate_GBps * 1e3:g} MB/s | measured ms | model ms |")
    print("| --- | ---: | ---: |")
    for key, s in spans.items():
        print(f"| {key} | {(max(e for _, e in s) - max(b for b, _ in s)) / 1e6:.1f} | {model_ms:.1f} |")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--link-GBps", type=float, default=0.0125)
    ap.add_argument("--link-latency-us", type=float, default=0.0)
    ap.add_argument("--node-size", type=int, default=None)
    ap.add_argument("--inter-GBps", type=float, default=None)
    ap.add_argument("--network", default="netns")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-size-mib", type=int, default=64)
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--collectives", default="p2p", help="p2p (the simulator's algorithms on send/recv) or native")
    ap.add_argument("--exchange", action="store_true", help="one pair, one way vs both ways (netns)")
    args = ap.parse_args(argv)
    if args.exchange:
        exchange(args.link_GBps, 8 * 2**20, args.repeats)
        return 0
    links = make_links(args.ranks, args.link_GBps, args.link_latency_us, args.node_size, args.inter_GBps)
    sizes = tuple(s for s in DEFAULT_SIZES_BYTES if s <= args.max_size_mib * 2**20)
    t0 = time.monotonic()
    res = run_microbench(links, network=args.network, sizes_bytes=sizes, warmup=args.warmup, repeats=args.repeats,
                         timeout_s=args.timeout_s, max_bytes=64 * 2**30, collectives=args.collectives)
    wall = time.monotonic() - t0
    doc = bench_dict(res)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(bench_markdown(doc))
    judged = [r for r in res.rows if r.case.size_bytes >= JUDGED_MIN_BYTES]
    worst_sim = max(abs(r.simulator_error_pct) for r in judged)
    worst_algo = max(abs(r.algorithm_error_pct) for r in judged)
    print(f"wall {wall:.0f} s; collectives {args.collectives}; from 1 MiB up: max |error| simulator model "
          f"{worst_sim:.1f} %, model of the algorithm that ran {worst_algo:.1f} %  [acceptance: 15 %]")
    for f in res.fits:
        print(f"tier {f.tier} {f.name}: fitted {f.bandwidth_Bps / 1e6:.3f} MB/s vs tc rate {f.emulated_rate_Bps / 1e6:.3f}"
              f" MB/s ({f.bandwidth_vs_emulated_pct:+.1f} %) [acceptance: 10 %], alpha {f.latency_s * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
