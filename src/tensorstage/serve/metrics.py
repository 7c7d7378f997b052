"""Serving metrics from the request table and the step log (definitions as the benchmarks use them).

* TTFT = first-token time - arrival (queueing included); TPOT = (finish - first token) /
  (output tokens - 1) per request (MLPerf's "time to output token"; requests of one output token
  have none); E2E = finish - arrival.
* Output throughput = output tokens / makespan, where the makespan runs from the first arrival to
  the last finish; per GPU divides by every GPU of the deployment.
* Goodput (DistServe): completed requests per second that met both SLOs (TTFT and TPOT).
* Saturated output throughput (offline runs): per replica, output tokens emitted while requests
  still waited in its queue, over that window, summed over replicas: the rate a long MLPerf
  Offline run sustains, without the drain at the end of a finite run (``extra``). Reported only
  when, on every replica, at least :data:`SATURATED_MIN_SHARE` of its requests finished inside
  that window: the batch turned over, so the window holds a steady state rather than the first
  admissions (an engine that prefills every queued prompt first empties its queue before any
  request finishes).
* Time-weighted means (over busy steps, per replica) of running requests, queue length and KV
  use come from the step log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tensorstage.serve.entities import RequestTable

PERCENTILES = (50, 90, 99)
#: share of a replica's requests that must finish while its queue is non-empty for a saturated rate
SATURATED_MIN_SHARE = 0.5


def _stats(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    out = {"mean": float(x.mean())}
    out.update({f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES})
    return out


@dataclass
class ServingMetrics:
    """Aggregate results of a run (seconds and tokens; ``*_ms`` only in :meth:`summary`)."""

    requests: int
    makespan_s: float
    output_tokens: int
    input_tokens: int
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    e2e_s: dict[str, float]
    output_tokens_per_s: float
    output_tokens_per_s_per_gpu: float
    requests_per_s: float
    goodput_requests_per_s: float | None
    slo_attainment: float | None
    preemptions: int
    prefix_hit_rate: float | None
    mean_running: float
    mean_waiting: float
    mean_kv_use: float
    steps: int
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        """A JSON-ready dict with latencies in ms (the edge where ms appear)."""
        def ms(d: dict[str, float]) -> dict[str, float]:
            return {k: round(v * 1e3, 4) for k, v in d.items()}

        return {
            "requests": self.requests,
            "makespan_s": round(self.makespan_s, 6),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.output_tokens_per_s, 3),
            "output_tokens_per_s_per_gpu": round(self.output_tokens_per_s_per_gpu, 3),
            "requests_per_s": round(self.requests_per_s, 6),
            "ttft_ms": ms(self.ttft_s),
            "tpot_ms": ms(self.tpot_s),
            "e2e_ms": ms(self.e2e_s),
            "goodput_requests_per_s": None if self.goodput_requests_per_s is None else round(self.goodput_requests_per_s, 6),
            "slo_attainment": None if self.slo_attainment is None else round(self.slo_attainment, 6),
            "preemptions": self.preemptions,
            "prefix_hit_rate": None if self.prefix_hit_rate is None else round(self.prefix_hit_rate, 6),
            "mean_running": round(self.mean_running, 4),
            "mean_waiting": round(self.mean_waiting, 4),
            "mean_kv_use": round(self.mean_kv_use, 6),
            "steps": self.steps,
            **{k: round(v, 3) for k, v in sorted(self.extra.items())},
        }


def per_request(req: RequestTable) -> dict[str, np.ndarray]:
    """TTFT, TPOT and E2E of every request (``nan`` where undefined)."""
    ttft = req.first_token_s - req.arrival_s
    e2e = req.finish_s - req.arrival_s
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(req.output_tokens > 1, (req.finish_s - req.first_token_s) / (req.output_tokens - 1), np.nan)
    return {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e}


def time_weighted(start: np.ndarray, end: np.ndarray, value: np.ndarray) -> float:
    """Mean of a quantity held over [start, end) intervals, weighted by duration."""
    dur = end - start
    total = float(dur.sum())
    return float((value * dur).sum() / total) if total > 0 else 0.0


def compute_metrics(req: RequestTable, steps: dict[str, np.ndarray], num_gpus: int,
                    kv_blocks_total: int, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
                    prefix_hits: int = 0, prefix_lookups: int = 0) -> ServingMetrics:
    """Aggregate a finished run (module docstring)."""
    pr = per_request(req)
    makespan = float(np.nanmax(req.finish_s) - np.min(req.arrival_s)) if len(req) else 0.0
    out_tok = int(req.output_tokens.sum())
    good = att = None
    if slo_ttft_s is not None or slo_tpot_s is not None:
        ok = np.ones(len(req), dtype=bool)
        if slo_ttft_s is not None:
            ok &= pr["ttft_s"] <= slo_ttft_s
        if slo_tpot_s is not None:
            ok &= ~(pr["tpot_s"] > slo_tpot_s)
        att = float(ok.mean())
        good = float(ok.sum() / makespan) if makespan > 0 else 0.0
    rate = out_tok / makespan if makespan > 0 else 0.0
    if len(steps.get("start_s", [])):
        s, e = steps["start_s"], steps["end_s"]
        mean_run = time_weighted(s, e, steps["running"])
        mean_wait = time_weighted(s, e, steps["waiting"])
        kv = time_weighted(s, e, steps["kv_blocks_used"]) / max(1, kv_blocks_total)
    else:
        mean_run = mean_wait = kv = 0.0
    extra: dict[str, float] = {}
    sat = saturated_tokens_per_s(steps, req)
    if sat is not None:
        extra["saturated_output_tokens_per_s"] = sat
    return ServingMetrics(
        requests=len(req),
        makespan_s=makespan,
        output_tokens=out_tok,
        input_tokens=int(req.prompt_tokens.sum()),
        ttft_s=_stats(pr["ttft_s"]),
        tpot_s=_stats(pr["tpot_s"]),
        e2e_s=_stats(pr["e2e_s"]),
        output_tokens_per_s=rate,
        output_tokens_per_s_per_gpu=rate / max(1, num_gpus),
        requests_per_s=len(req) / makespan if makespan > 0 else 0.0,
        goodput_requests_per_s=good,
        slo_attainment=att,
        preemptions=int(req.preemptions.sum()),
        prefix_hit_rate=(prefix_hits / prefix_lookups) if prefix_lookups else None,
        mean_running=mean_run,
        mean_waiting=mean_wait,
        mean_kv_use=kv,
        steps=len(steps.get("start_s", [])),
        extra=extra,
    )


def saturated_tokens_per_s(steps: dict[str, np.ndarray], req: RequestTable) -> float | None:
    """Output tokens/s while queues were non-empty (module docstring); ``None`` without a steady state."""
    if not len(steps.get("start_s", [])):
        return None
    total = 0.0
    for r in np.unique(steps["replica"]):
        mine = steps["replica"] == r
        queued = np.flatnonzero(mine & (steps["waiting"] > 0))
        if len(queued) == 0:
            return None  # a replica never had a queue: not a saturated run
        end = float(steps["end_s"][queued[-1]])
        window = mine & (steps["end_s"] <= end)
        t0 = float(steps["start_s"][mine].min())
        served = req.replica == r
        if end <= t0 or np.count_nonzero(served & (req.finish_s <= end)) < SATURATED_MIN_SHARE * np.count_nonzero(served):
            return None  # the batch never turned over while requests queued: ramp and drain only
        span = end - t0
        total += float(steps["emitted"][window].sum()) / span
    return total


__all__ = ["PERCENTILES", "SATURATED_MIN_SHARE", "ServingMetrics", "compute_metrics", "per_request", "saturated_tokens_per_s",
           "time_weighted"]
