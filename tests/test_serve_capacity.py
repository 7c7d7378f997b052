"""``find_max_qps``: bisection brackets the highest Poisson rate meeting p99 SLOs."""

from __future__ import annotations

import pytest

from tensorstage.hardware.system import load_system
from tensorstage.model.resolve import resolve_model
from tensorstage.serve import ServingPlan, Workload, load_profile
from tensorstage.serve.capacity import find_max_qps, meets


def test_bisection_brackets_the_slo_boundary():
    spec, system = resolve_model("gpt3-125m"), load_system("dgx-h100-superpod")
    plan = ServingPlan(engine=load_profile("vllm"), tp=1)
    wl = Workload(300, 256, 32, seed=3)
    cap = find_max_qps(spec, system, plan, wl, slo_ttft_s=0.005, slo_tpot_s=None, rel_tol=0.05)
    assert cap.at_max is not None and meets(cap.at_max, 0.005, None)
    fails = [r for r, ok in cap.probes if not ok]
    passes = [r for r, ok in cap.probes if ok]
    assert max(passes) == pytest.approx(cap.max_rate_per_s)
    assert fails and min(fails) > cap.max_rate_per_s
    assert min(fails) - cap.max_rate_per_s <= 0.05 * cap.offline_rate_per_s + 1e-9
    assert cap.at_max.metrics.ttft_s["p99"] <= 0.005


def test_loose_slos_give_the_sustainable_ceiling_and_say_so():
    """SLOs that never bind: the answer is the throughput ceiling, no more than the saturated rate
    (output tokens/s while queues were non-empty over the mean output length: what a sustained load
    can get), and it is labelled throughput-bound; a tight SLO is labelled slo-bound."""
    from dataclasses import replace

    from tensorstage.serve import simulate
    from tensorstage.serve.capacity import ceiling_rate_per_s

    spec, system = resolve_model("gpt3-125m"), load_system("dgx-h100-superpod")
    plan = ServingPlan(engine=load_profile("vllm"), tp=1)
    wl = Workload(2000, 256, 64, seed=3)
    off = simulate(spec, system, plan, replace(wl, arrival="offline")).metrics
    sat = off.extra.get("saturated_output_tokens_per_s")
    assert sat is not None
    mean_osl = off.output_tokens_per_s / off.requests_per_s  # = 64 for fixed lengths
    assert mean_osl == pytest.approx(64)
    loose = find_max_qps(spec, system, plan, wl, slo_ttft_s=100.0, slo_tpot_s=100.0)
    assert loose.limited_by == "throughput" and loose.probes[0] == (loose.offline_rate_per_s, True)
    assert loose.max_rate_per_s == pytest.approx(min(off.requests_per_s, sat / 64), rel=1e-12)
    assert loose.max_rate_per_s == pytest.approx(ceiling_rate_per_s(simulate(spec, system, plan,
                                                                             replace(wl, arrival="offline"))))
    tight = find_max_qps(spec, system, plan, Workload(300, 256, 32, seed=3), slo_ttft_s=0.005, slo_tpot_s=None,
                         rel_tol=0.05)
    assert tight.limited_by == "slo"
