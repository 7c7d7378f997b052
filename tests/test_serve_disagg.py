"""Disaggregated prefill/decode: hand-computed single request, token and request conservation."""

from __future__ import annotations

import numpy as np
import pytest

from tensorstage.hardware.system import load_system
from tensorstage.model.resolve import resolve_model
from tensorstage.serve import ServingPlan, Workload, load_profile, simulate
from tensorstage.serve.serving import build_predictor
from tensorstage.sim.collectives import p2p_time_s
from tensorstage.sim.machine import fabric_from_system


@pytest.fixture(scope="module")
def setup():
    spec, system = resolve_model("gpt3-125m"), load_system("dgx-h100-superpod")
    return spec, system, build_predictor(spec, system, ServingPlan(tp=1))


def test_one_request_prefill_then_transfer_then_decode(setup):
    """TTFT = the prefill replica's batch-1 prefill; the second token comes one KV transfer
    (alpha + prompt KV bytes / scale-out bandwidth) plus one decode step later."""
    spec, system, pred = setup
    prof = load_profile("vllm")
    isl, osl = 500, 4
    res = simulate(spec, system, ServingPlan(engine=prof, tp=1, disagg=(1, 1)), Workload(1, isl, osl), predictor=pred)
    prefill = pred.iteration([isl], [0], [], 1, prof.scheduler_cpu_s).total_s
    fabric = fabric_from_system(system)
    tier = fabric.tiers[-1]
    transfer = tier.latency_s + pred.kv_bytes_per_token() * isl / tier.bw_Bps
    assert transfer == pytest.approx(p2p_time_s(pred.kv_bytes_per_token() * isl, len(fabric.tiers) - 1, fabric))
    decode = [pred.iteration([], [], [isl + k], 1, prof.scheduler_cpu_s, prof.cuda_graph_kernel_gap_s).total_s
              for k in range(1, osl)]
    assert res.requests.first_token_s[0] == pytest.approx(prefill, rel=1e-12)
    assert res.requests.finish_s[0] == pytest.approx(prefill + transfer + sum(decode), rel=1e-12)
    assert res.requests.replica[0] == 1 and res.num_gpus == 2


def test_pools_conserve_tokens_and_requests(setup):
    spec, system, pred = setup
    wl = Workload(400, 300, 40, arrival="poisson", rate_per_s=400.0, lengths="uniform", spread=0.8, seed=2)
    res = simulate(spec, system, ServingPlan(engine=load_profile("sglang"), tp=1, disagg=(2, 3)), wl, predictor=pred)
    st = res.steps
    assert st["emitted"].sum() == res.requests.output_tokens.sum()
    assert np.isfinite(res.requests.finish_s).all()
    on_decode = st["replica"] >= 2
    assert st["prefill_tokens"][~on_decode].sum() == res.requests.prompt_tokens.sum()
    assert st["decodes"][~on_decode].sum() == 0  # prefill replicas never decode
    assert set(res.requests.replica[res.requests.output_tokens > 1].tolist()) <= {2, 3, 4}


def test_heterogeneous_decode_pool_uses_its_own_devices(setup):
    """Decode pool on H200: TTFT as on H100 (same prefill pool), decode steps costed on H200's model."""
    spec, system, pred = setup
    prof = load_profile("vllm")
    isl, osl = 400, 5
    plan = ServingPlan(engine=prof, tp=1, disagg=(1, 1), decode_system="dgx-h200")
    res = simulate(spec, system, plan, Workload(1, isl, osl), predictor=pred)
    h200 = build_predictor(spec, load_system("dgx-h200"), plan)
    fabric = fabric_from_system(system)
    transfer = p2p_time_s(pred.kv_bytes_per_token() * isl, len(fabric.tiers) - 1, fabric)
    decode = [h200.iteration([], [], [isl + k], 1, prof.scheduler_cpu_s, prof.cuda_graph_kernel_gap_s).total_s
              for k in range(1, osl)]
    prefill = pred.iteration([isl], [0], [], 1, prof.scheduler_cpu_s).total_s
    assert res.requests.finish_s[0] == pytest.approx(prefill + transfer + sum(decode), rel=1e-12)
