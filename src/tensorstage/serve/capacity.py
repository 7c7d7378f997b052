"""Serving capacity: the highest Poisson rate whose p99 TTFT and p99 TPOT meet the SLOs.

Bisection over the arrival rate, as Vidur-Search does: the upper bracket is the offline
throughput (requests/s with every request queued at t = 0: no rate can be served faster), the
lower bracket 0. Each probe is a full simulation with the same seeded lengths and arrival draws
scaled to the rate, so the search is deterministic. The criterion is MLPerf Server's: a run is valid
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
    """The highest rate meeting the SLOs, the run at that rate, and every probe (rate, met)."""

    max_rate_per_s: float
    offline_rate_per_s: float
    at_max: ServingResult | None
    probes: list[tuple[float, bool]]


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
    hi = offline.metrics.requests_per_s
    lo, best = 0.0, None
    probes: list[tuple[float, bool]] = []
    for _ in range(max_probes):
        if hi - lo <= rel_tol * offline.metrics.requests_per_s:
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
    return CapacityResult(lo, offline.metrics.requests_per_s, best, probes)


__all__ = ["CapacityResult", "find_max_qps", "meets"]
