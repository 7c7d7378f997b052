"""``best-serving``: the best serving deployment of a model on a system and GPU count.

Every deployment of ``gpus`` devices as replicas of one tensor-parallel size is enumerated
(:func:`serving_layouts`: TP a divisor of the GPU count within one node that divides the attention
heads, ``gpus // TP`` replicas; with ``disagg`` also every prefill:decode split of those replicas),
and each is run through the request-level serving simulator (:mod:`tensorstage.serve`) on the same
seeded workload:

* no SLO given: the offline throughput (every request queued at t = 0, MLPerf Offline /
  trtllm-bench), ranked by the saturated output tokens/s (while queues were non-empty: the rate a
  long run sustains, :func:`tensorstage.serve.metrics.saturated_tokens_per_s`); when a
  deployment's queue empties before half its requests finish there is no steady state, so all are
  ranked by whole-run output tokens/s and :attr:`BestServing.note` says to raise the request count;
* a TTFT and/or TPOT SLO: the highest Poisson rate whose p99 TTFT and p99 TPOT meet them
  (:func:`tensorstage.serve.capacity.find_max_qps`, MLPerf Server's validity rule), ranked by that
  rate, the offline throughput breaking ties.

A deployment whose weights do not fit beside a KV cache that holds the longest request is
``infeasible`` with the simulator's one-line reason. The best is what ``tensorstage serve`` runs
with ``--config`` (:func:`serve_config`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from tensorstage.errors import SpecError

OK, INFEASIBLE = "ok", "infeasible"
SATURATED = "saturated_output_tokens_per_s"
#: default requests per simulation, and the most the automatic lengthening goes to
AUTO_START_REQUESTS, AUTO_MAX_REQUESTS = 2000, 32000


@dataclass
class Deployment:
    """One candidate: TP per replica, replicas, an optional prefill:decode split, and its outcome."""

    tp: int
    replicas: int
    disagg: tuple[int, int] | None = None
    status: str = ""
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``TP2x4`` (MLPerf's naming: TP size x replicas), ``TP4 P1:D1`` when disaggregated."""
        return f"TP{self.tp} P{self.disagg[0]}:D{self.disagg[1]}" if self.disagg else f"TP{self.tp}x{self.replicas}"


@dataclass
class BestServing:
    """The outcome of :func:`best_serving`: every deployment, best first, and what was searched."""

    model: str
    system: str
    gpus: int
    objective: str
    deployments: list[Deployment]
    settings: dict[str, Any]
    wall_s: float = 0.0
    #: why the ranking is not by the objective one would expect (e.g. runs too short for a steady state)
    note: str = ""

    @property
    def best(self) -> Deployment | None:
        return self.deployments[0] if self.deployments and self.deployments[0].status == OK else None


def serving_layouts(num_heads: int, gpus_per_node: int, gpus: int, disagg: bool = False
                    ) -> list[tuple[int, int, tuple[int, int] | None]]:
    """``(tp, replicas, (P, D) or None)`` of every deployment searched (module docstring)."""
    if gpus < 1:
        raise SpecError("gpus", f"must be >= 1, got {gpus}")
    out: list[tuple[int, int, tuple[int, int] | None]] = []
    for tp in range(1, min(gpus, gpus_per_node) + 1):
        if gpus % tp or num_heads % tp:
            continue
        n = gpus // tp
        out.append((tp, n, None))
        if disagg:
            out += [(tp, n, (p, n - p)) for p in range(1, n)]
    return out


def _evaluate(spec: Any, system: Any, plan: Any, workload: Any, slo_ttft_s: float | None,
              slo_tpot_s: float | None) -> dict[str, float]:
    from tensorstage.serve import simulate
    from tensorstage.serve.capacity import find_max_qps
    from tensorstage.serve.serving import build_predictor

    pred = build_predictor(spec, system, plan)
    off = simulate(spec, system, plan, replace(workload, arrival="offline"), predictor=pred)
    m = off.metrics
    gpus = off.num_gpus
    out = {"output_tokens_per_s": m.output_tokens_per_s, "output_tokens_per_s_per_gpu": m.output_tokens_per_s / gpus,
           "offline_requests_per_s": m.requests_per_s, "offline_mean_running": m.mean_running,
           "offline_preemptions": float(m.preemptions), "kv_capacity_tokens": float(off.kv_capacity_tokens)}
    if SATURATED in m.extra:
        out[SATURATED] = m.extra[SATURATED]
    if slo_ttft_s is not None or slo_tpot_s is not None:
        cap = find_max_qps(spec, system, plan, replace(workload, arrival="poisson", rate_per_s=1.0), slo_ttft_s,
                           slo_tpot_s, predictor=pred)
        out["max_qps"] = cap.max_rate_per_s
        out["qps_ceiling"] = cap.offline_rate_per_s
        if cap.at_max is not None:
            a = cap.at_max.metrics
            out.update(ttft_p99_ms=a.ttft_s["p99"] * 1e3, tpot_p99_ms=a.tpot_s["p99"] * 1e3,
                       qps_output_tokens_per_s=a.output_tokens_per_s)
    return out


def best_serving(model: str, system: str, gpus: int, *, engine: str = "trtllm", weight_dtype: str = "bf16",
                 kv_dtype: str | None = None, workload: Any = None, slo_ttft_s: float | None = None,
                 slo_tpot_s: float | None = None, disagg: bool = False,
                 engine_overrides: dict[str, Any] | None = None, auto_requests: bool = False) -> BestServing:
    """Simulate every deployment of :func:`serving_layouts` and rank them (module docstring).

    ``workload`` is a :class:`tensorstage.serve.Workload` (its arrival process is replaced: offline
    for the throughput, Poisson for the rate search); default 2,000 requests of 1,024 + 256 tokens.
    Without a workload, or with ``auto_requests``, the request count grows until every deployment's
    offline run reaches a steady state (see the ranking below); ``settings["requests"]`` says how many.
    """
    from tensorstage.hardware.system import load_system
    from tensorstage.model.resolve import resolve_model
    from tensorstage.serve import ServingPlan, Workload, load_profile

    t0 = time.perf_counter()
    spec = resolve_model(model)
    sysm = load_system(system)
    profile = load_profile(engine, **(engine_overrides or {}))
    grow = workload is None or auto_requests
    wl = (workload or Workload(AUTO_START_REQUESTS, 1024, 256)).check()
    objective = "max_qps" if slo_ttft_s is not None or slo_tpot_s is not None else SATURATED
    if disagg and profile.policy != "continuous":
        raise SpecError("--disagg", "needs a continuous-batching engine", ("vllm", "sglang", "trtllm"))
    layouts = serving_layouts(spec.num_heads, sysm.gpus_per_node, gpus, disagg)
    if not layouts:
        raise SpecError("gpus", f"no tensor-parallel size divides both {gpus} GPUs and the model's "
                        f"{spec.num_heads} heads within a {sysm.gpus_per_node}-GPU node")

    def evaluate_all(wl: Any) -> list[Deployment]:
        out = []
        for tp, n, split in layouts:
            d = Deployment(tp, n, split)
            plan = ServingPlan(engine=profile, tp=tp, replicas=n, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                               disagg=split).check()
            try:
                d.metrics = _evaluate(spec, sysm, plan, wl, slo_ttft_s, slo_tpot_s)
                d.status = OK
            except SpecError as exc:
                d.status, d.message = INFEASIBLE, str(exc)
            out.append(d)
        return out

    def unsteady(ds: list[Deployment]) -> list[Deployment]:
        return [d for d in ds if d.status == OK and SATURATED not in d.metrics]

    # Offline: MLPerf Offline's long-run rate, without the drain at the end of a finite run (which
    # would favour fewer, larger replicas by how many requests the run happens to have). With the
    # default workload the run is lengthened (x4, up to AUTO_MAX_REQUESTS) until every deployment
    # reaches a steady state; a given workload is kept, and a deployment whose queue empties
    # before half its requests finish makes the ranking fall back to whole-run throughput.
    deps = evaluate_all(wl)
    while grow and unsteady(deps) and wl.num_requests < AUTO_MAX_REQUESTS:
        wl = replace(wl, num_requests=min(AUTO_MAX_REQUESTS, wl.num_requests * 4))
        deps = evaluate_all(wl)
    throughput, note = SATURATED, ""
    if unsteady(deps):
        throughput = "output_tokens_per_s"
        short = ", ".join(d.label for d in unsteady(deps))
        if all(d.disagg for d in unsteady(deps)):
            # requests wait at the prefill pool; a decode pool that never queues has no saturated rate,
            # which a longer run than the automatic lengthening's longest does not change
            more = "" if grow and wl.num_requests >= AUTO_MAX_REQUESTS else "; raise --requests"
            why = f"their decode pools never built a queue, as prefill-bound splits do{more}"
        else:
            why = "their queues empty before half their requests finish; raise --requests"
        note = (f"{wl.num_requests} requests give no steady state in {short} ({why}): ranked by whole-run "
                "throughput, drain included")
        if objective == SATURATED:
            objective = throughput

    def rank(d: Deployment) -> tuple:
        if d.status != OK:
            return (1, 0.0, 0.0, d.label)
        return (0, -d.metrics.get(objective, 0.0), -d.metrics[throughput], d.label)

    deps.sort(key=rank)
    settings = {"engine": profile.name, "weight_dtype": weight_dtype, "kv_dtype": kv_dtype,
                "requests": wl.num_requests, "requests_auto": grow,
                # a length file replaces the synthetic lengths: report only what was used
                "isl": None if wl.lengths_file else wl.input_tokens,
                "osl": None if wl.lengths_file else wl.output_tokens,
                "lengths": None if wl.lengths_file else wl.lengths,
                "lengths_file": wl.lengths_file,
                "spread": wl.spread, "seed": wl.seed, "slo_ttft_ms": None if slo_ttft_s is None else slo_ttft_s * 1e3,
                "slo_tpot_ms": None if slo_tpot_s is None else slo_tpot_s * 1e3,
                "engine_overrides": {k: v for k, v in (engine_overrides or {}).items() if v is not None}}
    return BestServing(spec.name, system, gpus, objective, deps, settings, time.perf_counter() - t0, note)


def serve_config(bs: BestServing, dep: Deployment | None = None) -> dict[str, Any]:
    """``tensorstage serve MODEL --config FILE`` options of a deployment (default: the best).

    Keys are ``serve``'s option names; the workload is left to the command line."""
    d = dep or bs.best
    if d is None:
        raise SpecError("best-serving", "no deployment fits; nothing to write")
    cfg: dict[str, Any] = {"system": bs.system, "engine": bs.settings["engine"], "tp": d.tp,
                           "weight_dtype": bs.settings["weight_dtype"]}
    if bs.settings["kv_dtype"] is not None:
        cfg["kv_dtype"] = bs.settings["kv_dtype"]
    if d.disagg:
        cfg["disagg"] = f"{d.disagg[0]}:{d.disagg[1]}"
    else:
        cfg["replicas"] = d.replicas
    names = {"max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_batched_tokens",
             "block_tokens": "block_tokens", "kv_mem_fraction": "kv_mem_fraction"}
    for k, v in bs.settings["engine_overrides"].items():
        cfg[names[k]] = v
    return dict(sorted(cfg.items()))


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def rank_rows(bs: BestServing) -> list[dict[str, Any]]:
    """Rows for printing: deployment, objective, throughput, latency at the best rate, status."""
    rows = []
    for d in bs.deployments:
        m = d.metrics
        row: dict[str, Any] = {"deployment": d.label, "tp": d.tp, "replicas": d.replicas,
                               SATURATED: m.get(SATURATED),
                               "output_tokens_per_s": m.get("output_tokens_per_s"),
                               "output_tokens_per_s_per_gpu": m.get("output_tokens_per_s_per_gpu"),
                               "kv_tokens_per_replica": _int(m.get("kv_capacity_tokens")),
                               "offline_mean_running": m.get("offline_mean_running"),
                               "offline_preemptions": _int(m.get("offline_preemptions"))}
        if bs.objective == "max_qps":
            from tensorstage.serve.capacity import limited_by

            bound = (None if m.get("max_qps") is None else  # (a deployment that did not run)
                     limited_by(m["max_qps"], m["qps_ceiling"], m.get("ttft_p99_ms") is not None))
            row.update(max_qps=m.get("max_qps"), limited_by=bound, ttft_p99_ms=m.get("ttft_p99_ms"),
                       tpot_p99_ms=m.get("tpot_p99_ms"))
        row["status"] = d.status if d.status == OK else f"{d.status}: {d.message}"
        rows.append(row)
    return rows


__all__ = ["BestServing", "Deployment", "best_serving", "rank_rows", "serve_config", "serving_layouts"]
