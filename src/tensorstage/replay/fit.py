"""Comparison of measured and predicted times, and the alpha-beta fit per link tier.

Fit: every measured case (median of its repetitions) is decomposed by the algorithm that ran
(:func:`tensorstage.replay.model.algorithm_terms`) into ``steps`` latency terms and ``x`` bytes through
the slowest port, so ``t = alpha * steps + x / B``. Per tier, ``alpha`` and ``1/B`` solve the least
squares problem in *relative* error (each row divided by its measured time, so a 64 KiB sample
counts as much as a 64 MiB one); the fitted ``alpha`` is the emulated delay plus what the host
adds per message (process wake-up, Python dispatch), both reported; a negative ``alpha`` (noise at small sizes) is clamped to 0 and
``B`` refitted alone. Reported with the fit: samples used, and the relative RMS residual.

By default the fit uses the operations that put one TCP flow on each port (ring all-reduce,
all-gather, reduce-scatter, send/recv: :data:`FIT_OPS`). All-to-all runs ``n-1`` concurrent flows
per port and finishes with the slowest of them: a transport effect that gloo's own ``alltoall``
made 10-30 % (its rendezvous, docs/benchmarks.md), so it stays visible in the comparison instead
of entering the fitted bandwidth (``--fit-ops`` can add it).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.replay.microbench import BenchCase, Sample
from tensorstage.replay.model import (
    Links,
    algorithm_terms,
    algorithm_tier,
    algorithm_time_s,
    simulator_time_s,
)

#: Operations the alpha-beta fit uses by default (module docstring).
FIT_OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


@dataclass(frozen=True)
class Row:
    """Measured (median over repetitions) vs predicted time of one case."""

    case: BenchCase
    measured_s: float
    repeats: int
    simulator_s: float
    algorithm_s: float

    @property
    def simulator_error_pct(self) -> float:
        return 100.0 * (self.simulator_s - self.measured_s) / self.measured_s

    @property
    def algorithm_error_pct(self) -> float:
        return 100.0 * (self.algorithm_s - self.measured_s) / self.measured_s


@dataclass(frozen=True)
class TierFit:
    """Fitted alpha-beta of one tier and how well it explains its samples."""

    tier: int
    name: str
    latency_s: float
    bandwidth_Bps: float
    cases: int
    rel_rms_pct: float
    emulated_rate_Bps: float
    emulated_latency_s: float = 0.0

    @property
    def bandwidth_vs_emulated_pct(self) -> float:
        return 100.0 * (self.bandwidth_Bps - self.emulated_rate_Bps) / self.emulated_rate_Bps


def compare(samples: list[Sample], links: Links, collectives: str = "p2p") -> list[Row]:
    """One :class:`Row` per case, in the order the cases were measured; ``collectives``: how the
    replay ran them (:data:`~tensorstage.replay.ops.COLLECTIVE_IMPLS`)."""
    by_case: dict[BenchCase, list[float]] = defaultdict(list)
    for s in samples:
        by_case[s.case].append(s.time_s)
    return [Row(c, statistics.median(ts), len(ts), simulator_time_s(c, links),
                algorithm_time_s(c, links, collectives)) for c, ts in by_case.items()]


def fit_tiers(rows: list[Row], links: Links, min_bytes: int = 0, ops: tuple[str, ...] = FIT_OPS,
              collectives: str = "p2p") -> list[TierFit]:
    """Alpha-beta per tier from ``rows`` of ``ops`` of at least ``min_bytes`` (module docstring)."""
    per_tier: dict[int, list[Row]] = defaultdict(list)
    for r in rows:
        if r.case.size_bytes >= min_bytes and r.case.op in ops:
            per_tier[algorithm_tier(r.case, links, collectives)].append(r)
    fits = []
    for tier in sorted(per_tier):
        rs = per_tier[tier]
        terms = np.array([algorithm_terms(r.case, links, collectives) for r in rs], dtype=float)
        t = np.array([r.measured_s for r in rs], dtype=float)
        a = terms / t[:, None]
        ones = np.ones(len(rs))
        if len(rs) >= 2:
            (alpha, inv_b), *_ = np.linalg.lstsq(a, ones, rcond=None)
        else:
            alpha, inv_b = -1.0, 0.0
        if alpha < 0 or inv_b <= 0:
            alpha = 0.0
            col = a[:, 1]
            inv_b = float(col @ ones / (col @ col))
        if inv_b <= 0:
            raise SpecError("results", f"tier {tier}: measured times do not grow with size; cannot fit")
        pred = terms[:, 0] * alpha + terms[:, 1] * inv_b
        rel = (pred - t) / t
        lt = links.tiers[min(tier, len(links.tiers) - 1)]
        fits.append(TierFit(tier, lt.name, float(alpha), float(1.0 / inv_b), len(rs),
                            float(100.0 * np.sqrt(np.mean(rel**2))), lt.rate_Bps, lt.latency_s))
    return fits


def error_summary(rows: list[Row], min_bytes: int) -> dict[str, dict[str, float]]:
    """Per operation: the largest |error| % of both models over cases of at least ``min_bytes``."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.case.size_bytes < min_bytes:
            continue
        d = out.setdefault(f"{r.case.op}/{r.case.group}", {"cases": 0, "max_abs_simulator_error_pct": 0.0,
                                                             "max_abs_algorithm_error_pct": 0.0})
        d["cases"] += 1
        d["max_abs_simulator_error_pct"] = max(d["max_abs_simulator_error_pct"], abs(r.simulator_error_pct))
        d["max_abs_algorithm_error_pct"] = max(d["max_abs_algorithm_error_pct"], abs(r.algorithm_error_pct))
    return out
