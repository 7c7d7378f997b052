"""``run_microbench``: the microbenchmark sweep on R processes, on emulated links or loopback.

Network modes: ``netns`` (one namespace per rank, shaped links: :mod:`tensorstage.replay.netns`),
``loopback`` (all ranks on ``127.0.0.1``, nothing shaped: the link parameters are then only
the *assumed* ones the predictions use) and ``auto`` (``netns`` when possible, else loopback, with
the reason kept in the result's notes).

Bounded: the bytes each rank moves are summed up front and refused beyond ``max_bytes``; the
predicted duration is checked against ``timeout_s``; the run itself is killed at ``timeout_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.replay.fit import Row, TierFit, compare, error_summary, fit_tiers
from tensorstage.replay.launch import Placement, run_ranks
from tensorstage.replay.microbench import BenchCase, Sample, bench_cases, bench_ops, samples_from_results
from tensorstage.replay.model import Links, LinkTier, algorithm_terms, algorithm_time_s
from tensorstage.replay.netns import EmulatedNetwork, netns_unavailable_reason
from tensorstage.replay.ops import BENCH_OPS, COLLECTIVE_IMPLS

NETWORK_MODES = ("auto", "netns", "loopback")
#: Largest one-way delay a run may emulate (netem), microseconds: 100 ms already needs a TCP
#: window of 2 x delay x rate, and a larger delay only makes a bounded run longer, not more telling.
MAX_LATENCY_US = 100_000.0
#: Comparison threshold of the issue: model errors are judged from 1 MiB up.
JUDGED_MIN_BYTES = 2**20


@dataclass
class BenchResult:
    """Samples of one sweep, their comparison with both models and the per-tier fit."""

    links: Links
    network: str  # "netns" | "loopback"
    samples: list[Sample]
    rows: list[Row]
    fits: list[TierFit]
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def choose_network(mode: str) -> tuple[str, list[str]]:
    """The network mode to use for ``mode`` and notes saying why (``netns`` may raise)."""
    if mode not in NETWORK_MODES:
        raise SpecError("network", f"unknown mode {mode!r}", NETWORK_MODES)
    if mode == "loopback":
        return "loopback", ["loopback: links are not shaped; predictions use the assumed link parameters"]
    reason = netns_unavailable_reason()
    if reason is None:
        return "netns", []
    if mode == "netns":
        raise SpecError("network", reason)
    return "loopback", [f"emulated links unavailable ({reason}); ran on loopback, links not shaped"]


def make_links(ranks: int, link_GBps: float, link_latency_us: float, node_size: int | None = None,
               inter_GBps: float | None = None, inter_latency_us: float | None = None) -> Links:
    """:class:`Links` from CLI-style numbers (GB/s decimal, microseconds)."""
    if ranks < 2:
        raise SpecError("ranks", f"need at least 2 processes, got {ranks}")
    if not link_GBps > 0:
        raise SpecError("link_GBps", f"must be > 0, got {link_GBps}")
    for name, us in (("link_latency_us", link_latency_us), ("inter_latency_us", inter_latency_us)):
        if us is not None and not 0 <= us <= MAX_LATENCY_US:
            raise SpecError(name, f"must be in 0..{MAX_LATENCY_US:g} us (one-way delay), got {us:g}")
    tiers = [LinkTier("intra", link_GBps * 1e9, link_latency_us * 1e-6)]
    node = ranks
    if inter_GBps is not None or node_size is not None:
        node = node_size or ranks // 2
        if not 1 < node < ranks or ranks % node:
            raise SpecError("node_size", f"must divide ranks={ranks} and lie in 2..{ranks // 2}, got {node}")
        if inter_GBps is None or not inter_GBps > 0:
            raise SpecError("inter_GBps", "a positive inter-node rate is needed with --node-size")
        lat = link_latency_us if inter_latency_us is None else inter_latency_us
        tiers.append(LinkTier("inter", inter_GBps * 1e9, lat * 1e-6))
    return Links(ranks, node, tuple(tiers))


def _check_bounds(cases: list[BenchCase], links: Links, reps: int, max_bytes: int, timeout_s: float,
                  collectives: str) -> None:
    moved = sum(algorithm_terms(c, links, collectives)[1] for c in cases) * reps
    if moved > max_bytes:
        raise SpecError("max_bytes", f"the sweep moves ~{moved / 2**30:.2f} GiB per rank, over the limit of "
                        f"{max_bytes / 2**30:.2f} GiB (fewer sizes or repeats, or raise --max-bytes)")
    predicted = sum(algorithm_time_s(c, links, collectives) for c in cases) * reps
    if predicted > 0.8 * timeout_s:
        raise SpecError("timeout_s", f"the sweep should take ~{predicted:.0f} s at the link rates, too close to "
                        f"the limit of {timeout_s:g} s (raise --timeout-s, or fewer sizes/repeats)")


def run_microbench(links: Links, *, network: str = "auto", ops: tuple[str, ...] = BENCH_OPS,
                   sizes_bytes: tuple[int, ...] = (2**16, 2**20), warmup: int = 1, repeats: int = 3,
                   timeout_s: float = 600.0, max_bytes: int = 16 * 2**30, collectives: str = "p2p") -> BenchResult:
    """Measure every op in ``ops`` at every size on ``links.ranks`` processes and compare/fit;
    ``collectives``: ``p2p`` (the simulator's algorithms on send/recv) or ``native`` (gloo's)."""
    if repeats < 1 or warmup < 0:
        raise SpecError("repeats", "repeats must be >= 1 and warmup >= 0")
    if not sizes_bytes or min(sizes_bytes) < 4 * links.ranks:
        raise SpecError("sizes", f"sizes must be at least {4 * links.ranks} bytes (one float per rank)")
    if collectives not in COLLECTIVE_IMPLS:
        raise SpecError("collectives", f"unknown implementation {collectives!r}", COLLECTIVE_IMPLS)
    mode, notes = choose_network(network)
    cases = bench_cases(links.ranks, links.node_size if links.two_tier else links.ranks, ops, sizes_bytes)
    _check_bounds(cases, links, warmup + repeats, max_bytes, timeout_s, collectives)
    groups, per_rank = bench_ops(cases, links.ranks, warmup, repeats)
    node = links.node_size if links.two_tier else None
    if mode == "netns":
        with EmulatedNetwork(links) as net:
            place = Placement(tuple(net.namespace(r) for r in range(links.ranks)), net.address(0), "eth0")
            results = run_ranks(groups, per_rank, place, timeout_s, collectives=collectives, node_size=node)
    else:
        results = run_ranks(groups, per_rank, Placement.loopback(links.ranks), timeout_s, collectives=collectives,
                            node_size=node)
    samples = samples_from_results(cases, results)
    rows = compare(samples, links, collectives)
    config = {"ops": list(ops), "sizes_bytes": list(sizes_bytes), "warmup": warmup, "repeats": repeats,
              "collectives": collectives}
    return BenchResult(links, mode, samples, rows, fit_tiers(rows, links, collectives=collectives), config, notes)


def bench_dict(res: BenchResult) -> dict[str, Any]:
    """Plain data of a sweep (``replay --bench --json`` / ``--out``), read back by :func:`bench_from_dict`."""
    return {
        "kind": "tensorstage-replay-bench",
        "network": res.network,
        "links": {"ranks": res.links.ranks, "node_size": res.links.node_size,
                  "tiers": [{"name": t.name, "rate_Bps": t.rate_Bps, "latency_s": t.latency_s}
                            for t in res.links.tiers]},
        "config": res.config,
        "notes": res.notes,
        "samples": [{"op": s.case.op, "group": s.case.group, "ranks": list(s.case.ranks),
                     "size_bytes": s.case.size_bytes, "rep": s.rep, "time_s": s.time_s} for s in res.samples],
        "comparison": [{"op": r.case.op, "group": r.case.group, "size_bytes": r.case.size_bytes,
                        "measured_s": r.measured_s, "simulator_s": r.simulator_s,
                        "algorithm_s": r.algorithm_s, "simulator_error_pct": r.simulator_error_pct,
                        "algorithm_error_pct": r.algorithm_error_pct}
                       for r in res.rows],
        "errors_from_1MiB": error_summary(res.rows, JUDGED_MIN_BYTES),
        "fit": [{"tier": f.tier, "name": f.name, "latency_s": f.latency_s, "bandwidth_Bps": f.bandwidth_Bps,
                 "cases": f.cases, "rel_rms_pct": f.rel_rms_pct, "emulated_rate_Bps": f.emulated_rate_Bps,
                 "emulated_latency_s": f.emulated_latency_s,
                 "bandwidth_vs_emulated_pct": f.bandwidth_vs_emulated_pct} for f in res.fits],
    }


def bench_from_dict(data: Any, where: str = "results") -> tuple[Links, list[Sample], str, str]:
    """Links, samples, network mode and collective implementation of a :func:`bench_dict`
    document (``SpecError`` if it is not one; results without ``config.collectives`` predate the
    p2p algorithms and ran gloo's ``native`` collectives)."""
    if not isinstance(data, dict) or data.get("kind") != "tensorstage-replay-bench":
        raise SpecError(where, "not a replay benchmark result (written by `tensorstage replay --bench --out`)")
    try:
        lk = data["links"]
        links = Links(int(lk["ranks"]), int(lk["node_size"]),
                      tuple(LinkTier(t["name"], float(t["rate_Bps"]), float(t["latency_s"])) for t in lk["tiers"]))
        samples = [Sample(BenchCase(s["op"], s["group"], tuple(s["ranks"]), int(s["size_bytes"])), int(s["rep"]),
                          float(s["time_s"])) for s in data["samples"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(where, f"malformed benchmark result ({exc})") from None
    if not samples:
        raise SpecError(where, "no samples")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    collectives = config.get("collectives", "native")
    if collectives not in COLLECTIVE_IMPLS:
        raise SpecError(where, f"unknown config.collectives {collectives!r}", COLLECTIVE_IMPLS)
    return links, samples, str(data.get("network", "?")), str(collectives)
