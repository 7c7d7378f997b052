"""Benchmark the symbolic graph: build + evaluate a 126-layer 405B model, and 10,000 bindings.

Targets (issue 3): building the 405B graph and evaluating its costs < 1 s; evaluating costs for
10,000 parameter bindings < 1 s. Run: ``.venv/bin/python bench/bench_graph.py``.
"""

from __future__ import annotations

import time

import numpy as np

from tensorstage.graph import GraphOptions, build_graph
from tensorstage.model.spec import ModelSpec
from tensorstage.report.console import print_table

# Llama-3.1-405B (Meta model card / HF config.json)
LLAMA_405B = ModelSpec(
    name="llama3.1-405b",
    num_layers=126,
    hidden=16384,
    num_heads=128,
    num_kv_heads=8,
    ffn=53248,
    vocab=128256,
    max_seq=131072,
)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    rows = []
    for recompute in ("none", "selective", "full"):
        graph, t_build = _timed(
            lambda r=recompute: build_graph(LLAMA_405B, "train", GraphOptions(recompute=r))
        )
        rep, t_eval = _timed(lambda g=graph: g.costs({"b": 1, "s": 8192}))
        rows.append([f"405B train build ({recompute})", t_build * 1e3, "< 1000 (build + first eval)"])
        rows.append(
            [f"405B train first costs() ({recompute})", t_eval * 1e3, f"{rep.total_flops():.4g} FLOPs"]
        )
        _, t_again = _timed(lambda g=graph: g.costs({"b": 1, "s": 8192}))
        rows.append([f"405B train costs() again ({recompute})", t_again * 1e3, "compiled"])
    graph = build_graph(LLAMA_405B, "train")
    graph.costs({"b": 1, "s": 1024})
    rng = np.random.default_rng(0)
    b = rng.integers(1, 17, 10_000)
    s = rng.choice([1024, 2048, 4096, 8192, 16384], 10_000)
    rep, t_vec = _timed(lambda: graph.costs({"b": b, "s": s}))
    rows.append(["405B costs() over 10,000 bindings", t_vec * 1e3, f"shape {rep.totals['fwd_flops'].shape}"])
    for phase in ("prefill", "decode"):
        (g, t_b) = _timed(lambda p=phase: build_graph(LLAMA_405B, p))
        _, t_e = _timed(lambda g=g: g.costs({"b": 8, "s": 4096, "c": 8192}))
        rows.append([f"405B {phase} build + costs()", (t_b + t_e) * 1e3, ""])
    print_table(
        "bench_graph (milliseconds)", ["case", "ms", "note"], [[r[0], round(r[1], 1), r[2]] for r in rows]
    )


if __name__ == "__main__":
    main()
