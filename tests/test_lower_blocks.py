"""Block lowering (tensorstage.lower.blocks) against independent sources.

* FLOPs: per-rank matrix FLOPs summed over the TP (x CP) group equal the unsharded graph and
  Narayanan et al. 2021's closed form 72*B*s*L*h^2*(1 + s/(6h) + V/(12*L*h)).
* TP communication per layer: Korthikanti et al. 2022 sec. 4.2 — without SP two all-reduces of
  b*s*h in forward and two in backward (Megatron's f and g); with SP each all-reduce becomes an
  all-gather + reduce-scatter of the same ring volume, plus Megatron's backward re-gather of the
  column-parallel inputs for the weight gradients (two more all-gathers per layer).
* PyTorch: tests/torchref's DTensor TP / TP+SP block and hand-written EP MoE, per-rank collective
  bytes by type equal ours (DTensor keeps the gathered input: compare with ``sp_regather=False``,
  and show that Megatron's default adds exactly two backward all-gathers).
* Korthikanti et al. activation memory per layer (F-ACT-MEM) with TP, TP+SP, selective recompute.
* CP ring / all-gather, EP all-to-all sizing, KV-cache bytes: closed forms written below.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest

from tensorstage.graph import GraphOptions, build_graph
from tensorstage.lower import graph_options
from tensorstage.lower.blocks import lower_blocks
from tensorstage.model.resolve import resolve_model
from tensorstage.model.spec import MLASpec, ModelSpec, MoESpec
from tensorstage.parallel import ParallelPlan
from tensorstage.parallel.placement import ring_wire_bytes
from tensorstage.schedule.program import CollKind, NodeKind
from tests.support import megatron_gpt

MEGATRON = GraphOptions(attention_impl="materialized", dropout=True, norm_stats=False, attention_flops="full")


def _lower(spec: ModelSpec, base: GraphOptions | None = None, sp_regather: bool = True, **plan_kw):
    plan = ParallelPlan(**plan_kw)
    plan.validate_for(spec)
    opts = graph_options(plan, base)
    g = build_graph(spec, opts.phase, opts)
    return g, plan, lower_blocks(g, plan, sp_regather=sp_regather)


def _colls(nodes, kind=None):
    return [n for n in nodes if n.kind == NodeKind.COLL and (kind is None or n.comm == kind)]


# --- FLOPs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_flops_sum_to_unsharded_and_narayanan(tp: int, sp: bool) -> None:
    L, h, a, V, s, b = 2, 256, 8, 1024, 128, 2
    spec = megatron_gpt(L, h, a, V, s)
    g, plan, bl = _lower(spec, MEGATRON, tp=tp, sp=sp, seq=s, micro_batch=b)
    per_rank = sum(bl[name].model_flops * n for name, n in g.counts().items())
    unsharded = build_graph(spec, "train", MEGATRON).costs({"b": b, "s": s}, exact=True).totals
    expect_graph = sum(unsharded[f"{c}_flops"] for c in ("fwd", "bwd_input", "bwd_weight"))
    assert per_rank * tp == expect_graph
    narayanan = 72 * b * s * L * h**2 * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * L * h))
    assert per_rank * tp == narayanan


@pytest.mark.parametrize("cp_mode", ["ring", "allgather"])
def test_cp_divides_causal_attention_work_evenly(cp_mode: str) -> None:
    """Causal load balancing: each of tp*cp ranks does 1/(tp*cp) of all matrix FLOPs (flash, causal_half)."""
    spec = megatron_gpt()
    g, _, bl = _lower(spec, GraphOptions(), tp=2, cp=4, seq=128, micro_batch=1, cp_mode=cp_mode)
    rep = build_graph(spec, "train", g.options).costs({"b": 1, "s": 128}, exact=True).totals
    total = sum(rep[f"{c}_flops"] for c in ("fwd", "bwd_input", "bwd_weight"))
    per_rank = sum(bl[name].model_flops * n for name, n in g.counts().items())
    assert per_rank * 8 == total


def test_moe_flops_with_sp_and_ep_sum_to_unsharded() -> None:
    spec = ModelSpec(
        name="tiny-moe",
        num_layers=2,
        hidden=128,
        num_heads=4,
        num_kv_heads=2,
        ffn=256,
        vocab=1024,
        moe=MoESpec(num_experts=4, top_k=2, expert_ffn=64, shared_experts=1),
    )
    g, _, bl = _lower(spec, tp=2, sp=True, ep=2, dp=2, seq=64, micro_batch=2)
    rep = build_graph(spec, "train", g.options).costs({"b": 2, "s": 64}, exact=True).totals
    total = sum(rep[f"{c}_flops"] for c in ("fwd", "bwd_input", "bwd_weight"))
    per_rank = sum(bl[name].model_flops * n for name, n in g.counts().items())
    # every EP rank processes its own micro-batch: the TP group together does one micro-batch's work
    assert per_rank * 2 == total


# --- TP communication: Korthikanti et al. 2022, sec. 4.2 -----------------------------------------------
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_layer_comm_matches_korthikanti(tp: int) -> None:
    h, s, b, B = 256, 128, 2, 2  # bf16 activations
    sbh = s * b * h * B
    _, _, plain = _lower(megatron_gpt(h=h, s=s), MEGATRON, tp=tp, seq=s, micro_batch=b)
    layer = plain["dense"]
    # without SP: 2 all-reduces of s*b*h in forward (g after attention and MLP), 2 in backward (f)
    assert [n.comm_bytes for n in _colls(layer.forward)] == [sbh, sbh]
    assert [n.comm_bytes for n in _colls(layer.backward)] == [sbh, sbh]
    assert all(
        n.comm == CollKind.ALL_REDUCE and n.axes == ("tp",) for n in _colls(layer.forward + layer.backward)
    )
    _, _, spb = _lower(megatron_gpt(h=h, s=s), MEGATRON, tp=tp, sp=True, seq=s, micro_batch=b)
    layer_sp = spb["dense"]
    fwd = Counter((n.comm, n.comm_bytes) for n in _colls(layer_sp.forward))
    bwd = Counter((n.comm, n.comm_bytes) for n in _colls(layer_sp.backward))
    # SP: all-gather (shard s*b*h/t) before each column-parallel block, reduce-scatter (input s*b*h) after
    assert fwd == {(CollKind.ALL_GATHER, sbh // tp): 2, (CollKind.REDUCE_SCATTER, sbh): 2}
    # backward: the conjugates (2 AG + 2 RS) plus Megatron's re-gather of the 2 column-parallel inputs
    assert bwd == {(CollKind.ALL_GATHER, sbh // tp): 4, (CollKind.REDUCE_SCATTER, sbh): 2}

    def wire(nodes):
        return sum(ring_wire_bytes(n.comm, n.comm_bytes, tp) for n in _colls(nodes))

    # "the same communication volume as TP": AG + RS move what one all-reduce moves
    assert wire(layer_sp.forward) == wire(layer.forward)
    regather = 2 * ring_wire_bytes(CollKind.ALL_GATHER, sbh // tp, tp)
    assert wire(layer_sp.backward) - regather == wire(layer.backward)


def _ancestors(nodes, i: int) -> set[int]:
    seen, todo = set(), [i]
    while todo:
        j = todo.pop()
        deps = nodes[j].deps if nodes[j].deps is not None else ((j - 1,) if j else ())
        for d in deps:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


@pytest.mark.parametrize("sp", [False, True])
def test_backward_tp_comm_overlap_follows_megatron(sp: bool) -> None:
    """Megatron's LinearWithGradAccumulationAndAsyncCommunication: the input-gradient all-reduce
    (SP: reduce-scatter) runs while the weight-gradient GEMM computes, and SP's re-gather of the
    layer input is issued before the input-gradient GEMM. ``overlap_tp_comm=False`` (default)
    keeps the order but serialises: every node waits for the one before it."""
    spec = resolve_model("llama3.1-8b")
    kw = {"tp": 4, "sp": sp, "seq": 1024}
    g, plan, _ = _lower(spec, **kw)
    layer = lower_blocks(g, plan, overlap_tp_comm=True)["dense"]
    nodes = layer.backward
    idx = {n.name: i for i, n in enumerate(nodes)}
    reduce = "input_norm.grad_acc:" + ("reduce_scatter" if sp else "all_reduce")
    wgrad = idx["attn.q_proj.grad_w:attn.q_proj.weight"]
    assert idx[reduce] not in _ancestors(nodes, wgrad)  # overlaps the weight-gradient GEMM
    assert idx[reduce] in _ancestors(nodes, idx["input_norm.grad_x"])
    assert idx[reduce] in _ancestors(nodes, len(nodes) - 1)  # the block's exit covers it
    if sp:
        gather = idx["input_norm:all_gather"]
        assert gather < idx["attn.v_proj.grad_x:input_norm"]
        assert gather not in _ancestors(nodes, idx["attn.v_proj.grad_x:input_norm"])
        assert gather in _ancestors(nodes, idx["attn.v_proj.grad_w:attn.v_proj.weight"])
    for i, n in enumerate(nodes):
        assert n.deps is not None and all(0 <= d < i for d in n.deps)
    chained = lower_blocks(g, plan)["dense"].backward
    assert [n.name for n in chained] == [n.name for n in nodes]
    assert all(n.deps == ((i - 1,) if i else ()) for i, n in enumerate(chained))


def test_full_recompute_reissues_forward_tp_collectives() -> None:
    _, _, bl = _lower(megatron_gpt(), MEGATRON, tp=4, sp=True, seq=128, recompute="full")
    layer = bl["dense"]
    key = [(n.comm, n.comm_bytes) for n in _colls(layer.forward)]
    assert [(n.comm, n.comm_bytes) for n in _colls(layer.recompute)] == key
    assert all(n.category == "recompute" for n in layer.recompute)


def test_vocab_parallel_embedding_and_head() -> None:
    h, s, b, V, tp = 256, 128, 2, 1024, 4
    sbh = s * b * h * 2
    _, _, bl = _lower(megatron_gpt(h=h, V=V, s=s), MEGATRON, tp=tp, seq=s, micro_batch=b)
    emb, head = bl["embedding"], bl["head"]
    assert [(n.comm, n.comm_bytes) for n in _colls(emb.forward)] == [(CollKind.ALL_REDUCE, sbh)]
    assert _colls(emb.backward) == []
    # cross-entropy: max, then target-logit and exp-sum all-reduces, one fp32 per token each
    assert [(n.comm, n.comm_bytes) for n in _colls(head.forward)] == [(CollKind.ALL_REDUCE, s * b * 4)] * 3
    # LM head input gradient: all-reduce of s*b*h
    assert [(n.comm, n.comm_bytes) for n in _colls(head.backward)] == [(CollKind.ALL_REDUCE, sbh)]
    # SP, rotary model: the lookup is reduce-scattered into the SP region, all-gathered back in backward
    rope = megatron_gpt(h=h, V=V, s=s).model_copy(update={"positions": "rope"})
    _, _, spb = _lower(rope, MEGATRON, tp=tp, sp=True, seq=s, micro_batch=b)
    assert [(n.comm, n.comm_bytes) for n in _colls(spb["embedding"].forward)] == [
        (CollKind.REDUCE_SCATTER, sbh)
    ]
    assert [(n.comm, n.comm_bytes) for n in _colls(spb["embedding"].backward)] == [
        (CollKind.ALL_GATHER, sbh // tp)
    ]
    # SP with learned positions (Megatron's LanguageModelEmbedding): all-reduce, add positions on the
    # full sequence, scatter; backward all-gathers before the add, so no position grad is Partial
    _, _, lpb = _lower(megatron_gpt(h=h, V=V, s=s), MEGATRON, tp=tp, sp=True, seq=s, micro_batch=b)
    emb = lpb["embedding"]
    assert [(n.comm, n.comm_bytes) for n in _colls(emb.forward)] == [(CollKind.ALL_REDUCE, sbh)]
    assert [(n.comm, n.comm_bytes) for n in _colls(emb.backward)] == [(CollKind.ALL_GATHER, sbh // tp)]
    assert emb.extra["tp_partial_grad_bytes"] == 0
    assert emb.output_bytes == sbh // tp
    # the embedding dropout runs on the sequence shard: its 1-byte mask is s*b*h/t
    assert emb.saved_bytes == s * b * 8 + s * 8 + s * b * h // tp


def test_local_weights_closed_form() -> None:
    """Per-rank weights of a GPT layer: (12h^2 + 7h)/t sharded (QKV, out, fc1, fc2 weights and the
    column biases) plus 6h replicated (out/fc2 biases, two LayerNorms)."""
    h, t = 256, 4
    _, _, bl = _lower(megatron_gpt(h=h), tp=t, seq=128)
    assert sum(w.numel for w in bl["dense"].weights) == (12 * h * h + 7 * h) // t + 6 * h
    assert sum(w.numel for w in bl["embedding"].weights) == 1024 * h // t + 128 * h
    assert not any(w.expert for w in bl["dense"].weights)


# --- against PyTorch (tests/torchref) -------------------------------------------------------------------
def _torch_block_spec(h: int, heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(
        name="torchref-block",
        num_layers=1,
        hidden=h,
        num_heads=heads,
        ffn=ffn,
        vocab=256,
        activation="relu",
        norm="layernorm",
        positions="none",
    )


def _by_type(records, phases) -> list[tuple[str, int]]:
    """torch's collectives of ``phases`` on one rank, in issue order: (op, bytes)."""
    return [(r["op"], r["size_bytes"]) for r in records if r["phase"] in phases]


def _ours(nodes) -> list[tuple[str, int]]:
    """Our collectives of a chain, in chain order: (op, bytes)."""
    names = {
        CollKind.ALL_REDUCE: "all_reduce",
        CollKind.ALL_GATHER: "all_gather",
        CollKind.REDUCE_SCATTER: "reduce_scatter",
        CollKind.ALL_TO_ALL: "all_to_all",
    }
    return [(names[n.comm], n.comm_bytes) for n in _colls(nodes)]


@pytest.fixture(scope="module")
def torch_runs():
    import torchref  # tests/torchref: the real torch.distributed runs (torch is in the test extra)
    cfg = {"hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8}
    return torchref.run_many(
        {
            "tp": {"scenario": "tp", "prepare_input": True, **cfg},
            "tp_sp": {"scenario": "tp", "sp": True, **cfg},
            "ep": {"scenario": "ep", "hidden": 16, "ffn": 32, "experts": 4, "topk": 2, "tokens": 16},
            "lm": {"scenario": "tp_lm", "prepare_input": True, "vocab": 64, **cfg},
            "lm_sp": {"scenario": "tp_lm", "sp": True, "vocab": 64, **cfg},
        },
        world_size=2,
    )


@pytest.mark.parametrize("sp", [False, True])
def test_tp_collectives_match_dtensor(torch_runs, sp: bool) -> None:
    run = torch_runs["tp_sp" if sp else "tp"]
    spec = _torch_block_spec(32, 4, 64)
    kw = {"tp": 2, "sp": sp, "seq": 8, "micro_batch": 2, "dtype": "fp32"}
    _, _, dt = _lower(spec, sp_regather=False, **kw)
    _, _, mg = _lower(spec, sp_regather=True, **kw)
    layer = dt["dense"]
    for rank in (0, 1):
        recs = run["ranks"][rank]
        assert _ours(layer.forward) == _by_type(recs, {"fwd"})
        assert _ours(layer.backward) == _by_type(recs, {"bwd"})
        # SP LayerNorm weight/bias grads are Partial: torch all-reduces them in the optimizer step
        optim = sum(r["size_bytes"] for r in recs if r["phase"] == "optim" and r["op"] == "all_reduce")
        assert layer.extra["tp_partial_grad_bytes"] == optim
    # Megatron differs from DTensor only by re-gathering the two column-parallel inputs in backward
    extra = Counter(_ours(mg["dense"].backward)) - Counter(_ours(layer.backward))
    assert extra == (Counter({("all_gather", 2 * 8 // 2 * 32 * 4): 2}) if sp else Counter())
    assert _ours(mg["dense"].forward) == _ours(layer.forward)


@pytest.mark.parametrize("sp", [False, True])
def test_vocab_parallel_lm_matches_dtensor(torch_runs, sp: bool) -> None:
    """TinyLM (vocab-parallel embedding, one block, LM head, ``loss_parallel``): every collective of
    embedding + layer + head, forward (with the three cross-entropy all-reduces) and backward."""
    run = torch_runs["lm_sp" if sp else "lm"]
    spec = _torch_block_spec(32, 4, 64).model_copy(update={"vocab": 64})
    _, _, bl = _lower(spec, sp_regather=False, tp=2, sp=sp, seq=8, micro_batch=2, dtype="fp32")
    fwd = [c for k in ("embedding", "dense", "head") for c in _ours(bl[k].forward)]
    bwd = [c for k in ("head", "dense", "embedding") for c in _ours(bl[k].backward)]
    for rank in (0, 1):
        recs = run["ranks"][rank]
        assert fwd == _by_type(recs, {"fwd", "loss"})
        assert bwd == _by_type(recs, {"bwd"})


def test_ep_alltoall_matches_torch(torch_runs) -> None:
    run = torch_runs["ep"]
    spec = ModelSpec(
        name="torchref-moe",
        num_layers=1,
        hidden=16,
        num_heads=2,
        ffn=32,
        vocab=256,
        moe=MoESpec(num_experts=4, top_k=2, expert_ffn=32),
    )
    _, _, bl = _lower(spec, ep=2, dp=2, seq=16, micro_batch=1, dtype="fp32")
    layer = bl["moe"]
    fwd = [n for n in _colls(layer.forward) if n.axes == ("ep",)]
    bwd = [n for n in _colls(layer.backward) if n.axes == ("ep",)]
    # counts (e int64), dispatch, combine forward; combine-grad and dispatch-grad backward
    routed = 16 * 2 * 16 * 4  # tokens x top-k rows of h fp32: what each rank sends to dispatch
    assert [n.comm_bytes for n in fwd] == [4 * 8, routed, routed]
    assert [n.comm_bytes for n in bwd] == [routed, routed]
    ours = [n.comm_bytes for n in fwd + bwd]
    # torch records each all-to-all's input buffer, per rank and in issue order. The counts, the
    # dispatch and the combine-grad send what this rank routed (routing-independent): equal per rank.
    # The combine and the dispatch-grad send back what this rank's experts received, which depends
    # on the router: per rank that is the run's own recv split; ours is its mean over the ranks
    # (balanced routing), exactly.
    received = {k: sum(run["info"][k]["recv_splits"]) * 16 * 4 for k in (0, 1)}
    assert received[0] != received[1]  # the router really is uneven here, so the check below has teeth
    phases = ["fwd.counts", "fwd.dispatch", "fwd.combine", "bwd", "bwd"]
    for k in (0, 1):
        recs = [r for r in run["ranks"][k] if r["op"] == "all_to_all"]
        assert [r["phase"] for r in recs] == phases
        got = [r["size_bytes"] for r in recs]
        assert [got[i] for i in (0, 1, 3)] == [ours[i] for i in (0, 1, 3)]
        assert [got[i] for i in (2, 4)] == [received[k]] * 2
    assert ours[2] == ours[4] == (received[0] + received[1]) / 2


# --- activation memory: Korthikanti et al. 2022 (F-ACT-MEM) ---------------------------------------------
def _korthikanti_spec(h: int, a: int) -> ModelSpec:
    return megatron_gpt(L=4, h=h, a=a, V=51200, s=2048)


@pytest.mark.parametrize(
    ("sp", "recompute", "formula"),
    [
        (
            False,
            "none",
            lambda s, b, h, a, t: s * b * h * (10 + Fraction(24, t) + Fraction(5 * a * s, h * t)),
        ),
        (True, "none", lambda s, b, h, a, t: s * b * h * (Fraction(34, t) + Fraction(5 * a * s, h * t))),
        (False, "selective", lambda s, b, h, a, t: s * b * h * (10 + Fraction(24, t))),
        (True, "selective", lambda s, b, h, a, t: Fraction(34 * s * b * h, t)),
        (False, "full", lambda s, b, h, a, t: 2 * s * b * h),
    ],
)
def test_korthikanti_activation_bytes_per_layer(sp: bool, recompute: str, formula) -> None:
    for h, a in ((1024, 16), (4096, 32)):
        for t in (2, 4, 8):
            for s, b in ((2048, 1), (2048, 2)):
                _, _, bl = _lower(
                    _korthikanti_spec(h, a), MEGATRON, tp=t, sp=sp, recompute=recompute, seq=s, micro_batch=b
                )
                assert bl["dense"].saved_bytes == formula(s, b, h, a, t), (h, t, s, b)


# --- context parallelism ---------------------------------------------------------------------------------
def _kv_block_bytes(b: int, s: int, cp: int, nkv: int, tp: int, dh: int, B: int = 2) -> int:
    return 2 * b * (s // cp) * (nkv // tp) * dh * B  # local K and V chunk


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_ring_exchanges(cp: int) -> None:
    """Transformer Engine's P2P ring: forward cp-1 K/V blocks to the next rank; backward the ring runs
    the other way for cp steps carrying K/V, then K/V + dK/dV, and finally dK/dV alone."""
    spec = resolve_model("llama3.1-8b")
    b, s, tp = 1, 4096, 2
    _, _, bl = _lower(spec, tp=tp, cp=cp, seq=s, micro_batch=b)
    layer = bl["dense"]
    kv = _kv_block_bytes(b, s, cp, 8, tp, 128)
    expect = {
        "forward": ([kv] * (cp - 1), 1),
        "backward": ([kv] + [2 * kv] * (cp - 2) + [kv], -1),
    }
    for attr, (sizes, direction) in expect.items():
        nodes = getattr(layer, attr)
        sends = [n for n in nodes if n.kind == NodeKind.SEND]
        recvs = [n for n in nodes if n.kind == NodeKind.RECV]
        assert [n.comm_bytes for n in sends] == [n.comm_bytes for n in recvs] == sizes
        assert all(n.peer_axis == "cp" for n in sends + recvs)
        assert {n.peer_offset for n in sends} == {direction} and {n.peer_offset for n in recvs} == {
            -direction
        }
        assert [n.tag for n in sends] == [n.tag for n in recvs]
        assert len({n.tag for n in sends}) == len(sizes)
        for i, n in enumerate(nodes):  # explicit deps point backwards within the list
            assert n.deps is None or all(0 <= d < i for d in n.deps)
    assert not any(n.axes == ("cp",) for n in _colls(layer.forward + layer.backward))
    tags = [n.tag for n in layer.forward + layer.backward if n.kind == NodeKind.SEND]
    assert len(set(tags)) == len(tags)


def test_cp_allgather_mode() -> None:
    """TE's KV all-gather CP: K and V gathered separately in forward and again in backward; dK and
    dV reduce-scattered (full-sequence input)."""
    spec = resolve_model("llama3.1-8b")
    b, s, tp, cp = 2, 4096, 2, 4
    _, _, bl = _lower(spec, tp=tp, cp=cp, seq=s, micro_batch=b, cp_mode="allgather")
    layer = bl["dense"]
    one = _kv_block_bytes(b, s, cp, 8, tp, 128) // 2
    cp_f = [(n.comm, n.comm_bytes) for n in _colls(layer.forward) if n.axes == ("cp",)]
    cp_b = [(n.comm, n.comm_bytes) for n in _colls(layer.backward) if n.axes == ("cp",)]
    assert cp_f == [(CollKind.ALL_GATHER, one)] * 2
    assert cp_b == [(CollKind.ALL_GATHER, one)] * 2 + [(CollKind.REDUCE_SCATTER, one * cp)] * 2


def test_decode_cp_splits_cache_and_combines_partial_outputs() -> None:
    spec = resolve_model("llama3.1-8b")
    b, c, tp, cp = 4, 8192, 2, 4
    _, _, bl = _lower(spec, tp=tp, cp=cp, seq=1, context=c, micro_batch=b, phase="decode")
    layer = bl["dense"]
    # KV read per rank: K and V, nkv/tp heads of dh, c/cp tokens, bf16
    assert layer.kv_cache_bytes == b * (c // cp) * 2 * (8 // tp) * 128 * 2
    combine = [n for n in _colls(layer.forward) if n.axes == ("cp",)]
    # partial outputs (b, nh/tp, dh) bf16 + fp32 log-sum-exp (b, nh/tp)
    assert [n.comm_bytes for n in combine] == [b * (32 // tp) * 128 * 2 + b * (32 // tp) * 4]
    assert layer.backward == [] and layer.saved_bytes == 0


def test_kv_cache_bytes_prefill_gqa_and_mla() -> None:
    b, s, tp = 2, 1024, 4
    _, _, bl = _lower(resolve_model("llama3.1-8b"), tp=tp, seq=s, micro_batch=b, phase="prefill")
    assert bl["dense"].kv_cache_bytes == b * s * 2 * (8 // tp) * 128 * 2
    mla = ModelSpec(
        name="tiny-mla",
        num_layers=1,
        hidden=256,
        num_heads=8,
        ffn=512,
        vocab=1024,
        mla=MLASpec(q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
    )
    _, _, bm = _lower(mla, tp=tp, seq=s, micro_batch=b, phase="prefill")
    # the MLA latent (kv_lora_rank + rope dim) is replicated over TP
    assert bm["mla_dense"].kv_cache_bytes == b * s * (32 + 16) * 2


# --- expert parallelism ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cf", "skew", "factor"), [(None, 1.0, 1), (None, 1.5, 1.5), (1.25, 3.0, 1.25)])
def test_ep_alltoall_sizes_with_capacity_and_skew(cf, skew, factor) -> None:
    spec = ModelSpec(
        name="moe",
        num_layers=1,
        hidden=512,
        num_heads=8,
        ffn=1024,
        vocab=1024,
        moe=MoESpec(num_experts=8, top_k=2, expert_ffn=256),
    )
    b, s, tp, ep = 2, 256, 2, 4
    _, _, bl = _lower(
        spec,
        tp=tp,
        sp=True,
        ep=ep,
        dp=4,
        seq=s,
        micro_batch=b,
        capacity_factor=cf,
        routing_skew=skew,
    )
    layer = bl["moe"]
    tokens = b * s // tp  # Megatron's alltoall dispatcher routes the rank's sequence shard
    rows_bytes = int(tokens * 2 * factor) * 512 * 2
    a2a = [n.comm_bytes for n in _colls(layer.forward, CollKind.ALL_TO_ALL)]
    assert a2a == [8 * 8, rows_bytes, rows_bytes]
    assert [n.comm_bytes for n in _colls(layer.backward, CollKind.ALL_TO_ALL)] == [rows_bytes, rows_bytes]
    # expert TP: the received rows are all-gathered over tp before the experts, reduce-scattered after
    tp_routed = [(n.comm, n.comm_bytes) for n in _colls(layer.forward) if n.name.startswith("moe.")]
    assert (CollKind.ALL_GATHER, rows_bytes) in tp_routed
    assert (CollKind.REDUCE_SCATTER, rows_bytes * tp) in tp_routed
    assert {w.name for w in layer.weights if w.expert} == {
        "moe.experts.gate_proj.weight",
        "moe.experts.up_proj.weight",
        "moe.experts.down_proj.weight",
    }
    for w in layer.weights:
        if w.expert:
            assert w.numel == (8 // ep) * 512 * 256 // tp
    # the busiest EP rank's expert GEMMs: tokens*k*factor rows (TP-gathered) x h x fe/tp, 2 FLOPs/MAC
    gate = next(n for n in layer.forward if n.name == "moe.experts.gate_proj")
    assert gate.flops == 2 * int(b * s * 2 * factor) * 512 * (256 // tp)


def test_mla_sp_gathers_compressed_latents() -> None:
    """Megatron MLA with SP: the down-projections run on the sequence shard; the q/kv latents are
    all-gathered for the column-parallel up-projections (again in backward for their weight grads),
    the shared RoPE key is gathered once (its gradient reduce-scattered), heads are TP-sharded."""
    ql, kvl, dr, h, b, s, tp = 64, 32, 16, 256, 2, 128, 4
    spec = ModelSpec(
        name="tiny-mla",
        num_layers=1,
        hidden=h,
        num_heads=8,
        ffn=512,
        vocab=1024,
        mla=MLASpec(
            q_lora_rank=ql, kv_lora_rank=kvl, qk_rope_head_dim=dr, qk_nope_head_dim=32, v_head_dim=32
        ),
    )
    _, _, bl = _lower(spec, tp=tp, sp=True, seq=s, micro_batch=b)
    layer = bl["mla_dense"]
    shard = b * s // tp * 2  # bytes per feature of a bf16 sequence shard
    ag = Counter(n.comm_bytes for n in _colls(layer.forward, CollKind.ALL_GATHER))
    assert ag == Counter({shard * h: 1, shard * ql: 1, shard * kvl: 1, shard * dr: 1})
    bwd_ag = Counter(n.comm_bytes for n in _colls(layer.backward, CollKind.ALL_GATHER))
    # h: output-grad gathers before o_proj and the MLP down-projection, MLP input re-gather
    assert bwd_ag == Counter({shard * h: 3, shard * ql: 1, shard * kvl: 1})
    bwd_rs = Counter(n.comm_bytes for n in _colls(layer.backward, CollKind.REDUCE_SCATTER))
    # one h-sized reduce-scatter (MLP input grad): the attention's input grad comes from the
    # replicated down-projections on the sequence shard and needs none
    assert bwd_rs == Counter({shard * tp * h: 1, shard * tp * ql: 1, shard * tp * kvl: 1, shard * tp * dr: 1})
    # replicated down-projections and norms see a sequence shard: their grads need a TP all-reduce
    down = (h * ql + h * (kvl + dr) + ql + kvl + 2 * h) * 4
    assert layer.extra["tp_partial_grad_bytes"] == down


def test_moe_without_sp_all_reduces_combined_tokens() -> None:
    """MoE + TP without SP (no EP): tokens replicated over TP; the experts' TP-partial outputs stay
    partial through the gate-weighted combine (linear in them), so the forward all-reduce moves the
    combined tokens (b*s of h, as vLLM's and TensorRT-LLM's fused MoE reduce after the combine), not the
    top_k times larger routed rows; likewise the routed input gradient is reduced after its scatter
    back to tokens. Backward: that token gradient's all-reduce, the attention's input-gradient one and
    the small gate-gradient one (b*s*k fp32/bf16 values)."""
    h, b, s, k, tp = 128, 2, 64, 2, 2
    spec = ModelSpec(
        name="moe",
        num_layers=1,
        hidden=h,
        num_heads=4,
        ffn=256,
        vocab=1024,
        moe=MoESpec(num_experts=4, top_k=k, expert_ffn=64),
    )
    _, _, bl = _lower(spec, tp=tp, seq=s, micro_batch=b)
    layer = bl["moe"]
    sbh, gates = b * s * h * 2, b * s * k * 2
    assert [n.comm_bytes for n in _colls(layer.forward)] == [sbh, sbh]
    assert Counter(n.comm_bytes for n in _colls(layer.backward)) == Counter({sbh: 2, gates: 1})
    assert all(n.comm == CollKind.ALL_REDUCE for n in _colls(layer.forward + layer.backward))


def test_moe_with_sp_gathers_tokens_not_routed_rows() -> None:
    """MoE + TP + SP without EP (Megatron's all-gather token dispatcher): the sequence shard's tokens
    are gathered before routing (``b*s*h`` in all: each rank's shard is ``b*s*h/tp``), the combined
    output is reduce-scattered back (``b*s*h``); no collective moves the ``top_k`` times larger routed
    rows, in forward or backward (the gate/index gathers are ``b*s*k`` values)."""
    h, b, s, k, tp = 128, 2, 64, 4, 4
    spec = ModelSpec(name="moe", num_layers=1, hidden=h, num_heads=4, ffn=256, vocab=1024,
                     moe=MoESpec(num_experts=8, top_k=k, expert_ffn=64))
    _, _, bl = _lower(spec, tp=tp, sp=True, seq=s, micro_batch=b)
    layer = bl["moe"]
    sbh = b * s * h * 2
    moe_fwd = [(n.comm, n.comm_bytes) for n in _colls(layer.forward) if n.name.startswith(("post_attention_norm",
                                                                                          "moe."))]
    assert (CollKind.ALL_GATHER, sbh // tp) in moe_fwd and (CollKind.REDUCE_SCATTER, sbh) in moe_fwd
    rows = b * s * k * h * 2
    for n in _colls(layer.forward + layer.backward):
        full = n.comm_bytes * tp if n.comm == CollKind.ALL_GATHER else n.comm_bytes
        assert full <= sbh < rows, (n.name, n.comm_bytes)


def test_decode_moe_routes_one_token_per_sequence() -> None:
    """Decode: b new tokens per rank; the EP all-to-all moves b*k rows of h; no backward."""
    spec = resolve_model("mixtral-8x7b")
    b, tp, ep = 16, 2, 4
    _, _, bl = _lower(spec, tp=tp, ep=ep, dp=4, seq=1, context=4096, micro_batch=b, phase="decode")
    layer = bl["moe"]
    a2a = [n.comm_bytes for n in _colls(layer.forward, CollKind.ALL_TO_ALL)]
    assert a2a == [8 * 8, b * 2 * 4096 * 2, b * 2 * 4096 * 2]
    assert layer.backward == [] and layer.optimizer == [] and layer.model_flops > 0
    # KV read: b sequences x 4096 cached tokens x K and V of nkv/tp heads x 128, bf16
    assert layer.kv_cache_bytes == b * 4096 * 2 * (8 // tp) * 128 * 2


def test_prefill_with_sp_gathers_before_the_last_token_logits() -> None:
    spec = resolve_model("llama3.1-8b")
    b, s, tp = 2, 1024, 4
    _, _, bl = _lower(spec, tp=tp, sp=True, seq=s, micro_batch=b, phase="prefill")
    head = bl["head"]
    # the final norm runs on the sequence shard; its output is gathered, the last position's logits
    # are computed vocab-parallel and stay sharded (b x V/tp)
    assert [(n.comm, n.comm_bytes) for n in _colls(head.forward)] == [
        (CollKind.ALL_GATHER, b * s // tp * 4096 * 2)
    ]
    padded = -(-128256 // (128 * tp)) * 128 * tp  # Megatron pads the vocabulary to 128 * tp
    assert head.output_bytes == b * padded // tp * 2


# --- performance ------------------------------------------------------------------------------------------
def test_lowering_405b_costs_the_same_as_two_layers() -> None:
    """Why lowering a 126-layer model is fast: each distinct block is lowered once, so the result (and
    the work) is exactly that of a 2-layer model with the same shapes. The wall time is measured by
    bench/bench_lower.py, not asserted here."""
    spec = resolve_model("llama3.1-405b")
    plan = ParallelPlan(tp=8, sp=True, cp=2, pp=16, dp=4, seq=8192, recompute="selective")
    opts = graph_options(plan)
    bl = lower_blocks(build_graph(spec, opts.phase, opts), plan)
    assert set(bl) == {"embedding", "dense", "head"}
    shallow = spec.model_copy(update={"num_layers": 2})
    assert lower_blocks(build_graph(shallow, opts.phase, opts), plan) == bl
