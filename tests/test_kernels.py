"""Measured kernel tables: held-out accuracy, independent cross-checks, FP8 and attention rules, wiring.

The held-out points (``tests/data/kernel_heldout.json``) are measured latencies from aiconfigurator-core
that ``scripts/calibrate_kernels.py`` left out of the fit; the MAMF rates come from an independent
benchmark (stas00/ml-engineering); the attention backward and FP8 cast rules are written out here in
closed form from the sources the module cites.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tensorstage.graph.options import GraphOptions
from tensorstage.hardware import load_device, load_system
from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import NodeKind
from tensorstage.sim import machine_from_system, simulate
from tensorstage.sim.compute import GROUPED_OP, KERNEL_TABLES_DEFAULT, ComputeModel, grouped_dims
from tensorstage.sim.kernels import KernelTables, available_devices, load_tables
from tensorstage.sim.moe_layer import MoeLayer
from tensorstage.trace import write_chakra
from tensorstage.trace.to_programs import programs_from_trace
from tests.support import megatron_gpt

HELDOUT = Path(__file__).parent / "data" / "kernel_heldout.json"
TARGET_MAPE_PCT = 10.0
#: whole fused MoE layers (grouped GEMMs + permutation kernels, docs/calibration.md): what the
#: committed surface reaches on held-out layers, per dtype (the FP8 GEMM table itself is the weak part)
MOE_TARGET_MAPE_PCT = {"bf16": 20.0, "fp8": 30.0}


def _target(kernel: str) -> float:
    return MOE_TARGET_MAPE_PCT[kernel.split("/")[1]] if kernel.startswith("moe_layer/") else TARGET_MAPE_PCT


def _moe_layer(dev: str, kt: KernelTables, kernel: str, p: dict, grouped: bool = True) -> float:
    """A held-out MoE layer on the committed tables, unanchored (the tables' own short-run level)."""
    compute = ComputeModel.from_device(load_device(dev), kernel.split("/")[1], kernel_tables=kt)
    return MoeLayer(**{k: v for k, v in p.items() if k != "time_s"}).time_s(compute, grouped)


def _predict(kt: KernelTables, kernel: str, p: dict, dev: str = "") -> float | None:
    if kernel.startswith("moe_layer/"):
        return _moe_layer(dev, kt, kernel, p)
    if kernel.startswith("gemm/"):
        return kt.gemm_s(1, p["m"], p["n"], p["k"], kernel.split("/")[1])
    if kernel.startswith("attention_fwd/"):
        return kt.attention_fwd_s(p["batch"], p["heads"], p["seq"], p["seq"], p["head_dim"], causal=True,
                                  kv_heads=p["kv_heads"])
    return kt.decode_attention_s(p["batch"], p["heads"], p["kv_heads"], p["kv_len"], p["head_dim"])


def _mapes(scale: float = 1.0) -> dict[tuple[str, str], float]:
    data = json.loads(HELDOUT.read_text())["devices"]
    out = {}
    for dev, kernels in data.items():
        kt = load_tables(dev)
        assert kt is not None, dev
        kt = kt.scaled(scale)
        for kernel, points in kernels.items():
            errs = [abs(_predict(kt, kernel, p, dev) - p["time_s"]) / p["time_s"] for p in points]
            out[(dev, kernel)] = 100.0 * sum(errs) / len(errs)
    return out


def test_heldout_measured_points_within_target() -> None:
    """Every device/kernel/dtype: MAPE on measured held-out shapes <= 10 % (the issue's target for GEMM
    and attention kernels); whole MoE layers within their own bound."""
    mapes = _mapes()
    assert {d for d, _ in mapes} == {"A100-80GB", "H100-SXM", "H200", "B200"}
    assert any(k == "gemm/fp8" for _, k in mapes)
    assert {k for d, k in mapes if d == "H100-SXM" and k.startswith("moe_layer/")} == {"moe_layer/bf16", "moe_layer/fp8"}
    bad = {k: round(v, 2) for k, v in mapes.items() if v > _target(k[1])}
    assert not bad, bad


def test_heldout_check_fails_when_the_tables_are_off_by_20pct() -> None:
    """The held-out check has teeth: tables 1.2x slow miss the target everywhere (kernels; MoE layers
    are partly element-wise kernels the tables do not time, so only their GEMM-bound share moves)."""
    mapes = _mapes(scale=1.2)
    assert all(v > TARGET_MAPE_PCT for k, v in mapes.items() if not k[1].startswith("moe_layer/")), mapes


def test_grouped_gemm_efficiency_beats_the_dense_table_on_held_out_moe_layers() -> None:
    """On held-out measured bf16 MoE layers the grouped-GEMM efficiency surface predicts better than the
    dense GEMM table alone (which runs the experts 15-25 % too fast at training-size token counts)."""
    data = json.loads(HELDOUT.read_text())["devices"]
    for dev in ("H100-SXM", "H200", "B200"):
        kt = load_tables(dev)
        pts = data[dev]["moe_layer/bf16"]

        def err(grouped: bool, kt=kt, pts=pts, dev=dev) -> float:
            return sum(abs(_moe_layer(dev, kt, "moe_layer/bf16", p, grouped) - p["time_s"]) / p["time_s"]
                       for p in pts) / len(pts)

        assert err(True) < err(False), dev


def test_expert_gemms_are_grouped_nodes_with_the_measured_efficiency() -> None:
    """The lowering labels MoE expert GEMMs ``grouped_matmul`` (forward, input and weight gradients), and
    the compute model divides their dense time by the surface at (tokens per expert, width)."""
    spec = resolve_model("mixtral-8x7b")
    low = lower(spec, ParallelPlan(tp=1, pp=1, dp=1, seq=4096, global_batch=1, micro_batch=1))
    grouped = [n for prog in low.programs for n in prog.nodes if n.kind == NodeKind.COMP and n.op == GROUPED_OP]
    assert {n.category for n in grouped} == {"fwd", "bwd_input", "bwd_weight"}
    assert all(".experts." in n.name for n in grouped)
    dev = load_device("H100-SXM")
    cm = ComputeModel.from_device(dev, "bf16")
    n = next(x for x in grouped if x.category == "bwd_weight")
    tokens, width = grouped_dims(n.gemm, n.category)
    assert tokens == n.gemm[3] and width == min(n.gemm[1], n.gemm[2])
    eff = cm.kernels.grouped_gemm_efficiency(tokens, width)
    dense = cm.time_s(n.flops, n.tensor_bytes, "matmul", n.gemm, n.category) - cm.launch_s
    assert cm.time_s(n.flops, n.tensor_bytes, n.op, n.gemm, n.category) - cm.launch_s == pytest.approx(dense / eff)
    assert 0.5 < eff < 1.5  # Mixtral's wide experts at 1,024 tokens each run near the dense rate


@pytest.mark.parametrize(("device", "shape", "mamf_tflops"),
                         [("A100-80GB", (6912, 16384, 2048), 267.9), ("H100-SXM", (6144, 17920, 2816), 792.1)])
def test_large_gemm_at_or_below_independent_mamf(device: str, shape: tuple, mamf_tflops: float) -> None:
    """stas00/ml-engineering "Maximum Achievable Matmul FLOPS" (bf16, best shape of a sweep): the table's
    rate at that shape is at most the maximum and within 10 % of it."""
    m, n, k = shape
    t = load_tables(device).gemm_s(1, m, n, k, "bf16")
    rate = 2 * m * n * k / t / 1e12
    assert 0.90 * mamf_tflops <= rate <= mamf_tflops


def test_attention_backward_is_flashattention2_ratio_of_forward() -> None:
    """FlashAttention-2: backward 2.5x the forward FLOPs at 63 % vs 73 % of peak -> 2.5 * 73 / 63."""
    kt = load_tables("H100-SXM")
    fwd = kt.attention_fwd_s(2, 32, 4096, 4096, 128)
    assert kt.attention_bwd_s(2, 32, 4096, 4096, 128) == pytest.approx(fwd * 2.5 * 0.73 / 0.63, rel=1e-12)
    # work scales the time: a non-causal kernel does twice the causal pairs at the same efficiency
    assert kt.attention_fwd_s(2, 32, 4096, 4096, 128, causal=False) == pytest.approx(2 * fwd, rel=1e-12)


def test_fp8_gemm_is_measured_fp8_and_attention_stays_bf16() -> None:
    """FP8 programs: GEMMs from the FP8 table (measured with the input cast), attention from BF16."""
    dev = load_device("H100-SXM")
    kt = load_tables("H100-SXM")
    fp8 = ComputeModel.from_device(dev, "fp8", kernel_tables=True)
    bf16 = ComputeModel.from_device(dev, "bf16", kernel_tables=True)
    m, n, k = 8192, 8192, 8192
    f = 2 * m * n * k
    # the measured FP8 time, put on the device's sustained level: x (table's 8192^3 bf16 efficiency /
    # the preset's matmul_efficiency), written out here
    ref_eff = 2 * 8192**3 / kt.gemm_s(1, 8192, 8192, 8192, "bf16") / dev.peak_flops("bf16")
    expected = kt.gemm_s(1, m, n, k, "fp8") * ref_eff / dev.matmul_efficiency + dev.kernel_launch_s
    assert fp8.time_s(f, 0, "matmul", (1, m, n, k)) == pytest.approx(expected, rel=1e-12)
    # measured FP8 is faster than BF16 but well short of the datasheet's 2x; the roofline said 2x
    speedup = bf16.time_s(f, 0, "matmul", (1, m, n, k)) / fp8.time_s(f, 0, "matmul", (1, m, n, k))
    assert 1.2 < speedup < 1.9
    roof = [ComputeModel.from_device(dev, d, kernel_tables=False) for d in ("bf16", "fp8")]
    assert roof[0].time_s(f, 0, "matmul") / roof[1].time_s(f, 0, "matmul") == pytest.approx(2.0, rel=0.01)
    g, fl = (64, 4096, 4096, 128), 64 * 4096 * 4096 * (4 * 128 + 5) * 0.5
    assert fp8.time_s(fl, 0, "attention", g, "fwd") == bf16.time_s(fl, 0, "attention", g, "fwd")


def test_default_is_on_and_devices_without_tables_keep_the_roofline() -> None:
    assert KERNEL_TABLES_DEFAULT is True
    assert ComputeModel.from_device(load_device("H100-SXM"), "bf16").kernels is not None
    assert "MI300X" not in available_devices()
    dev = load_device("MI300X")
    on, off = (ComputeModel.from_device(dev, "bf16", kernel_tables=x) for x in (True, False))
    g = (1, 4096, 4096, 4096)
    assert on.time_s(2 * 4096**3, 0, "matmul", g) == off.time_s(2 * 4096**3, 0, "matmul", g)
    # a dtype without a table (tf32) keeps the roofline on a device that has tables
    h = load_device("H100-SXM")
    on, off = (ComputeModel.from_device(h, "tf32", kernel_tables=x) for x in (True, False))
    assert on.time_s(2 * 4096**3, 0, "matmul", g) == off.time_s(2 * 4096**3, 0, "matmul", g)


def test_tables_carry_provenance() -> None:
    root = Path(__file__).parent.parent / "src" / "tensorstage" / "hardware" / "kernels"
    for dev in available_devices():
        d = json.loads((root / f"{dev}.json").read_text())
        prov = d["provenance"]
        assert prov["package"] == "aiconfigurator-core" and re.fullmatch(r"\d+\.\d+\.\d+", prov["package_version"])
        assert prov["command"].startswith("python scripts/calibrate_kernels.py")
        kinds = {s["kernel"] for s in prov["sources"]}
        assert {"gemm", "attention_fwd", "decode_attention"} <= kinds
        for s in prov["sources"]:
            assert re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) and s["file"].endswith(".parquet")
            assert s["backend"] in ("trtllm", "vllm") and s["backend_version"] and s["dtype"]
        assert len((root / f"{dev}.json").read_bytes()) < 100_000


def test_lowered_flash_attention_carries_its_qk_shape() -> None:
    """GPT, TP 2, micro-batch 2: the fused core's shape is (b * heads / tp, s, s, head_dim); with CP 2
    ring chunks are the local queries against half the keys."""
    L, h, a, V, s, b, tp = 2, 256, 8, 1024, 256, 2, 2
    spec = megatron_gpt(L, h, a, V, s)
    low = lower(spec, ParallelPlan(tp=tp, seq=s, micro_batch=b, global_batch=b), GraphOptions())
    cores = [n for n in low.programs[0].nodes if n.kind == NodeKind.COMP and n.op == "attention"]
    assert {n.category for n in cores} >= {"fwd", "bwd_input"}
    assert {n.gemm for n in cores} == {(b * a // tp, s, s, h // a)}
    low = lower(spec, ParallelPlan(cp=2, seq=s, micro_batch=b, global_batch=2 * b), GraphOptions())
    cores = [n for n in low.programs[0].nodes if n.kind == NodeKind.COMP and n.op == "attention"]
    assert {n.gemm for n in cores} == {(b * a, s // 2, s // 2, h // a)}


def test_simulation_uses_the_tables_when_on() -> None:
    spec = resolve_model("gpt3-125m")
    plan = ParallelPlan(tp=2, dp=2, seq=2048, micro_batch=1, global_batch=4)
    low = lower(spec, plan)
    on = machine_from_system(load_system("dgx-h100-superpod", low.mesh.world))
    assert on.compute.kernels is not None  # the default
    from dataclasses import replace

    machine = replace(on, compute=replace(on.compute, kernels=None))
    r_off = simulate(low.programs, low.mesh, machine, tokens_per_step=low.tokens_per_step)
    r_on = simulate(low.programs, low.mesh, on, tokens_per_step=low.tokens_per_step)
    assert r_on.step_time_s != r_off.step_time_s
    again = simulate(low.programs, low.mesh, on, tokens_per_step=low.tokens_per_step)
    assert again.step_time_s == r_on.step_time_s


@pytest.mark.parametrize("fuse", [False, True])
def test_fused_and_traced_programs_simulate_identically_with_tables(tmp_path: Path, fuse: bool) -> None:
    """Fused parts keep their category and shape, and Chakra traces carry the attention shapes, so
    the measured-kernel step time is the same from the model, fused or not, and from its trace."""
    spec = resolve_model("gpt3-125m")
    plan = ParallelPlan(tp=2, pp=2, dp=2, seq=2048, micro_batch=1, global_batch=8)
    low = lower(spec, plan, fuse=fuse)
    m = machine_from_system(load_system("dgx-h100-superpod", low.mesh.world), kernel_tables=True)
    d = tmp_path / "tr"
    write_chakra(low.programs, low.mesh, d, json=True, classes_only=True, progress=False)
    back = programs_from_trace(d)
    direct = simulate(low.programs, low.mesh, m, tokens_per_step=low.tokens_per_step).step_time_s
    traced = simulate(back.programs, back.mesh, m, tokens_per_step=low.tokens_per_step).step_time_s
    assert traced == pytest.approx(direct, rel=1e-12)
    plain = lower(spec, plan, fuse=False)
    unfused = simulate(plain.programs, plain.mesh, m, tokens_per_step=plain.tokens_per_step).step_time_s
    assert direct == pytest.approx(unfused, rel=1e-12)


def test_decode_attention_node_takes_the_decode_table() -> None:
    """Llama-3-8B decode, TP 2, 16 sequences at 8K context: the core carries (16 * 32/2, 1, 8192, 128);
    the compute model recovers 16 x 8/2 KV heads from the node's K/V bytes and charges the decode table."""
    spec = resolve_model("llama3-8b")
    low = lower(spec, ParallelPlan(tp=2, phase="decode", context=8192, micro_batch=16, global_batch=16))
    core = next(n for n in low.programs[0].nodes if n.kind == NodeKind.COMP and n.op == "attention")
    assert core.gemm == (16 * 32 // 2, 1, 8192, 128)
    dev = load_device("H100-SXM")
    cm = ComputeModel.from_device(dev, "bf16", kernel_tables=True)
    expected = load_tables("H100-SXM").decode_attention_s(16, 16, 8 // 2, 8192, 128) + dev.kernel_launch_s
    got = cm.time_s(core.flops, core.tensor_bytes, core.op, core.gemm, core.category)
    assert got == pytest.approx(expected, rel=1e-12)
    # memory-bound: the K/V bytes at no more than the peak HBM bandwidth
    kv_bytes = 2 * 16 * 4 * 8192 * 128 * 2
    assert got > kv_bytes / (dev.hbm_GBps * 1e9)


def test_grouped_gemm_is_floored_by_reading_every_groups_weights() -> None:
    """64 experts of 4096 x 14336 with 8 tokens each: the table rate of 512 rows would share one weight;
    the node's bytes (every expert's weight) bound it from below at the achievable HBM rate."""
    dev = load_device("H100-SXM")
    cm = ComputeModel.from_device(dev, "bf16", kernel_tables=True)
    b, m, n, k = 64, 8, 14336, 4096
    nbytes = 2 * b * (m * k + k * n + m * n)
    t = cm.time_s(2 * b * m * n * k, nbytes, "matmul", (b, m, n, k))
    assert t == pytest.approx(nbytes / (dev.hbm_GBps * 1e9 * dev.hbm_efficiency) + dev.kernel_launch_s, rel=1e-12)
    assert t > load_tables("H100-SXM").gemm_s(b, m, n, k, "bf16")


@pytest.mark.parametrize("device", ["A100-80GB", "H100-SXM"])
def test_tables_are_anchored_on_the_sustained_matmul_efficiency(device: str) -> None:
    """The 8192^3 bf16 GEMM runs at exactly the preset's sustained matmul efficiency; other shapes
    keep the measured ratio to it; decode attention (HBM-bound) keeps its measured time."""
    dev = load_device(device)
    kt = load_tables(device)
    cm = ComputeModel.from_device(dev, "bf16", kernel_tables=True)
    f = 2 * 8192**3
    ref = (1, 8192, 8192, 8192)
    assert cm.time_s(f, 0, "matmul", ref) - cm.launch_s == pytest.approx(f / (dev.peak_flops("bf16")
                                                                             * dev.matmul_efficiency), rel=1e-12)
    g = (1, 4096, 2048, 2048)
    measured_ratio = kt.gemm_s(*g) / kt.gemm_s(*ref)
    model_ratio = (cm.time_s(0, 0, "matmul", g) - cm.launch_s) / (cm.time_s(f, 0, "matmul", ref) - cm.launch_s)
    assert model_ratio == pytest.approx(measured_ratio, rel=1e-12)
    sustained = cm.kernels
    assert sustained.decode_attention_s(8, 32, 8, 4096, 128) == kt.decode_attention_s(8, 32, 8, 4096, 128)


def test_gqa_attention_node_recovers_its_kv_heads_from_bytes() -> None:
    """Llama-3-8B (32 query, 8 K/V heads), TP 2, 2 x 4096 tokens: the forward and backward cores are
    charged as 16 query heads on 4 K/V heads per sequence (FlashAttention-3 runs GQA faster than MHA)."""
    spec = resolve_model("llama3-8b")
    low = lower(spec, ParallelPlan(tp=2, seq=4096, micro_batch=2, global_batch=2))
    dev = load_device("H100-SXM")
    cm = ComputeModel.from_device(dev, "bf16", kernel_tables=True)
    kt = cm.kernels  # the device's tables on its sustained level (anchoring is tested above)
    fwd = kt.attention_fwd_s(2, 16, 4096, 4096, 128, kv_heads=4)
    expected = {"fwd": fwd, "bwd_input": kt.attention_bwd_s(2, 16, 4096, 4096, 128, kv_heads=4)}
    seen = set()
    for n in low.programs[0].nodes:
        if n.kind == NodeKind.COMP and n.op == "attention" and n.category in expected:
            assert n.gemm == (2 * 16, 4096, 4096, 128)
            got = cm.time_s(n.flops, n.tensor_bytes, n.op, n.gemm, n.category) - dev.kernel_launch_s
            assert got == pytest.approx(expected[n.category], rel=1e-9)
            seen.add(n.category)
    assert seen == set(expected)
    assert fwd < kt.attention_fwd_s(2, 16, 4096, 4096, 128)  # the same FLOPs as MHA, faster


def test_a_device_can_borrow_the_tables_of_its_die() -> None:
    """H800 = the H100 SXM die (same SMs, clocks and Tensor Core peaks; narrower NVLink): its preset
    names the H100-SXM tables, so compute costs equal the H100's node for node."""
    from tensorstage.hardware import load_device
    from tensorstage.sim.compute import ComputeModel

    h800, h100 = (ComputeModel.from_device(load_device(n), "bf16") for n in ("H800", "H100-SXM"))
    assert h800.kernels is not None
    for gemm in ((1, 4096, 4096, 4096), (8, 512, 1536, 7168)):
        flops = 2 * gemm[0] * gemm[1] * gemm[2] * gemm[3]
        assert h800.time_s(flops, 0, "matmul", gemm) == h100.time_s(flops, 0, "matmul", gemm)
    assert load_device("H800").scaleup_GBps < load_device("H100-SXM").scaleup_GBps
