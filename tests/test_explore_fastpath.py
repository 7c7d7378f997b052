"""The closed-form pre-screen against published closed forms and against the full simulator."""

from __future__ import annotations

import numpy as np
import pytest

from tensorstage.explore.bestplan import spearman
from tensorstage.explore.evaluate import training_step
from tensorstage.explore.fastpath import screen
from tensorstage.explore.setup import Task, build_system

MODEL, SYSTEM = "megatron-1.7b", "dgx-a100-selene"
# megatron-1.7b (Narayanan et al. 2021 Table 1): L=24, h=2304, V=51200, s=2048, tied embeddings
L, H, V, S = 24, 2304, 51200, 2048


def _screen(gpus: int, **cols):
    n = max(len(v) for v in cols.values() if np.ndim(v))
    base = {"seq": S, "dtype": "fp16", "recompute": "none"}
    return screen(MODEL, build_system(SYSTEM, gpus), {**base, **cols}, n)


def test_model_flops_match_narayanan_closed_form():
    """MFU x step time x GPUs x peak = the step's model FLOPs: Narayanan et al. eq. (no recompute)
    72 B s L h^2 (1 + s/6h + V/12Lh), with the attention-score term halved for the causal mask
    (s/12h; the graph counts the causal half, the paper the full square)."""
    m = _screen(8, tp=np.array([1, 2]), dp=np.array([8, 4]), micro_batch=np.array([1, 1]),
                global_batch=np.array([64, 64]))
    peak = build_system(SYSTEM, 8).device.peak_flops("fp16")
    flops = m["mfu"] * m["step_time_s"] * 8 * peak
    expect = 72 * 64 * S * L * H**2 * (1 + S / (12 * H) + V / (12 * L * H))
    assert flops == pytest.approx([expect, expect], rel=0.02)


@pytest.mark.parametrize(("dtype", "total", "sharded"), [("bf16", 18, 12), ("fp16", 20, 16)])
def test_zero1_saves_megatron_bytes_per_param(dtype: str, total: int, sharded: int):
    """Megatron's distributed optimizer keeps 6 + 12/DP bytes per parameter instead of 18 with bf16
    (public_cases F-MEGATRON-BYTES), 4 + 16/DP instead of 20 with fp16 parameters and gradients
    (Megatron-LM docs/user-guide/features/dist_optimizer.md): ZeRO-1 over DP=8 saves 12 (16) x 7/8
    bytes per parameter."""
    m = _screen(8, dp=np.full(3, 8), zero=np.array([0, 1, 3]), global_batch=np.full(3, 8),
                dtype=np.full(3, dtype))
    params = 12 * L * H**2 * (1 + 13 / (12 * H) + (V + S) / (12 * L * H))  # F-PARAMS-DENSE
    saved = m["peak_memory_bytes"][0] - m["peak_memory_bytes"][1]
    assert saved == pytest.approx(sharded * (1 - 1 / 8) * params, rel=0.01)
    # ZeRO-3 (F-ADAM-ZERO, with Megatron's bytes): every byte of state sharded, total / DP per parameter,
    # less what FSDP2 holds gathered (fp16, 2 bytes) without pipelining: the root unit (embedding table and
    # position embeddings, plus the final LayerNorm; the head is tied) and the layer in use with the one
    # prefetched (fsdp_prefetch = 1)
    layer = 12 * H**2 + 13 * H
    root = (V + S) * H + 2 * H
    saved3 = m["peak_memory_bytes"][0] - m["peak_memory_bytes"][2]
    assert saved3 == pytest.approx(total * (1 - 1 / 8) * params - 2 * (root + 2 * layer), rel=0.01)


def test_pipeline_bubble_fraction():
    """1F1B with p stages and m micro-batches idles (p-1) micro-batch times (F-PP-BUBBLE: bubble
    fraction (p-1)/m), the interleaved schedule with v chunks (p-1)/v: the step grows by one
    micro-batch time per micro-batch, and interleaving saves (p-1)(1 - 1/v) of them (the optimizer
    step and boundary sends, the same in both, cancel)."""
    pp, v, mbs = 4, 2, np.array([8, 16, 32])
    one = _screen(4, pp=np.full(3, pp), global_batch=mbs, dp=np.ones(3, int))
    per_mb = (one["step_time_s"][2] - one["step_time_s"][1]) / 16
    assert one["step_time_s"][1] - one["step_time_s"][0] == pytest.approx(8 * per_mb, rel=1e-9)
    assert one["step_time_s"][0] - 8 * per_mb >= (pp - 1) * per_mb
    inter = _screen(4, pp=np.full(3, pp), global_batch=mbs, dp=np.ones(3, int), vpp=np.full(3, v),
                    schedule="interleaved")
    per_mb_i = (inter["step_time_s"][2] - inter["step_time_s"][1]) / 16
    assert per_mb_i == pytest.approx(per_mb, rel=1e-9)
    saved = one["step_time_s"][0] - inter["step_time_s"][0]
    assert saved / per_mb == pytest.approx((pp - 1) * (1 - 1 / v), rel=0.05)


def test_ranking_agrees_with_full_simulation():
    """Spearman rank correlation between the screen and the simulator on layouts that differ in
    every screened term (TP, PP, micro-batch, recompute, interleaving). The bench
    (bench/bench_explore.py) measures it on larger random samples."""
    plans = [dict(tp=1, pp=1, dp=8, micro_batch=1, recompute="none"),
             dict(tp=2, pp=1, dp=4, micro_batch=2, recompute="selective", sp=True),
             dict(tp=4, pp=2, dp=1, micro_batch=1, recompute="full", sp=True),
             dict(tp=1, pp=4, dp=2, micro_batch=2, recompute="none"),
             dict(tp=2, pp=2, dp=2, micro_batch=1, recompute="full", schedule="interleaved", vpp=2),
             dict(tp=8, pp=1, dp=1, micro_batch=4, recompute="selective", sp=False)]
    for p in plans:
        p.update(global_batch=32, seq=S, dtype="fp16")
    cols = {k: np.array([p.get(k, dflt) for p in plans]) for k, dflt in
            (("tp", 1), ("pp", 1), ("dp", 1), ("micro_batch", 1), ("recompute", "none"), ("sp", False),
             ("schedule", "1f1b"), ("vpp", 1), ("global_batch", 32))}
    fast = screen(MODEL, build_system(SYSTEM, 8), {**cols, "seq": S, "dtype": "fp16"}, len(plans))
    full = [training_step(Task(MODEL, SYSTEM, 8, p))["metrics"]["step_time_s"] for p in plans]
    assert spearman(fast["step_time_s"], np.array(full)) >= 0.9
    # the screen charges every matmul at the large-GEMM rate; the simulator charges measured per-shape
    # kernels (slower for small GEMMs and attention), so the screen reads fast, by up to ~30 % here
    assert np.max(np.abs(fast["step_time_s"] / np.array(full) - 1)) < 0.35


@pytest.mark.parametrize("model, gpus, tp, pp, dp, zero, recompute, mb", [
    ("megatron-1.7b", 16, 1, 2, 8, 3, "selective", 1),  # ZeRO-3 + pipelining: the whole stage stays gathered
    ("megatron-1.7b", 16, 2, 2, 4, 3, "full", 2),
    ("megatron-1.7b", 8, 1, 1, 8, 3, "none", 2),        # ZeRO-3 alone: root + layers in use gathered
    ("llama3-8b", 8, 1, 1, 8, 1, "full", 2),            # 128K vocabulary: the head's logits dominate
    ("llama3-8b", 16, 2, 2, 4, 3, "full", 1),
])
def test_screen_peak_memory_tracks_the_simulator(model, gpus, tp, pp, dp, zero, recompute, mb):
    """The screen prunes by memory, so its peak must not miss what the simulator holds: FSDP2's
    gathered parameters (before: a ZeRO-3 pipeline screened at a third of its simulated peak) and
    the head's activations."""
    from tensorstage import api

    cols = {"tp": np.array([tp]), "pp": np.array([pp]), "dp": np.array([dp]), "zero": np.array([zero]),
            "recompute": recompute, "micro_batch": np.array([mb]), "seq": 2048, "global_batch": 64,
            "dtype": "bf16", "sp": np.array([tp > 1])}
    fast = screen(model, build_system("dgx-h100-superpod", gpus), cols, 1)["peak_memory_bytes"][0]
    full = api.simulate(model, "dgx-h100-superpod", api.make_plan(
        tp=tp, pp=pp, dp=dp, zero=zero, recompute=recompute, micro_batch=mb, seq=2048, global_batch=64,
        sp=tp > 1)).result.peak_memory_bytes
    assert fast == pytest.approx(full, rel=0.25)


@pytest.mark.parametrize("pp, dp", [(1, 8), (2, 4)])
def test_screen_peak_memory_under_gpipe_holds_every_micro_batch_head(pp, dp):
    """GPipe keeps every micro-batch's activations, the head's logits included, until the backward."""
    from tensorstage import api

    cols = {"tp": np.array([1]), "pp": np.array([pp]), "dp": np.array([dp]), "zero": np.array([1]),
            "recompute": "full", "micro_batch": np.array([1]), "seq": 2048, "global_batch": 64,
            "dtype": "bf16", "schedule": "gpipe"}
    fast = screen("llama3-8b", build_system("dgx-h100-superpod", 8), cols, 1)["peak_memory_bytes"][0]
    full = api.simulate("llama3-8b", "dgx-h100-superpod", api.make_plan(
        tp=1, pp=pp, dp=dp, zero=1, recompute="full", micro_batch=1, seq=2048, global_batch=64,
        schedule="gpipe")).result.peak_memory_bytes
    assert fast == pytest.approx(full, rel=0.05)


@pytest.mark.parametrize("global_batch", [16, 64])
def test_uneven_pipeline_fill_and_drain_is_the_other_stages_time(global_batch):
    """24 layers on 16 stages (1, 2 x 8, 1 x 7): filling and draining the pipeline takes the other
    stages' times, 11 two-layer stage times, not 15 (charging every stage as the busiest put the screen
    28 % over the simulator at 16 micro-batches)."""
    from tensorstage import api
    from tensorstage.explore.bestplan import balanced_split

    cols = {"tp": np.array([1]), "pp": np.array([16]), "dp": np.array([1]), "zero": np.array([0]),
            "recompute": "full", "micro_batch": np.array([1]), "seq": 2048, "global_batch": global_batch,
            "dtype": "bf16"}
    fast = screen(MODEL, build_system(SYSTEM, 16), cols, 1)["step_time_s"][0]
    full = api.simulate(MODEL, SYSTEM, api.make_plan(
        tp=1, pp=16, dp=1, zero=0, recompute="full", micro_batch=1, seq=2048, global_batch=global_batch,
        pp_layer_split=balanced_split(24, 16))).result.step_time_s
    assert fast == pytest.approx(full, rel=0.15)


def test_screen_builds_the_graph_the_plan_names():
    """Graph conventions in the plan (materialized attention, dropout, Megatron's kernels) change what
    the full simulation costs, so the screen costs the same graph: slower and larger than flash
    attention without dropout, and nearer the simulator than the default graph's screen was."""
    base = {"tp": 1, "pp": 1, "dp": 8, "micro_batch": 1, "global_batch": 8, "seq": S, "dtype": "fp16",
            "recompute": "none", "zero": 1}
    mat = {**base, "attention_impl": "materialized", "attention_flops": "full", "dropout": True,
           "megatron_fusions": True}
    both = screen(MODEL, build_system(SYSTEM, 8), {k: np.array([base.get(k), mat[k]], dtype=object)
                                                    if k not in base else np.array([base[k], mat[k]])
                                                    for k in mat}, 2)
    assert both["step_time_s"][1] > both["step_time_s"][0]
    assert both["peak_memory_bytes"][1] > both["peak_memory_bytes"][0]
    full = training_step(Task(MODEL, SYSTEM, 8, mat))
    assert full["status"] == "ok"
    sim = full["metrics"]["step_time_s"]
    assert abs(both["step_time_s"][1] - sim) < abs(both["step_time_s"][0] - sim)
    sim_mem = full["metrics"]["peak_memory_bytes"]
    assert abs(both["peak_memory_bytes"][1] - sim_mem) < abs(both["peak_memory_bytes"][0] - sim_mem)
