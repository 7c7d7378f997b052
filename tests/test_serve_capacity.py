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
