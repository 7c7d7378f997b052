"""Serving capacity: the highest Poisson rate whose p99 TTFT and p99 TPOT meet the SLOs.

Bisection over the arrival rate, as Vidur-Search does: the upper bracket is the offline
throughput (requests/s with every request queued at t = 0: no rate can be served faster for long),
the lower bracket 0. The offline throughput is the *saturated* rate (output tokens/s while queues
were non-empty, over the mean output length) when the offline run reaches that steady state, else
the whole run's rate (which counts the ramp and the drain, and can exceed what is sustainable).
When the SLOs already hold at that ceiling the capacity is ``throughput``-bound, not ``slo``-bound
(:attr:`CapacityResult.limited_by`): a finite run at a higher rate may still meet them while its
queue grows, which says nothing about a sustained load. Each probe is a full simulation with the
same seeded lengths and arrival draws scaled to the rate, so the search is deterministic. The criterion is MLPerf Server's: a run is valid
when p99 TTFT <= ``slo_ttft_s`` and p99 TPOT <= ``slo_tpot_s`` (either may be None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from tensorstage.errors import SpecError
from tensorstage.hardware.system import SystemSpec
from tensorstage.model.spec import ModelSpec
from tensorstage.serve.predictor import IterationPredictor
from tensorstage.serve.serving import ServingPlan, ServingResult, build_predictor, simulate
from tensorstage.serve.workloads import Workload


@dataclass
class CapacityResult:
    """The highest rate meeting the SLOs, the run at that rate, and every probe (rate, met).

    ``offline_rate_per_s``: the upper bracket (module docstring); ``limited_by``: ``throughput`` when
    the SLOs hold at it (the answer is the throughput ceiling), ``slo`` when they bind below it,
    ``none`` when no probed rate met them."""

    max_rate_per_s: float
    offline_rate_per_s: float
    at_max: ServingResult | None
    probes: list[tuple[float, bool]]

    @property
    def limited_by(self) -> str:
        return limited_by(self.max_rate_per_s, self.offline_rate_per_s, self.at_max is not None)


def limited_by(max_rate_per_s: float, ceiling_rate_per_s: float, met: bool) -> str:
    """``throughput`` when the answer is the ceiling itself (the SLOs hold there), ``slo`` when an SLO
    binds below it, ``none`` when no probed rate met the SLOs."""
    if not met:
        return "none"
    return "throughput" if max_rate_per_s >= ceiling_rate_per_s else "slo"


def ceiling_rate_per_s(offline: ServingResult) -> float:
    """Requests/s no sustained Poisson load can exceed: the saturated output rate over the mean output
    length when the offline run has a steady state, else the whole run's request rate."""
    m = offline.metrics
    sat = m.extra.get("saturated_output_tokens_per_s")
    if sat and m.output_tokens_per_s > 0:
        return min(m.requests_per_s, sat * m.requests_per_s / m.output_tokens_per_s)
    return m.requests_per_s


def meets(result: ServingResult, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """p99 TTFT and p99 TPOT within the SLOs (a missing TPOT, e.g. one-token outputs, passes)."""
    m = result.metrics
    ok = slo_ttft_s is None or m.ttft_s["p99"] <= slo_ttft_s
    return ok and (slo_tpot_s is None or not m.tpot_s["p99"] > slo_tpot_s)


def find_max_qps(spec: ModelSpec, system: SystemSpec, plan: ServingPlan, workload: Workload,
                 slo_ttft_s: float | None, slo_tpot_s: float | None, rel_tol: float = 0.02,
                 max_probes: int = 12, predictor: IterationPredictor | None = None,
                 progress: Callable[[float, bool], None] | None = None) -> CapacityResult:
    """Bisect the Poisson rate (module docstring) to ``rel_tol`` of the offline rate."""
    if slo_ttft_s is None and slo_tpot_s is None:
        raise SpecError("--find-max-qps", "needs --slo-ttft-ms and/or --slo-tpot-ms")
    pred = predictor or build_predictor(spec, system, plan)
    offline = simulate(spec, system, plan, replace(workload, arrival="offline"), predictor=pred)
    hi = ceiling = ceiling_rate_per_s(offline)
    lo, best = 0.0, None
    probes: list[tuple[float, bool]] = []
    for _ in range(max_probes):
        if hi - lo <= rel_tol * ceiling:
            break
        rate = (lo + hi) / 2 if best is not None or probes else hi
        res = simulate(spec, system, plan, replace(workload, arrival="poisson", rate_per_s=rate), predictor=pred)
        ok = meets(res, slo_ttft_s, slo_tpot_s)
        probes.append((rate, ok))
        if progress is not None:
            progress(rate, ok)
        if ok:
            lo, best = rate, res
            if rate >= hi:
                break
        else:
            hi = rate
    return CapacityResult(lo, ceiling, best, probes)


__all__ = ["CapacityResult", "ceiling_rate_per_s", "find_max_qps", "limited_by", "meets"]
