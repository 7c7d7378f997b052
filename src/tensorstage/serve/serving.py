"""``simulate``: a model served by replicas of an engine on a system, under a workload.

Disaggregated serving (``ServingPlan.disagg = (P, D)``, as DistServe / Splitwise / Dynamo): P
prefill replicas run prompts and the first token, then the prompt's KV cache moves to one of D
decode replicas (least outstanding tokens) over the system's outermost network tier (each of the
TP devices sends its shard: ``alpha + bytes / B``), which decode the rest. ``decode_system`` puts
the decode pool on other devices (heterogeneous pools; same TP, the prefill system's fabric).

``ModelSpec + ServingPlan + Workload (or a RequestTable) -> ServingResult``. The device roofline
and the fabric come from the system preset through :func:`tensorstage.sim.machine.machine_from_system`,
the same path the training simulator takes; the iteration cost from
:class:`tensorstage.serve.predictor.IterationPredictor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.hardware.system import SystemSpec, load_system
from tensorstage.model.spec import ModelSpec
from tensorstage.serve.engines import EngineProfile, load_profile
from tensorstage.serve.entities import RequestTable, StepLog
from tensorstage.serve.loop import run_loop
from tensorstage.serve.metrics import ServingMetrics, compute_metrics
from tensorstage.serve.predictor import GRAPH_PRECISION, IterationPredictor, kv_capacity_tokens
from tensorstage.serve.replica import Replica
from tensorstage.serve.routers import make_router
from tensorstage.serve.workloads import Workload
from tensorstage.sim.collectives import p2p_time_s
from tensorstage.sim.machine import fabric_from_system, machine_from_system


@dataclass(frozen=True)
class ServingPlan:
    """How the model is deployed: engine, TP per replica, replicas, dtypes, router."""

    engine: EngineProfile = field(default_factory=lambda: load_profile("vllm"))
    tp: int = 1
    replicas: int = 1
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    router: str = "round_robin"
    #: disaggregated serving: (prefill replicas, decode replicas); ``replicas`` is then ignored
    disagg: tuple[int, int] | None = None
    #: attention data-parallel over the tp GPUs, routed experts expert-parallel (MoE serving)
    attention_dp: bool = False
    #: heterogeneous pools: the decode pool runs on this system's devices (None: the same system)
    decode_system: str | None = None

    def check(self) -> ServingPlan:
        """Raise a one-line :class:`SpecError` naming the first bad field."""
        if self.tp < 1:
            raise SpecError("tp", f"must be >= 1, got {self.tp}")
        if self.replicas < 1:
            raise SpecError("replicas", f"must be >= 1, got {self.replicas}")
        if self.decode_system is not None and self.disagg is None:
            raise SpecError("decode_system", "applies to disaggregated serving only (give disagg P:D)")
        if self.disagg is not None:
            if len(self.disagg) != 2 or min(self.disagg) < 1:
                raise SpecError("disagg", f"needs P:D with P, D >= 1, got {self.disagg}")
            if self.engine.policy != "continuous":
                raise SpecError("disagg", "needs a continuous-batching engine", ("vllm", "sglang", "trtllm"))
        return self

    def num_replicas(self) -> int:
        """Replicas of the deployment (both pools when disaggregated)."""
        return sum(self.disagg) if self.disagg else self.replicas


@dataclass
class ServingResult:
    """A finished run: per-request table, per-step log, aggregates and what produced them."""

    requests: RequestTable
    steps: dict[str, np.ndarray]
    metrics: ServingMetrics
    kv_capacity_tokens: int
    num_gpus: int
    plan: ServingPlan


def build_predictor(spec: ModelSpec, system: SystemSpec, plan: ServingPlan) -> IterationPredictor:
    """The iteration-cost predictor of one replica (the system resized to ``tp`` devices)."""
    sysm = system.with_num_gpus(max(plan.tp, 1)) if plan.tp > 1 else system
    machine = machine_from_system(sysm, GRAPH_PRECISION.get(plan.weight_dtype, "bf16"))
    return IterationPredictor(spec, machine.compute, machine.fabric, plan.tp, plan.weight_dtype, plan.kv_dtype,
                              attention_dp=plan.attention_dp, gqa_kv_reuse=plan.engine.gqa_kv_reuse,
                              fused_gate_up=plan.engine.fused_gate_up)


def simulate(spec: ModelSpec, system: SystemSpec | str, plan: ServingPlan, workload: Workload | RequestTable,
             slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
             predictor: IterationPredictor | None = None,
             progress: Callable[[int], None] | None = None) -> ServingResult:
    """Serve ``workload`` and return per-request latencies and aggregates (module docstring)."""
    plan.check()
    sysm = load_system(system) if isinstance(system, str) else system
    pred = predictor or build_predictor(spec, sysm, plan)
    prof = plan.engine
    cap = kv_capacity_tokens(pred, sysm.device.hbm_bytes, prof.kv_mem_fraction, prof.block_tokens)
    concurrency = 0
    if isinstance(workload, Workload):
        req = workload.requests()
        concurrency = workload.concurrency if workload.arrival == "closed" else 0
    else:
        req = workload
        if len(req) and np.any(np.diff(req.arrival_s) < 0):
            raise SpecError("requests.arrival_s", "arrival times must be sorted")
    if len(req) == 0:
        raise SpecError("workload", "no requests")
    longest = int((req.prompt_tokens + req.output_tokens).max())
    if longest > cap:
        raise SpecError("workload", f"a request of {longest} tokens exceeds the KV cache of one replica "
                        f"({cap} tokens); raise --tp or shorten the requests")
    log = StepLog()
    if plan.disagg is None:
        replicas = [Replica(i, prof, pred, cap, req) for i in range(plan.replicas)]
        run_loop(req, replicas, make_router(plan.router), concurrency, log, progress)
    else:
        n_p, n_d = plan.disagg
        replicas = [Replica(i, prof, pred, cap, req, role="prefill") for i in range(n_p)]
        d_pred, d_cap = pred, cap
        if plan.decode_system is not None:
            d_sys = load_system(plan.decode_system)
            d_pred = build_predictor(spec, d_sys, plan)
            d_cap = kv_capacity_tokens(d_pred, d_sys.device.hbm_bytes, prof.kv_mem_fraction, prof.block_tokens)
            if longest > d_cap:
                raise SpecError("decode_system", f"a request of {longest} tokens exceeds the decode replica's KV "
                                f"cache ({d_cap} tokens)")
        decode = [Replica(n_p + i, prof, d_pred, d_cap, req, role="decode") for i in range(n_d)]
        fabric = fabric_from_system(sysm)
        kv_dev = pred.kv_bytes_per_token()

        def transfer_s(r: int) -> float:
            """Each of the tp devices sends its KV shard of the prompt over the outermost tier."""
            return p2p_time_s(kv_dev * float(req.prompt_tokens[r]), len(fabric.tiers) - 1, fabric)

        run_loop(req, replicas, make_router(plan.router), concurrency, log, progress, decode,
                 make_router("least_tokens"), transfer_s)
        replicas = replicas + decode
    steps = log.arrays()
    num_gpus = plan.tp * plan.num_replicas()
    metrics = compute_metrics(req, steps, num_gpus, replicas[0].total_blocks, slo_ttft_s, slo_tpot_s,
                              sum(r.prefix_hits for r in replicas), sum(r.prefix_lookups for r in replicas))
    return ServingResult(req, steps, metrics, cap, num_gpus, plan)


__all__ = ["ServingPlan", "ServingResult", "build_predictor", "simulate"]
