"""GEMM shape efficiency: shapes on COMP nodes, the tile/wave model, and trace round trips.

Expected numbers are written in closed form here (tile counts, waves and the K factor computed by
hand from the NVIDIA "Matrix Multiplication Background" rule the module documents), never copied
from the code's output.
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil
from pathlib import Path

import pytest

from tensorstage.graph.options import GraphOptions
from tensorstage.hardware import load_device, load_system
from tensorstage.lower import lower
from tensorstage.model import resolve_model
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import NodeKind
from tensorstage.sim import machine_from_system, simulate
from tensorstage.sim.compute import (
    GEMM_K_OVERHEAD,
    ComputeModel,
    fused_op,
    fused_parts,
    gemm_shape_factor,
)
from tensorstage.trace import write_chakra
from tensorstage.trace.reader import node_attrs, read_chakra
from tensorstage.trace.to_programs import programs_from_trace
from tests.support import megatron_gpt


def test_wave_quantization_closed_form() -> None:
    """8192 x 768 (k 6144) on 108 SMs: 256x128 tiles -> 32*6 = 192 tiles = 2 waves of 108 (1.78 used)."""
    m, n, k, sms = 8192, 768, 6144, 108
    tiles = ceil(m / 256) * ceil(n / 128)
    waves = ceil(tiles / sms)
    expected = (m * n) / (waves * sms * 256 * 128) * k / (k + GEMM_K_OVERHEAD)
    assert waves == 2
    assert gemm_shape_factor(1, m, n, k, sms) == pytest.approx(expected, rel=1e-12)
    # the same GEMM fills 132 SMs better: 128x128 tiles -> 64*6 = 384 tiles = 2.91 waves of 132
    t128 = ceil(m / 128) * ceil(n / 128)
    exp_h = (m * n) / (ceil(t128 / 132) * 132 * 128 * 128) * k / (k + GEMM_K_OVERHEAD)
    assert gemm_shape_factor(1, m, n, k, 132) == pytest.approx(exp_h, rel=1e-12)


def test_split_k_fills_the_machine_for_one_tile_problems() -> None:
    """128 x 128 x 8192 on 108 SMs: 64x64 tiles (4) split K 27 ways = 108 CTAs, one full wave; the tile's
    operand reuse 64*64/128 = 32 is half of 128x128's, and each K-slice is 8192/27 deep."""
    kslice = 8192 / 27
    expected = 1.0 * 0.5 * kslice / (kslice + GEMM_K_OVERHEAD)
    assert gemm_shape_factor(1, 128, 128, 8192, 108) == pytest.approx(expected, rel=1e-12)


def test_reference_shape_keeps_the_measured_ceiling_and_others_are_slower() -> None:
    dev = load_device("A100-80GB")
    cm = ComputeModel.from_device(dev, "bf16", gemm_shapes=True, kernel_tables=False)
    f = 2 * 8192**3
    assert cm.time_s(f, 0, "matmul", (1, 8192, 8192, 8192)) == pytest.approx(cm.time_s(f, 0, "matmul"), rel=1e-12)
    g = (1, 8192, 768, 6144)
    f2 = 2 * 8192 * 768 * 6144
    ratio = (cm.time_s(f2, 0, "matmul", g) - cm.launch_s) / (cm.time_s(f2, 0, "matmul") - cm.launch_s)
    # by hand on 108 SMs: 8192^3 in 256x128 tiles = 32*64 = 2048 tiles in 19 waves (2052 slots), K 8192;
    # 8192 x 768 x 6144 in 256x128 tiles = 32*6 = 192 tiles in 2 waves (216 slots), K 6144
    ref = 2048 / (19 * 108) * 8192 / (8192 + 64)
    shaped = 192 / (2 * 108) * 6144 / (6144 + 64)
    assert GEMM_K_OVERHEAD == 64
    assert ratio == pytest.approx(ref / shaped, rel=1e-12)
    assert ratio > 1.1
    # off: the shape is ignored
    off = ComputeModel.from_device(dev, "bf16", gemm_shapes=False, kernel_tables=False)
    assert off.time_s(f2, 0, "matmul", g) == off.time_s(f2, 0, "matmul")


@pytest.mark.parametrize(
    ("device", "shape", "mamf_tflops"),
    [
        ("A100-80GB", (6912, 16384, 2048), 267.9),
        ("H100-SXM", (6144, 17920, 2816), 792.1),
    ],
)
def test_shaped_large_gemm_at_most_mamf_and_within_10pct(device: str, shape: tuple, mamf_tflops: float) -> None:
    """stas00/ml-engineering MAMF table (bf16, the best shape found by a search over shapes): no GEMM
    may run faster than that measured maximum, and the best shape lands within 10 % below it."""
    m, n, k = shape
    cm = ComputeModel.from_device(load_device(device), "bf16", gemm_shapes=True)
    flops = 2 * m * n * k
    rate = flops / cm.time_s(flops, 2 * (m * k + k * n + m * n), "matmul", (1, m, n, k)) / 1e12
    assert rate <= mamf_tflops
    assert rate >= 0.90 * mamf_tflops


def test_fused_op_round_trips_part_shapes() -> None:
    parts = [("matmul", 10, 20, "fwd", (2, 3, 4, 5)), ("norm", 1, 2, "fwd", None)]
    assert fused_parts(fused_op(parts)) == parts
    assert fused_parts(fused_op([("add", 1, 2, "fwd")])) == [("add", 1, 2, "fwd", None)]


def test_lowered_gemm_shapes_match_the_model_dims() -> None:
    """Megatron GPT, TP 4 + SP, micro-batch 2: per-rank shapes from the model's dims in closed form."""
    L, h, a, V, s, b, tp = 2, 256, 8, 1024, 128, 2, 4
    low = lower(megatron_gpt(L, h, a, V, s), ParallelPlan(tp=tp, sp=True, seq=s, micro_batch=b, global_batch=b),
                GraphOptions(attention_impl="materialized", attention_flops="full"))
    shaped = [(n.name, n.gemm) for n in low.programs[0].nodes if n.kind == NodeKind.COMP and n.gemm is not None]

    def find(suffix: str) -> tuple[int, int, int, int]:
        hits = [g for name, g in shaped if name.endswith(suffix)]
        assert hits, suffix
        return hits[0]

    tokens, dh = b * s, h // a
    assert find("mlp.fc1") == (1, tokens, 4 * h // tp, h)
    assert find("mlp.down_proj") == (1, tokens, h, 4 * h // tp)
    assert find("mlp.fc1.grad_w:mlp.fc1.weight") == (1, h, 4 * h // tp, tokens)
    assert find("attn.scores") == (b * a // tp, s, s, dh)
    assert find("attn.context") == (b * a // tp, s, dh, s)
    for n in low.programs[0].nodes:  # every shape multiplies out to the node's FLOPs (full attention)
        if n.gemm is not None and n.category != "optimizer":
            bb, m, nn, k = n.gemm
            assert n.flops == 2 * bb * m * nn * k, n.name


@pytest.mark.parametrize("fuse", [False, True])
def test_trace_carries_shapes_and_simulates_identically(tmp_path: Path, fuse: bool) -> None:
    spec = resolve_model("gpt3-125m")
    plan = ParallelPlan(tp=2, pp=2, dp=2, seq=512, micro_batch=1, global_batch=8)
    low = lower(spec, plan, fuse=fuse)
    d = tmp_path / "tr"
    write_chakra(low.programs, low.mesh, d, json=True, classes_only=True, progress=False)
    back = programs_from_trace(d)
    system = load_system("dgx-a100-selene", low.mesh.world)
    machine = machine_from_system(system)
    machine = replace(machine, compute=replace(machine.compute, gemm_shapes=True, kernels=None))
    direct = simulate(low.programs, low.mesh, machine, tokens_per_step=low.tokens_per_step)
    traced = simulate(back.programs, back.mesh, machine, tokens_per_step=low.tokens_per_step)
    assert traced.step_time_s == pytest.approx(direct.step_time_s, rel=1e-12)
    off = replace(machine, compute=replace(machine.compute, gemm_shapes=False))
    plain = simulate(low.programs, low.mesh, off, tokens_per_step=low.tokens_per_step)
    assert direct.step_time_s > plain.step_time_s  # the shapes were used (small GEMMs are slower)
    # the ET files themselves carry the shapes of unfused matmul nodes ([b, m, n, k] int64 lists)
    src = {n.id: n.gemm for n in low.programs[0].nodes}
    _, nodes = read_chakra(d / "trace.class0.et")  # class 0 = programs[0] (pp 0)
    seen = 0
    for n in nodes:
        a = node_attrs(n)
        if "gemm" in a:
            assert tuple(a["gemm"].values) == src[n.id]
            seen += 1
    assert seen == sum(g is not None for g in src.values()) and (seen > 0) == (not fuse)


# --- Megatron fused element-wise kernels (lower/megatron_fusion.py) -----------------------------------


@pytest.mark.parametrize("sp", [False, True])
def test_megatron_fused_kernels_bytes_closed_form(sp: bool) -> None:
    """bias-dropout-add = 7 bytes/element (read GEMM output 2 + residual 2, write sum 2 + mask 1),
    bias-GeLU = 4 (read 2, write 2), LayerNorm weight+bias gradients in one pass = read dy and x
    (4 bytes/element + the gradient write); FLOPs and communication unchanged."""
    from tensorstage.graph import build_graph
    from tensorstage.lower.blocks import lower_blocks

    L, h, a, V, s, b, tp = 2, 256, 8, 1024, 128, 2, 2
    spec = megatron_gpt(L, h, a, V, s)
    plan = ParallelPlan(tp=tp, sp=sp, seq=s, micro_batch=b, global_batch=b)
    base = dict(attention_impl="materialized", attention_flops="full", dropout=True, norm_stats=False,
                recompute="full", precision="fp16")
    plain, fused = (lower_blocks(build_graph(spec, "train", GraphOptions(**base, megatron_fusions=f)), plan)["dense"]
                    for f in (False, True))
    tokens = b * s // (tp if sp else 1)  # element-wise work runs on the sequence shard under SP
    for chain in ("forward", "recompute"):
        nodes = {n.name.replace(".recompute", "").replace(".bias_add", ""): n for n in getattr(fused, chain)}
        assert nodes["attn.o_proj.bias_dropout_add"].tensor_bytes == 7 * tokens * h
        assert nodes["mlp.down_proj.bias_dropout_add"].tensor_bytes == 7 * tokens * h
        assert nodes["mlp.fc1.bias_gelu"].tensor_bytes == 4 * b * s * (4 * h // tp)
        names = [n.name for n in getattr(fused, chain)]
        i = names.index(next(x for x in names if x.endswith("o_proj.bias_add:" + ("reduce_scatter" if sp else
                                                                                    "all_reduce"))))
        assert names[i + 1].endswith("bias_dropout_add")  # the TP reduction runs before the fused kernel
        # 3 + 3 + 2 kernels became 1 + 1 + 1; q, k, v (three GEMMs, three bias adds) one linear_qkv
        # GEMM and one bias add
        assert len(getattr(plain, chain)) - len(getattr(fused, chain)) == 5 + 4
        qkv = next(n for n in getattr(fused, chain) if n.name.replace(".recompute", "") == "attn.qkv_proj")
        assert qkv.gemm == (1, b * s, 3 * h // tp, h)
        assert qkv.flops == 2 * b * s * h * 3 * h // tp
    bwd = {n.name: n for n in fused.backward}
    for norm in ("input_norm", "post_attention_norm"):
        # + the gradient write of h elements in the gradient dtype: fp16 (plain --fp16, the default)
        assert bwd[f"{norm}.grad_w:{norm}.grad_weight_bias"].tensor_bytes == 4 * tokens * h + 2 * h
    for chain in ("forward", "recompute", "backward"):
        p, f = getattr(plain, chain), getattr(fused, chain)
        assert sum(n.flops for n in p) - sum(n.flops for n in f) == _input_grad_sums(p)
        assert sorted((n.comm, n.comm_bytes) for n in p if n.comm) == sorted((n.comm, n.comm_bytes) for n in f if n.comm)
        for i, n in enumerate(f):  # dependencies stay inside the list and point backwards
            assert n.deps is None or all(0 <= d < i for d in n.deps)
    # the fused QKV's input gradient is one GEMM: no sum of three input gradients
    assert "input_norm.grad_accumulate" in {n.name for n in plain.backward}
    assert "input_norm.grad_accumulate" not in bwd
    assert bwd["attn.qkv_proj.grad_x:input_norm"].gemm == (1, b * s, h, 3 * h // tp)


def _input_grad_sums(nodes) -> int:
    """FLOPs of the eager graph's sums of q/k/v (and gate/up) input gradients, which a fused
    projection's single input-gradient GEMM does not run."""
    return sum(n.flops for n in nodes if n.name in ("input_norm.grad_accumulate", "post_attention_norm.grad_accumulate"))


def _llama_like() -> ModelSpec:
    return ModelSpec(name="tiny-llama", family="llama", num_layers=2, hidden=256, num_heads=8, num_kv_heads=2,
                     ffn=688, vocab=1024, max_seq=128, activation="swiglu", norm="rmsnorm", positions="rope",
                     tied_embeddings=False)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_fused_swiglu_saves_its_inputs_only(tp: int) -> None:
    """Megatron-Core's fused SwiGLU (``bias_swiglu_impl``) saves the fc1 output (gate and up halves,
    ``2f``) and nothing else; fc2 saves the product (``f``). Eager ``silu`` + ``mul`` also keep
    ``silu(gate)`` for the mul's backward: one ``b*s*f/tp`` bf16 tensor more per layer. The fused
    forward kernel reads 2f and writes f (3f elements); the fused backward reads dy, gate, up and
    writes dgate, dup (5f); the unfused pair moves 2f + 3f forward and 3f + 2f + 3f backward."""
    from tensorstage.graph import build_graph
    from tensorstage.lower.blocks import lower_blocks

    spec, b, s = _llama_like(), 2, 128
    plan = ParallelPlan(tp=tp, sp=tp > 1, seq=s, micro_batch=b, global_batch=b)
    base = dict(attention_impl="flash", precision="bf16", recompute="none")
    plain, fused = (lower_blocks(build_graph(spec, "train", GraphOptions(**base, megatron_fusions=f)), plan)["dense"]
                    for f in (False, True))
    f_local = b * s * spec.ffn // tp  # elements of one b*s*f/tp tensor
    assert plain.saved_bytes - fused.saved_bytes == 2 * f_local
    fwd = {n.name: n for n in fused.forward}
    assert fwd["mlp.act"].tensor_bytes == 2 * 3 * f_local
    assert "mlp.gated" not in fwd
    bwd = {n.name: n for n in fused.backward}
    assert bwd["mlp.act.grad"].tensor_bytes == 2 * 5 * f_local
    for chain in ("forward", "backward"):
        p, q = getattr(plain, chain), getattr(fused, chain)
        assert sum(n.flops for n in p) - sum(n.flops for n in q) == _input_grad_sums(p)
        assert sorted((n.comm, n.comm_bytes) for n in p if n.comm) == sorted((n.comm, n.comm_bytes) for n in q if n.comm)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_vocab_parallel_cross_entropy_passes(tp: int) -> None:
    """Megatron's unfused vocab-parallel cross-entropy on bf16 logits ``L`` = 2 bytes x N and their
    fp32 copy ``F`` = 4 bytes x N (N = tokens x vocab/tp): forward = cast (2N read, 4N written), max
    (4N), subtract (4N + 4N), exp in place (4N + 4N), sum (4N), divide in place (4N + 4N) = 38N
    bytes; backward = scale the saved softmax in place (4N + 4N) and cast back (4N + 2N) = 14N bytes
    (plus the int64 labels and scalar loss); eager ``F.cross_entropy``'s one log-softmax pass is 6N."""
    from tensorstage.graph import build_graph
    from tensorstage.lower.blocks import lower_blocks

    spec, b, s = _llama_like(), 2, 128
    plan = ParallelPlan(tp=tp, sp=tp > 1, seq=s, micro_batch=b, global_batch=b)
    base = dict(attention_impl="flash", precision="bf16", recompute="none")
    plain, fused = (lower_blocks(build_graph(spec, "train", GraphOptions(**base, megatron_fusions=f)), plan)["head"]
                    for f in (False, True))
    n = b * s * spec.vocab // tp
    labels = 8 * b * s
    fwd = next(x for x in fused.forward if x.op == "cross_entropy")
    bwd = next(x for x in fused.backward if x.op == "cross_entropy")
    assert fwd.tensor_bytes == 38 * n + labels + 4
    assert bwd.tensor_bytes == 14 * n + labels + 4
    eager = next(x for x in plain.forward if x.op == "cross_entropy")
    assert eager.tensor_bytes == 6 * n + labels + 4
    assert fwd.flops == eager.flops
