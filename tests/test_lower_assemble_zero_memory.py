"""Step assembly: ZeRO-1/2 post-step parameter all-gather placement, the plan fields behind it and
FSDP2's reshard option, and the transient memory of activation recompute.

Independent sources: closed forms written below (Korthikanti et al. 2022's ``5as^2b/t`` attention
activations for selective recompute; the flash-attention log-sum-exp ``4asb/t``; peak memory =
static + in-flight saved activations + one layer's recompute transient) and Megatron-core's
documented behaviour of the distributed optimizer (``overlap_param_gather`` default False: all
buckets all-gathered synchronously after the optimizer step; True: the all-gather of each bucket
is waited on in the forward pre-hook of its first module, which then dispatches the next one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tensorstage.errors import SpecError
from tensorstage.graph import GraphOptions, build_graph
from tensorstage.lower import graph_options
from tensorstage.lower.blocks import lower_blocks
from tensorstage.lower.recompute_memory import recompute_transient_bytes
from tensorstage.lower.steps import BlockLowering, LocalWeight, StepNode
from tensorstage.model.spec import ModelSpec
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind, NodeKind
from tensorstage.sim import simulate

sys.path.insert(0, str(Path(__file__).parent))
from test_lower_assemble import chain_block, lowered, mlp_weights, unit_machine  # noqa: E402


# ------------------------------------------------------------------------------------ plan fields
def test_plan_fields_validate_and_parse_yaml_booleans() -> None:
    assert ParallelPlan.parse({"dp": 2, "zero": 3}).fsdp_reshard_after_forward == "default"
    assert ParallelPlan.parse({"dp": 2, "zero": 3, "fsdp_reshard_after_forward": False}
                              ).fsdp_reshard_after_forward == "false"  # YAML false
    with pytest.raises(SpecError, match="allowed: default, true, false"):
        ParallelPlan.parse({"dp": 2, "zero": 3, "fsdp_reshard_after_forward": "sometimes"})
    assert ParallelPlan.parse({"dp": 2}).overlap_param_gather is False  # Megatron-core default
    with pytest.raises(SpecError, match="overlap_param_gather"):
        ParallelPlan.parse({"dp": 2, "zero": 0, "overlap_param_gather": True})


def test_cli_flags_reach_the_plan() -> None:
    from tensorstage.commands.planopts import plan_from_options

    plan = plan_from_options(dp=2, zero=1, overlap_param_gather=True)
    assert plan.overlap_param_gather
    plan = plan_from_options(dp=2, zero=3, fsdp_reshard_after_forward="false")
    assert plan.fsdp_reshard_after_forward == "false"


# ------------------------------------------------------------------------- ZeRO-1/2 param gathers
def _zero_programs(overlap: bool, zero: int = 1):
    # 4 layers of a 32 -> 64 -> 32 MLP, buckets capped at ~one layer of fp32 main grads
    plan = ParallelPlan.parse(dict(dp=2, zero=zero, global_batch=4, dp_bucket_bytes=4 * 4000,
                                   overlap_param_gather=overlap))
    return lowered(plan, 4, chain_block("dense", mlp_weights(32, 64), fwd_flops=4, bwd_i_flops=4,
                                        bwd_w_flops=4, opt_flops=1))


@pytest.mark.parametrize("zero", [1, 2])
def test_param_gather_after_whole_optimizer_step_without_overlap(zero: int) -> None:
    programs, _ = _zero_programs(False, zero)
    nodes = programs[0].nodes
    opt = [x for x in nodes if x.category == "optimizer"]
    ags = [x for x in nodes if x.comm == CollKind.ALL_GATHER]
    rss = [x for x in nodes if x.comm == CollKind.REDUCE_SCATTER]
    # one gather per bucket; ZeRO-1 reduces each bucket once (full gradients accumulate), ZeRO-2 after
    # every micro-batch (sharded gradients: global batch 4 over dp 2 = 2 micro-batches)
    assert len(ags) >= 3 and len(rss) == len(ags) * (1 if zero == 1 else 2)
    rss = rss[-len(ags):]  # the last micro-batch's, bucket by bucket
    # synchronous start_param_sync after the whole step: first waits for the last optimizer node,
    # each later one for the previous all-gather
    assert ags[0].data_deps == (opt[-1].id,)
    assert all(b.data_deps == (a.id,) for a, b in zip(ags, ags[1:], strict=False))
    assert min(x.id for x in ags) > max(x.id for x in opt)
    # a bucket's all-gather moves its bf16 shard: RS input (fp32 main grads) / 2 ranks * 2 / 4 bytes
    assert [a.comm_bytes for a in ags] == [r.comm_bytes // 2 * 2 // 4 for r in rss]


def test_overlapped_param_gather_waits_in_forward_pre_hook() -> None:
    base, _ = _zero_programs(False)
    programs, _ = _zero_programs(True)
    nodes = programs[0].nodes
    ags = [x for x in nodes if x.comm == CollKind.ALL_GATHER]
    opt = [x for x in nodes if x.category == "optimizer"]
    assert max(x.id for x in ags) < min(x.id for x in opt)  # nothing after the step
    assert sorted(a.comm_bytes for a in ags) == sorted(x.comm_bytes for x in base[0].nodes
                                                       if x.comm == CollKind.ALL_GATHER)
    # the first all-gather is dispatched lazily when forward reaches the first module with
    # parameters (layer 0: this embedding has none), every later one once the previous completes
    # (Megatron's next_param_gather_bucket_group)
    embed_fwd = [x.id for x in nodes if x.name.startswith("mb0.embed.") and x.category == "fwd"]
    assert ags[0].data_deps == (embed_fwd[-1],)
    assert all(b.data_deps == (a.id,) for a, b in zip(ags, ags[1:], strict=False))
    # each micro-batch-0 forward of a layer starting a bucket waits for that bucket's gather
    waiting = [x for x in nodes if x.kind == NodeKind.COMP and x.category == "fwd"
               and any(d in {a.id for a in ags} for d in x.data_deps)]
    assert len(waiting) == len(ags) and all(x.microbatch == 0 for x in waiting)
    # buckets fill in reverse layer order, so forward meets them last-filled first: layer 0 first
    assert waiting[0].layer == 0


def test_overlapped_param_gather_hides_all_but_the_first_gather() -> None:
    # every collective costs exactly C (NCCL-style fixed ring cost, infinite bandwidth); a layer's
    # forward (8 s) is longer than C, so with overlap only the first bucket's gather is exposed:
    # the step is (k - 1) * C shorter than gathering k buckets after the optimizer step
    from tensorstage.sim import Machine
    from tensorstage.sim.collectives import Fabric, Tier

    c_s = 1.0
    machine = Machine(unit_machine().compute, Fabric((Tier("all", 1 << 20, 1e30, 0.0),), ring_base_latency_s=c_s),
                      1 << 60, 0.0, "bf16", "fixed-cost")
    times, ks = [], []
    for overlap in (False, True):
        plan = ParallelPlan.parse(dict(dp=2, zero=1, global_batch=2, dp_bucket_bytes=4 * 4000,
                                       overlap_param_gather=overlap))
        programs, mesh = lowered(plan, 4, chain_block("dense", mlp_weights(32, 64), fwd_flops=8, bwd_i_flops=8,
                                                      bwd_w_flops=8, opt_flops=1))
        ks.append(sum(1 for x in programs[0].nodes if x.comm == CollKind.ALL_GATHER))
        times.append(simulate(programs, mesh, machine).step_time_s)
    assert ks[0] == ks[1] >= 3
    assert times[0] - times[1] == pytest.approx((ks[0] - 1) * c_s)


# ----------------------------------------------------------------------------- recompute memory
def _dense_transient(recompute: str, tp: int, **opts: object) -> tuple[int, dict[str, BlockLowering]]:
    spec = ModelSpec(name="tiny", num_layers=2, hidden=64, num_heads=4, ffn=256, vocab=256)
    plan = ParallelPlan.parse(dict(tp=tp, seq=32, micro_batch=2, recompute=recompute))
    graph = build_graph(spec, "train", graph_options(plan, GraphOptions(**opts)))
    blocks = lower_blocks(graph, plan)
    return recompute_transient_bytes(blocks)["dense"], blocks


@pytest.mark.parametrize("tp", [1, 2])
def test_selective_recompute_transient_closed_forms(tp: int) -> None:
    a, s, b, h = 4, 32, 2, 64
    # Korthikanti et al. 2022: selective recompute drops softmax output (2as^2b), dropout mask
    # (as^2b) and dropout output (2as^2b), i.e. 5as^2b/t bytes, which the recompute re-creates
    got, _ = _dense_transient("selective", tp, attention_impl="materialized", dropout=True)
    assert got == 5 * a * s * s * b // tp
    # flash attention keeps q, k, v and its output; only the fp32 log-sum-exp is re-created
    got, _ = _dense_transient("selective", tp, attention_impl="flash")
    assert got == 4 * a * s * b // tp
    # s * b * h bytes must not appear: the attention output is kept (wo reads it), not recomputed
    assert got < s * b * h


def test_full_recompute_transient_is_layer_activations_minus_its_input() -> None:
    full, blocks_full = _dense_transient("full", 2)
    _, blocks_none = _dense_transient("none", 2)
    layer_input = 32 * 2 * 64 * 2  # s b h, bf16, replicated over TP without SP
    assert blocks_full["dense"].saved_bytes == layer_input
    assert full == blocks_none["dense"].saved_bytes - layer_input


def _recompute_block(saved: int, transient: int) -> BlockLowering:
    blk = chain_block("dense", fwd_flops=2, bwd_i_flops=2, bwd_w_flops=2, saved=saved)
    blk.recompute = [StepNode("rec0", NodeKind.COMP, "recompute", "matmul", flops=1),
                     StepNode("rec1", NodeKind.COMP, "recompute", "matmul", flops=1)]
    blk.extra["recompute_bytes"] = transient
    return blk


@pytest.mark.parametrize("schedule, p, m", [("1f1b", 1, 1), ("1f1b", 2, 4), ("gpipe", 2, 3), ("1f1b", 4, 8)])
def test_peak_memory_is_static_plus_in_flight_saved_plus_one_recompute(schedule: str, p: int, m: int) -> None:
    saved, transient, layers_per_stage = 1000, 5000, 3
    plan = ParallelPlan.parse(dict(pp=p, schedule=schedule, global_batch=m, recompute="full"))
    programs, mesh = lowered(plan, p * layers_per_stage, _recompute_block(saved, transient))
    res = simulate(programs, mesh, unit_machine())
    for r, cr in enumerate(res.classes):
        # at the first recompute of the stage's last micro-batch-in-flight, every layer of every
        # in-flight micro-batch still holds its saved activations (1F1B: min(m, p - r); GPipe: m)
        held = m if schedule == "gpipe" else min(m, p - r)
        static = sum(programs[r].static_bytes.values())
        assert cr.memory_peak_bytes - static == held * layers_per_stage * saved + transient
        allocs = [x.mem_alloc_bytes for x in programs[r].nodes if x.category == "recompute" and x.mem_alloc_bytes]
        assert allocs == [transient] * (m * layers_per_stage)  # once per layer and micro-batch


def test_zero_bubble_keeps_recomputed_tensors_until_weight_grad() -> None:
    # the weight-gradient pass (W) reads the recomputed activations too: they are released with
    # the saved ones by W's last node, not by the input-grad pass (I)
    saved, transient = 1000, 5000
    plan = ParallelPlan.parse(dict(pp=2, schedule="zb-h1", global_batch=4, recompute="full"))
    programs, _ = lowered(plan, 4, _recompute_block(saved, transient))
    for prog in programs:
        frees = [x for x in prog.nodes if x.mem_free_bytes]
        assert {x.category for x in frees} == {"bwd_weight"}
        assert sum(x.mem_free_bytes for x in frees) == sum(x.mem_alloc_bytes for x in prog.nodes) \
            == 4 * 2 * (saved + transient)


# ------------------------------------------------------------------ Megatron shared-embedding bucket
@pytest.mark.parametrize("zero", [0, 1])
def test_shared_embedding_gets_its_own_bucket_with_distributed_optimizer(zero: int) -> None:
    # Megatron (_does_param_require_new_bucket): with the distributed optimizer, the tied table on
    # the first stage and its copy on the last stage each form a bucket of their own (the bucket
    # being filled is closed first); plain DDP keeps everything in its one default bucket
    v, h = 256, 64
    plan = ParallelPlan.parse(dict(pp=2, dp=2, zero=zero, global_batch=4))
    emb = chain_block("embedding", [LocalWeight("embed", ("v", "h"), v * h, shape=(v, h))], out_bytes=8)
    head = chain_block("head", [LocalWeight("final_norm", ("h",), h, shape=(h,))])
    layer = chain_block("dense", mlp_weights(32, 64), out_bytes=8)
    programs, _ = lowered(plan, 4, layer, embedding=emb, head=head, tied=True)
    layer_numel = 2 * (2 * 32 * 64 + 64 + 32)  # 2 layers per stage
    kind = CollKind.REDUCE_SCATTER if zero else CollKind.ALL_REDUCE
    sizes = [[x.comm_bytes for x in p.nodes if x.comm == kind and x.name.startswith("dp.")] for p in programs]
    if zero == 0:  # fp32 main grads, no padding, one bucket per stage
        assert sizes == [[4 * (layer_numel + v * h)], [4 * (layer_numel + h + v * h)]]
        return
    pad = lambda n: -(-n // 128) * 128  # noqa: E731  bucket end: lcm(dp=2, 128) elements
    align = lambda n: -(-n // 64) * 64  # noqa: E731  parameter start: 64 elements
    # stage 0 fills in reverse: layers, then the table alone; stage 1: the copy alone (appended
    # last to the head, so first in reverse), then the head norm and the layers
    # one layer in reverse registration order: b2 (32), w2 (32x64), b1 (64), w1 (64x32)
    one_layer = align(align(align(32) + 32 * 64) + 64) + 64 * 32
    two_layers = align(one_layer) + one_layer
    assert sizes[0] == [4 * pad(two_layers), 4 * pad(v * h)]
    assert sizes[1] == [4 * pad(v * h), 4 * pad(align(h) + two_layers)]


# ---------------------------------------------------------------- DDP gradient dtype vs torch DDP
def test_torch_ddp_all_reduces_grads_in_param_dtype() -> None:
    # torch DDP's buckets hold param.grad in the parameter dtype (bf16 here); Megatron reduces its
    # fp32 main_grad buffers: same buckets, twice the bytes
    from test_lower_assemble import rank_records, torch_records
    from torchref import run_ddp

    h, ffn, layers, cap_mb = 32, 48, 3, 0.004
    ref = run_ddp({"world_size": 2, "hidden": h, "ffn": ffn, "layers": layers, "steps": 2,
                   "bucket_cap_mb": cap_mb, "dtype": "bf16"})
    cap = int(cap_mb * 2**20)
    for style, elem in (("torch", 2), ("megatron", 4)):
        plan = ParallelPlan.parse(dict(dp=2, dtype="bf16", global_batch=2, ddp_style=style, dp_bucket_bytes=cap))
        programs, mesh = lowered(plan, layers, chain_block("dense", mlp_weights(h, ffn)))
        for rank in range(2):
            want = torch_records(ref, rank, {"step1.bwd"})  # steady state: rebuilt buckets
            assert {r[2] for r in want} and all(r[0] == "all_reduce" for r in want)
            ours = [r for r in rank_records(programs, mesh, rank) if r[0] == "all_reduce"]
            if style == "torch":
                assert ours == want
            else:  # fp32 main grads: a bucket closes at the same byte cap, so at half the elements
                assert sum(r[2] for r in ours) == sum(r[2] for r in want) * elem // 2
    total = layers * (2 * h * ffn + ffn + h)
    assert sum(r[2] for r in want) == 2 * total  # bf16: 2 B per gradient element


# ------------------------------------------------ ZeRO-3 gradients under torch pipelining

@pytest.mark.parametrize("pp, global_batch, unsharded", [(2, 16, True), (2, 4, False), (1, 16, False)])
def test_zero3_pipelining_accumulates_unsharded_gradients(pp: int, global_batch: int, unsharded: bool) -> None:
    """torch's pipeline stages turn FSDP2's gradient sync off for every backward but the last, so a
    ZeRO-3 stage holds its whole (unsharded) gradients through the step: as much as the same stage
    under ZeRO-1 (unsharded gradients by definition). One micro-batch, or no pipelining: sharded
    over dp (up to FSDP2's dim-0 padding)."""
    from tensorstage.lower import lower
    from tensorstage.model import resolve_model

    spec = resolve_model("megatron-1.7b")
    grads = {}
    for zero in (1, 3):
        plan = ParallelPlan(tp=1, pp=pp, dp=4, zero=zero, micro_batch=1, global_batch=global_batch, seq=512,
                            dtype="bf16", ddp_style="torch")
        grads[zero] = [p.static_bytes["gradients"] for p in lower(spec, plan).programs]
    for g1, g3 in zip(grads[1], grads[3], strict=True):
        if unsharded:
            assert g3 == g1
        else:
            assert g1 / 4 <= g3 <= g1 / 4 * 1.01


@pytest.mark.parametrize("pp, zero, per_unit", [(1, 3, 4), (2, 3, 1), (1, 1, 1), (2, 2, 4)])
def test_sharded_gradients_reduce_every_microbatch(pp: int, zero: int, per_unit: int) -> None:
    """FSDP2 without pipelining reduce-scatters after every backward (its default; gradients stay
    sharded), torch pipelining once per step (unsharded accumulation, the test above), ZeRO-1 once
    (full gradients), ZeRO-2 every micro-batch (sharded gradients). Four micro-batches per step."""
    from tensorstage.lower import lower
    from tensorstage.model import resolve_model

    plan = ParallelPlan(tp=1, pp=pp, dp=4, zero=zero, micro_batch=1, global_batch=16, seq=512, dtype="bf16",
                        ddp_style="torch")
    assert plan.microbatches == 4
    prog = lower(resolve_model("megatron-1.7b"), plan).programs[0]
    grads = [n for n in prog.nodes if n.kind == NodeKind.COLL and ".grad" in n.name and n.axes == ("dp",)]
    if zero == 3:
        units = {n.name.split(".grad")[0] for n in grads}
        assert all(sum(n.name.startswith(u + ".grad") for n in grads) == per_unit for u in units)
    else:
        buckets = {n.name.split(".grad")[0] for n in grads}
        assert len(grads) == per_unit * len(buckets)
