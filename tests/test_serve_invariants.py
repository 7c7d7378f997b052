"""Serving simulator invariants on small scenarios worked out by hand.

Step times are the predictor's; what is checked here is the scheduling: which tokens each step
runs (hand-derived below), that every output token is produced once, KV never over capacity,
requests conserved, the idle-system latencies, and Little's law on a steady run.
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorstage.hardware.system import load_system
from tensorstage.model.resolve import resolve_model
from tensorstage.serve import RequestTable, ServingPlan, Workload, load_profile, simulate
from tensorstage.serve.entities import StepLog
from tensorstage.serve.loop import run_loop
from tensorstage.serve.replica import Replica
from tensorstage.serve.routers import make_router
from tensorstage.serve.serving import build_predictor

SYSTEM = "dgx-h100-superpod"


@pytest.fixture(scope="module")
def setup():
    spec = resolve_model("gpt3-125m")
    system = load_system(SYSTEM)
    plan = ServingPlan(engine=load_profile("vllm"), tp=1)
    return spec, system, build_predictor(spec, system, plan)


def _profile(**kw):
    base = dict(max_num_batched_tokens=8, max_num_seqs=4, block_tokens=4, chunked_prefill=True,
                prefix_caching=False, cuda_graph=False, scheduler_cpu_s=0.0)
    base.update(kw)
    return load_profile("vllm", **base)


def _run(pred, prof, req, capacity_tokens, replicas=1, decode_runs=True, router="round_robin", concurrency=0):
    reps = [Replica(i, prof, pred, capacity_tokens, req) for i in range(replicas)]
    for r in reps:
        r.decode_runs = decode_runs
    log = StepLog()
    run_loop(req, reps, make_router(router), concurrency, log)
    return reps, log.arrays()


@pytest.mark.parametrize(("arrival", "concurrency"), [("poisson", 0), ("closed", 5)])
def test_decode_runs_equal_single_steps(setup, arrival, concurrency):
    """Planning runs of decode-only steps as one event changes nothing: same step log, same times."""
    _, _, pred = setup
    wl = Workload(150, 60, 40, arrival=arrival, rate_per_s=300.0, concurrency=concurrency, lengths="uniform",
                  spread=0.6, seed=5)
    prof = load_profile("vllm", max_num_seqs=16, block_tokens=8)
    out = []
    for runs in (False, True):
        req = wl.requests()
        _, steps = _run(pred, prof, req, capacity_tokens=4000, replicas=2, decode_runs=runs,
                        router="least_tokens", concurrency=concurrency)
        out.append((req, steps))
    (a, sa), (b, sb) = out
    # rows of a run are logged when it starts: compare per replica in time order
    sa, sb = ({k: v[np.lexsort((st["start_s"], st["replica"]))] for k, v in st.items()} for st in (sa, sb))
    for col in ("replica", "tokens", "decodes", "running", "waiting", "kv_blocks_used", "emitted"):
        assert sa[col].tolist() == sb[col].tolist(), col
    np.testing.assert_allclose(sa["end_s"], sb["end_s"], rtol=1e-9)
    np.testing.assert_allclose(a.finish_s, b.finish_s, rtol=1e-9)
    np.testing.assert_allclose(a.first_token_s, b.first_token_s, rtol=1e-9)


def test_three_requests_token_budget_8_stepped_by_hand(setup):
    """Prompts 5, 6, 3 and outputs 3, 2, 4 at t=0, budget 8 tokens, chunked prefill:

    step 1: r0 prefill 5 (whole: first token), r1 prefill chunk 3            -> 8 tokens, 1 emitted
    step 2: r0 decode, r1 prefill rest 3 (first token), r2 prefill 3 (first)  -> 7 tokens, 3 emitted
    step 3: decodes r0 (3rd, done), r1 (2nd, done), r2 (2nd)                  -> 3 tokens
    step 4: r2 decode (3rd); step 5: r2 decode (4th, done)                   -> 1, 1
    """
    _, _, pred = setup
    req = RequestTable.of(np.zeros(3), [5, 6, 3], [3, 2, 4])
    _, steps = _run(pred, _profile(), req, capacity_tokens=1024)
    assert steps["tokens"].tolist() == [8, 7, 3, 1, 1]
    assert steps["prefill_tokens"].tolist() == [8, 6, 0, 0, 0]
    assert steps["decodes"].tolist() == [0, 1, 3, 1, 1]
    assert steps["emitted"].tolist() == [1, 3, 3, 1, 1]
    # step durations are the predictor's cost of exactly those shapes
    t1 = pred.iteration([5, 3], [0, 0], [], 1).total_s
    t2 = pred.iteration([3, 3], [3, 0], [6], 3).total_s
    t3 = pred.iteration([], [], [7, 7, 4], 3).total_s
    t4 = pred.iteration([], [], [5], 1).total_s
    t5 = pred.iteration([], [], [6], 1).total_s
    ends = np.cumsum([t1, t2, t3, t4, t5])
    np.testing.assert_allclose(steps["end_s"], ends, rtol=1e-12)
    np.testing.assert_allclose(req.first_token_s, [ends[0], ends[1], ends[1]], rtol=1e-12)
    np.testing.assert_allclose(req.finish_s, [ends[2], ends[2], ends[4]], rtol=1e-12)


def _twelve_requests() -> tuple[RequestTable, np.ndarray, np.ndarray]:
    """12 requests of up to 31 tokens arriving within 10 ms (seeded): more than a 40-token cache holds."""
    rng = np.random.default_rng(3)
    n = 12
    prompt = rng.integers(3, 16, n)
    out = rng.integers(1, 16, n)
    return RequestTable.of(np.sort(rng.uniform(0, 0.01, n)), prompt, out), prompt, out


def test_tokens_once_kv_bounded_requests_conserved_under_preemption(setup):
    """A KV cache of 40 tokens (10 blocks) for 12 requests of up to 31 tokens forces preemption."""
    _, _, pred = setup
    req, _, out = _twelve_requests()
    reps, steps = _run(pred, _profile(max_num_seqs=6), req, capacity_tokens=40)
    assert int(req.preemptions.sum()) > 0
    assert steps["emitted"].sum() == out.sum()  # every output token exactly once
    assert steps["kv_blocks_used"].max() <= 10 and reps[0].free_blocks == 10
    assert np.isfinite(req.finish_s).all()  # every request finished
    assert (req.first_token_s >= req.arrival_s).all() and (req.finish_s >= req.first_token_s).all()
    assert (reps[0].slot_req < 0).all() and not reps[0].waiting


def test_reserved_kv_admission_never_preempts(setup):
    """The same 40-token cache with TensorRT-LLM's GUARANTEED_NO_EVICT (``kv_reserve_full``): each
    request is admitted only with blocks for its prompt + output reserved, so nothing is preempted,
    the reserved blocks never exceed the 10 of the cache, and at any step the running requests' whole
    lengths fit in it (checked from the step log: blocks held = sum of ceil((prompt + out) / 4))."""
    _, _, pred = setup
    req, prompt, out = _twelve_requests()
    reps, steps = _run(pred, _profile(max_num_seqs=6, kv_reserve_full=True), req, capacity_tokens=40)
    assert int(req.preemptions.sum()) == 0
    assert steps["emitted"].sum() == out.sum()
    assert steps["kv_blocks_used"].max() <= 10 and reps[0].free_blocks == 10
    assert np.isfinite(req.finish_s).all()
    whole = -(-(prompt + out) // 4)
    # a request waits while its whole length does not fit beside the running ones: the first step
    # holds exactly the blocks of the requests it admitted
    first = int(steps["running"][0])
    assert steps["kv_blocks_used"][0] == int(whole[:first].sum())


def test_idle_system_latencies_are_batch1_prefill_and_decode(setup):
    """One request on an idle replica: TTFT = one batch-1 prefill of the prompt (with the engine's
    per-step CPU time), TPOT = the mean batch-1 decode step over its growing context."""
    spec, system, pred = setup
    isl, osl = 300, 6
    prof = load_profile("vllm")
    res = simulate(spec, system, ServingPlan(engine=prof, tp=1), Workload(1, isl, osl), predictor=pred)
    ttft = pred.iteration([isl], [0], [], 1, prof.scheduler_cpu_s).total_s
    decode = [pred.iteration([], [], [isl + k], 1, prof.scheduler_cpu_s, prof.cuda_graph_kernel_gap_s).total_s
              for k in range(1, osl)]
    assert res.metrics.ttft_s["p50"] == pytest.approx(ttft, rel=1e-12)
    assert res.metrics.tpot_s["p50"] == pytest.approx(sum(decode) / (osl - 1), rel=1e-12)


def test_littles_law_on_a_steady_poisson_run(setup):
    """Mean requests in the system (from the step log: running + waiting, time-weighted over the
    run) = arrival rate x mean time in the system (from the request table)."""
    spec, system, pred = setup
    wl = Workload(3000, 200, 50, arrival="poisson", rate_per_s=150.0, lengths="uniform", spread=0.5, seed=7)
    res = simulate(spec, system, ServingPlan(engine=load_profile("vllm"), tp=1), wl, predictor=pred)
    st = res.steps
    dur = st["end_s"] - st["start_s"]
    in_system = float(((st["running"] + st["waiting"]) * dur).sum() / res.metrics.makespan_s)
    lam = len(res.requests) / res.metrics.makespan_s
    assert in_system == pytest.approx(lam * res.metrics.e2e_s["mean"], rel=0.08)


def test_static_batch_runs_to_completion(setup):
    """Static batching: 4 requests with max 2 per batch run as two batches of prefill + decodes."""
    _, _, pred = setup
    prof = load_profile("static", max_num_seqs=2)
    req = RequestTable.of(np.zeros(4), [10, 10, 10, 10], [3, 3, 3, 3])
    _, steps = _run(pred, prof, req, capacity_tokens=1000)
    assert steps["tokens"].tolist() == [20, 2, 2, 20, 2, 2]
    assert req.first_token_s[0] == req.first_token_s[1] < req.first_token_s[2]


def test_deterministic(setup):
    spec, system, pred = setup
    wl = Workload(200, 100, 20, arrival="poisson", rate_per_s=100.0, lengths="lognormal", spread=0.4, seed=1)
    plan = ServingPlan(engine=load_profile("sglang"), tp=1, replicas=2, router="least_tokens")
    a = simulate(spec, system, plan, wl, predictor=pred).metrics.summary()
    b = simulate(spec, system, plan, wl, predictor=pred).metrics.summary()
    assert a == b


def test_prefix_cache_skips_shared_prefix_blocks(setup):
    """20 requests in 2 prefix groups of 64 tokens (4 blocks of 16): the first of each group misses,
    the other 18 hit and compute 64 fewer prompt tokens each."""
    spec, system, pred = setup
    wl = Workload(20, 100, 5, arrival="poisson", rate_per_s=50.0, prefix_groups=2, prefix_tokens=64, seed=4)
    on = simulate(spec, system, ServingPlan(engine=load_profile("vllm"), tp=1), wl, predictor=pred)
    off = simulate(spec, system, ServingPlan(engine=load_profile("vllm", prefix_caching=False), tp=1), wl,
                   predictor=pred)
    assert on.metrics.prefix_hit_rate == pytest.approx(18 / 20)
    assert off.metrics.prefix_hit_rate is None
    assert off.steps["prefill_tokens"].sum() == 20 * 100
    assert on.steps["prefill_tokens"].sum() == 20 * 100 - 18 * 64
    assert on.steps["emitted"].sum() == off.steps["emitted"].sum() == 20 * 5
