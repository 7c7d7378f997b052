"""Microbenchmarks: every collective and send/recv over a size sweep, on R real processes.

The sweep is the nccl-tests idea on gloo: for each (communicator, operation, size) a barrier on
the communicator, then the operation, ``warmup + repeats`` times. Each repetition is one sample;
its measured time is ``max(end) - max(start)`` over the members: from the moment the last member
arrived (nothing can complete before) to the moment the last one finished.

Communicators: ``world`` (all ranks) always; with two link tiers also ``node`` (the ranks of the
first emulated node), so each tier has samples whose slowest link is that tier. send/recv is
measured between rank 0 and rank 1 (``intra``) and, with two tiers, rank 0 and the first rank of
the second node (``inter``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tensorstage.errors import SpecError
from tensorstage.replay.ops import BENCH_OPS, Op

#: 64 KiB .. 64 MiB in steps of 4x: the acceptance range of the issue.
DEFAULT_SIZES_BYTES = tuple(64 * 1024 * 4**i for i in range(6))


@dataclass(frozen=True)
class BenchCase:
    """One measured configuration: an operation on a communicator at one size."""

    op: str
    group: str  # "world" | "node" | "p2p-intra" | "p2p-inter"
    ranks: tuple[int, ...]
    size_bytes: int


@dataclass(frozen=True)
class Sample:
    """One measured repetition of a :class:`BenchCase`."""

    case: BenchCase
    rep: int
    time_s: float


def bench_cases(ranks: int, node_size: int, ops: tuple[str, ...], sizes_bytes: tuple[int, ...]) -> list[BenchCase]:
    """The cases of a sweep on ``ranks`` processes whose first ``node_size`` share a node."""
    for op in ops:
        if op not in BENCH_OPS:
            raise SpecError("ops", f"unknown operation {op!r}", BENCH_OPS)
    if ranks < 2:
        raise SpecError("ranks", f"need at least 2 processes, got {ranks}")
    two_tier = 1 < node_size < ranks
    comms = [("world", tuple(range(ranks)))]
    if two_tier:
        comms.append(("node", tuple(range(node_size))))
    p2p = [("p2p-intra", (0, 1))] + ([("p2p-inter", (0, node_size))] if two_tier else [])
    cases = []
    for op in ops:
        for name, members in (p2p if op == "send_recv" else comms):
            cases += [BenchCase(op, name, members, s) for s in sizes_bytes]
    return cases


def bench_ops(cases: list[BenchCase], ranks: int, warmup: int, repeats: int) -> tuple[list[list[int]], list[list[Op]]]:
    """Communicators and per-rank op lists that measure ``cases`` (see module docstring)."""
    groups: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    for c in cases:
        if c.op != "send_recv" and len(c.ranks) < ranks and c.ranks not in index:
            index[c.ranks] = len(groups)
            groups.append(list(c.ranks))
    per_rank: list[list[Op]] = [[] for _ in range(ranks)]
    for ci, c in enumerate(cases):
        g = -1 if c.op == "send_recv" or len(c.ranks) == ranks else index[c.ranks]
        for rep in range(warmup + repeats):
            key = f"{ci}:{rep - warmup}"
            record = rep >= warmup
            for r in range(ranks):
                per_rank[r].append(Op("barrier", group=-1, record=False))
            if c.op == "send_recv":
                src, dst = c.ranks
                per_rank[src].append(Op("send", c.size_bytes, peer=dst, tag=ci, record=record, key=key))
                per_rank[dst].append(Op("recv", c.size_bytes, peer=src, tag=ci, record=record, key=key))
            else:
                for r in c.ranks:
                    per_rank[r].append(Op(c.op, c.size_bytes, group=g, record=record, key=key))
    return groups, per_rank


def samples_from_results(cases: list[BenchCase], results: list[dict]) -> list[Sample]:
    """Measured time of every recorded repetition: ``max(end) - max(start)`` over its members."""
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for res in results:
        for rec in res["records"]:
            spans[rec["key"]].append((rec["start_ns"], rec["end_ns"]))
    out = []
    for key in sorted(spans, key=lambda k: tuple(int(x) for x in k.split(":"))):
        ci, rep = (int(x) for x in key.split(":"))
        s = spans[key]
        out.append(Sample(cases[ci], rep, (max(e for _, e in s) - max(b for b, _ in s)) * 1e-9))
    return out
