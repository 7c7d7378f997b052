"""Checks of the PyTorch ground-truth harness (tests/torchref) against closed forms written here.

Every expected byte count below is derived from the model shapes in this file, not from the harness's
own output, so a pass proves the recorder saw every collective torch issued. Two gloo worlds (2 and
4 ranks) run all scenarios, to keep process start-up cost low.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # import the sibling package whatever pytest's import mode
from torchref import run_many  # noqa: E402

F32 = 4  # bytes per fp32 element

CFG2 = {
    "manual": {"scenario": "manual", "numel": 12},
    "ddp_small_bucket": {"scenario": "ddp", "hidden": 32, "ffn": 64, "layers": 2, "bucket_cap_mb": 0.005,
                         "steps": 2},
    "ddp_default": {"scenario": "ddp", "hidden": 256, "ffn": 1024, "layers": 2, "steps": 2},
    "ddp_cap": {"scenario": "ddp", "hidden": 256, "ffn": 1024, "layers": 2, "steps": 2, "bucket_cap_mb": 1.5},
    "tp": {"scenario": "tp", "hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8},
    "tp_prep": {"scenario": "tp", "hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8, "prepare_input": True},
    "tp_sp": {"scenario": "tp", "hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8, "sp": True},
    "pp_gpipe": {"scenario": "pp", "schedule": "gpipe", "hidden": 16, "microbatches": 4, "microbatch_size": 2,
                 "steps": 2},
    "ep": {"scenario": "ep", "hidden": 16, "ffn": 32, "experts": 4, "topk": 2, "tokens": 16},
    "ddp_unused": {"scenario": "ddp", "hidden": 256, "ffn": 1024, "layers": 2, "steps": 2,
                   "find_unused_parameters": True},
    "ddp_static": {"scenario": "ddp", "hidden": 256, "ffn": 1024, "layers": 2, "steps": 3, "static_graph": True},
    "ddp_bf16": {"scenario": "ddp", "hidden": 32, "ffn": 64, "layers": 2, "steps": 1, "dtype": "bf16"},
    "ddp_accum": {"scenario": "ddp", "hidden": 32, "ffn": 64, "layers": 2, "bucket_cap_mb": 0.005, "steps": 2,
                  "accum": 3},
    "lm": {"scenario": "tp_lm", "hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8, "vocab": 64},
    "lm_sp": {"scenario": "tp_lm", "hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8, "vocab": 64,
              "sp": True},
    "ep_again": {"scenario": "ep", "hidden": 16, "ffn": 32, "experts": 4, "topk": 2, "tokens": 16},
    "pp_zb": {"scenario": "pp", "schedule": "zb_interleaved", "virtual_stages": 2, "hidden": 16,
              "microbatches": 4, "microbatch_size": 2},
}
CFG4 = {
    "fsdp_raf": {"scenario": "fsdp2", "hidden": 32, "ffn": 64, "layers": 2, "vocab": 10,
                 "reshard_after_forward": True},
    "fsdp_noraf": {"scenario": "fsdp2", "hidden": 32, "ffn": 64, "layers": 2, "vocab": 10,
                   "reshard_after_forward": False},
    "fsdp_rootdefault": {"scenario": "fsdp2", "hidden": 32, "ffn": 64, "layers": 2, "vocab": 10,
                         "reshard_after_forward": True, "root_reshard_after_forward": None},
    "pp_1f1b": {"scenario": "pp", "schedule": "1f1b", "hidden": 16, "microbatches": 6, "microbatch_size": 2,
                "steps": 2},
    "tp_sp4": {"scenario": "tp", "hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8, "sp": True},
    "ep4": {"scenario": "ep", "hidden": 16, "ffn": 32, "experts": 8, "topk": 2, "tokens": 16},
    "fsdp_bf16": {"scenario": "fsdp2", "hidden": 32, "ffn": 64, "layers": 2, "vocab": 12,
                  "param_dtype": "bf16", "reduce_dtype": "fp32"},
    "hsdp": {"scenario": "fsdp2", "hidden": 32, "ffn": 64, "layers": 2, "vocab": 12, "hsdp_replicate": 2},
    "fsdp_tp": {"scenario": "fsdp2_tp", "tp": 2, "hidden": 32, "heads": 4, "ffn": 64, "batch": 2, "seq": 8},
    "fsdp_tp_sp": {"scenario": "fsdp2_tp", "tp": 2, "sp": True, "hidden": 32, "heads": 4, "ffn": 64, "batch": 2,
                   "seq": 8},
    "pp_ddp": {"scenario": "pp", "schedule": "1f1b", "dp": 2, "dp_mode": "ddp", "hidden": 16, "microbatches": 3,
               "microbatch_size": 2, "steps": 2},
    "pp_fsdp": {"scenario": "pp", "schedule": "1f1b", "dp": 2, "dp_mode": "fsdp", "hidden": 16,
                "microbatches": 3, "microbatch_size": 2, "steps": 1},
    "pp_interleaved": {"scenario": "pp", "schedule": "interleaved1f1b", "virtual_stages": 2, "hidden": 16,
                       "microbatches": 8, "microbatch_size": 2},
}


@pytest.fixture(scope="module")
def w2() -> dict:
    return run_many(CFG2, world_size=2)


@pytest.fixture(scope="module")
def w4() -> dict:
    return run_many(CFG4, world_size=4)


def recs(run: dict, rank: int, phase_prefix: str = "", op: str | None = None) -> list[dict]:
    return [r for r in run["ranks"][rank] if r["phase"].startswith(phase_prefix) and (op is None or r["op"] == op)]


# ------------------------------------------------------------------------------------------ recorder itself
def test_manual_collectives_are_recorded_exactly(w2: dict) -> None:
    n, ws = 12, 2
    for rank in range(ws):
        by_phase = {}
        for r in w2["manual"]["ranks"][rank]:
            by_phase.setdefault(r["phase"], []).append(r)
        ar = by_phase["all_reduce"][0]
        assert (ar["op"], ar["in_bytes"], ar["group_ranks"], ar["dtype"]) == ("all_reduce", n * F32, [0, 1], "float32")
        for ph in ("all_gather_into_tensor", "all_gather_list"):
            (ag,) = by_phase[ph]
            assert (ag["op"], ag["in_bytes"], ag["out_bytes"], ag["size_bytes"]) == (
                "all_gather", n * F32, n * F32 * ws, n * F32)
        (rs,) = by_phase["reduce_scatter_tensor"]
        assert (rs["op"], rs["in_bytes"], rs["out_bytes"], rs["size_bytes"]) == (
            "reduce_scatter", n * F32 * ws, n * F32, n * F32 * ws)
        (a2a,) = by_phase["all_to_all_single"]
        assert (a2a["op"], a2a["in_bytes"], a2a["out_bytes"]) == ("all_to_all", n * ws * F32, n * ws * F32)
        (bc,) = by_phase["broadcast"]
        assert (bc["op"], bc["root"], bc["out_bytes"]) == ("broadcast", ws - 1, n * F32)
        p2p = sorted((r["op"], r["peer"], r["size_bytes"]) for r in by_phase["p2p"])
        assert p2p == sorted([("send", (rank + 1) % ws, n * F32), ("recv", (rank - 1) % ws, n * F32)])
        (fc,) = by_phase["funcol_all_reduce"]
        assert (fc["op"], fc["api"], fc["dtype"], fc["size_bytes"]) == (
            "all_reduce", "_c10d_functional::all_reduce", "float64", n * 8)
        (sub,) = by_phase["subgroup_all_reduce"]
        assert (sub["group_ranks"], sub["dtype"], sub["size_bytes"]) == ([0, 1], "bfloat16", n * 2)
        assert len(w2["manual"]["ranks"][rank]) == 10  # nothing extra (new_group issues no collective)


# ---------------------------------------------------------------------------------------------------- DDP
def mlp_param_bytes_reverse(h: int, ffn: int, layers: int) -> list[int]:
    """Parameter bytes in reverse registration order (the order DDP's grads become ready)."""
    fwd = []
    for _ in range(layers):
        fwd += [h * ffn * F32, ffn * F32, ffn * h * F32, h * F32]  # w1, b1, w2, b2
    return fwd[::-1]


def expected_buckets(sizes: list[int], first_cap: int, cap: int) -> list[int]:
    """DDP rule: append grads in ready order; a bucket closes once it reaches its cap (first cap, then cap)."""
    buckets, cur = [], 0
    for s in sizes:
        cur += s
        if cur >= (first_cap if not buckets else cap):
            buckets.append(cur)
            cur = 0
    if cur:
        buckets.append(cur)
    return buckets


@pytest.mark.parametrize("label,h,ffn,first_cap,cap", [
    ("ddp_small_bucket", 32, 64, int(0.005 * 2**20), int(0.005 * 2**20)),
    ("ddp_default", 256, 1024, 2**20, 25 * 2**20),  # default: 1 MiB first bucket, 25 MiB after
    ("ddp_cap", 256, 1024, int(1.5 * 2**20), int(1.5 * 2**20)),  # user cap: first bucket uses the cap
])
def test_ddp_allreduce_bytes_and_buckets(w2: dict, label: str, h: int, ffn: int, first_cap: int, cap: int) -> None:
    sizes = mlp_param_bytes_reverse(h, ffn, 2)
    total = sum(sizes)
    run = w2[label]
    for rank in range(2):
        # construction: rank 0 broadcasts all parameters
        init_bc = [r["size_bytes"] for r in recs(run, rank, "init", "broadcast") if r["dtype"] == "float32"]
        assert init_bc == [total]
        step0 = [r["size_bytes"] for r in recs(run, rank, "step0.bwd", "all_reduce")]
        assert step0 == [total]  # first iteration: one bucket holding every gradient
        step1 = [r["size_bytes"] for r in recs(run, rank, "step1.bwd", "all_reduce")]
        assert step1 == expected_buckets(sizes, first_cap, cap)
        assert sum(step1) == total
        assert all(r["group_ranks"] == [0, 1] for r in recs(run, rank, "step", "all_reduce"))
        # the rebuilt layout is synced once from rank 0 (int32 indices + sizes), in step 1's forward
        sync = [r["size_bytes"] for r in recs(run, rank, "step1.fwd", "broadcast")]
        assert sync == [4 * (len(sizes) + 1), 4 * len(step1)]


# ----------------------------------------------------------------------------------------------------- TP
def test_tp_megatron_allreduce_volumes(w2: dict) -> None:
    b, s, h, ws = 2, 8, 32, 2
    act = b * s * h * F32
    for rank in range(ws):
        fwd = [r["size_bytes"] for r in recs(w2["tp"], rank, "fwd", "all_reduce")]
        assert fwd == [act, act]  # one per row-parallel layer (wo, w2)
        # DTensor: wq, wk, wv each all-reduce their input grad (3) + w1 (1); Megatron issues 2
        bwd = [r["size_bytes"] for r in recs(w2["tp"], rank, "bwd", "all_reduce")]
        assert bwd == [act] * 4
        bwd_prep = [r["size_bytes"] for r in recs(w2["tp_prep"], rank, "bwd", "all_reduce")]
        assert bwd_prep == [act, act]  # PrepareModuleInput: one DTensor input per module, as Megatron
        assert [r["op"] for r in w2["tp"]["ranks"][rank] if r["phase"] in ("fwd", "bwd")] == ["all_reduce"] * 6


@pytest.mark.parametrize("world,label,ws", [("w2", "tp_sp", 2), ("w4", "tp_sp4", 4)])
def test_tp_sequence_parallel_volumes(request: pytest.FixtureRequest, world: str, label: str, ws: int) -> None:
    b, s, h = 2, 8, 32
    run = request.getfixturevalue(world)[label]
    full, shard = b * s * h * F32, b * s * h * F32 // ws
    group = list(range(ws))
    for rank in range(ws):
        for phase in ("fwd", "bwd"):
            seq = [(r["op"], r["in_bytes"], r["out_bytes"], r["group_ranks"]) for r in recs(run, rank, phase)]
            ag, rs = ("all_gather", shard, full, group), ("reduce_scatter", full, shard, group)
            assert seq == [ag, rs, ag, rs]  # per sublayer: AG before column-parallel, RS after row-parallel
        # SP norm weight/bias grads are Partial; torch all-reduces them lazily when the optimizer reads them
        assert [r["size_bytes"] for r in recs(run, rank, "optim", "all_reduce")] == [h * F32] * 4


# ----------------------------------------------------------------------------------------------------- PP
def one_f_one_b(stage: int, stages: int, mbs: int) -> list[str]:
    """Megatron 1F1B: (stages - stage - 1) warmup forwards, then F/B pairs, then cooldown backwards."""
    warm = min(stages - stage - 1, mbs)
    order = [f"F{i}" for i in range(warm)]
    f = warm
    for bwd in range(mbs):
        if f < mbs:
            order.append(f"F{f}")
            f += 1
        order.append(f"B{bwd}")
    return order


def test_pp_gpipe_p2p_bytes_and_order(w2: dict) -> None:
    mbs, act = 4, 2 * 16 * F32  # microbatch (2, 16) fp32 activations and grads
    run = w2["pp_gpipe"]
    for rank, peer in ((0, 1), (1, 0)):
        acts = [f"{a['action']}{a['mb']}" for a in run["info"][rank]["actions"]]
        assert acts == ([f"F{i}" for i in range(mbs)] + [f"B{i}" for i in range(mbs)]) * 2  # two steps
        tot = run["totals"][rank]  # both steps: 2 * mbs activations/grads + one 4-byte handshake
        key = f"send@{peer}"
        assert tot[key]["count"] == 2 * mbs + 1 and tot[key]["size_bytes"] == 2 * mbs * act + 4
        s1 = [(r["op"], r["peer"], r["size_bytes"]) for r in recs(run, rank, "step1")]
        fwd_dir, bwd_dir = ("send", "recv") if rank == 0 else ("recv", "send")
        assert sorted(s1) == sorted([(fwd_dir, peer, act)] * mbs + [(bwd_dir, peer, act)] * mbs)
        # step 0 additionally exchanges one 4-byte int32 handshake each way with the neighbour
        s0 = [(r["op"], r["peer"], r["size_bytes"], r["dtype"]) for r in recs(run, rank, "step0")]
        extra = sorted(x for x in s0 if x[3] == "int32")
        assert extra == [("recv", peer, 4, "int32"), ("send", peer, 4, "int32")]


def test_pp_1f1b_four_stages(w4: dict) -> None:
    stages, mbs, act = 4, 6, 2 * 16 * F32
    run = w4["pp_1f1b"]
    for rank in range(stages):
        acts = [f"{a['action']}{a['mb']}" for a in run["info"][rank]["actions"]]
        assert acts == one_f_one_b(rank, stages, mbs) * 2
        expect = []
        if rank > 0:
            expect += [("recv", rank - 1, act)] * mbs + [("send", rank - 1, act)] * mbs
        if rank < stages - 1:
            expect += [("send", rank + 1, act)] * mbs + [("recv", rank + 1, act)] * mbs
        s1 = [(r["op"], r["peer"], r["size_bytes"]) for r in recs(run, rank, "step1")]
        assert sorted(s1) == sorted(expect)
        assert all(r["op"] in ("send", "recv") for r in run["ranks"][rank])


# ----------------------------------------------------------------------------------------------------- EP
@pytest.mark.parametrize("world,label,ws,experts", [("w2", "ep", 2, 4), ("w4", "ep4", 4, 8)])
def test_ep_all_to_all(request: pytest.FixtureRequest, world: str, label: str, ws: int, experts: int) -> None:
    tokens, topk, h = 16, 2, 16
    run = request.getfixturevalue(world)[label]
    row = h * F32
    sent_total = recv_total = 0
    splits = {}
    for rank in range(ws):
        (counts,) = recs(run, rank, "fwd.counts")
        assert (counts["op"], counts["dtype"], counts["in_bytes"]) == ("all_to_all", "int64", experts * 8)
        (disp,) = recs(run, rank, "fwd.dispatch")
        (comb,) = recs(run, rank, "fwd.combine")
        assert disp["in_bytes"] == tokens * topk * row  # every routed token copy leaves once
        assert (comb["in_bytes"], comb["out_bytes"]) == (disp["out_bytes"], disp["in_bytes"])
        bwd = [(r["in_bytes"], r["out_bytes"]) for r in recs(run, rank, "bwd", "all_to_all")]
        assert bwd == [(disp["in_bytes"], disp["out_bytes"]), (disp["out_bytes"], disp["in_bytes"])]
        sent_total += disp["in_bytes"]
        recv_total += disp["out_bytes"]
        splits[rank] = (disp["extra"]["in_splits"], disp["extra"]["out_splits"])
        assert sum(splits[rank][1]) * row == disp["out_bytes"]
    assert sent_total == recv_total == ws * tokens * topk * row
    for src in range(ws):
        for dst in range(ws):
            assert splits[src][0][dst] == splits[dst][1][src]  # what src sends dst is what dst expects


# -------------------------------------------------------------------------------------------------- FSDP2
def test_fsdp2_gathers_and_reduce_scatters(w4: dict) -> None:
    ws, h, ffn, vocab = 4, 32, 64, 10
    layer = (h * ffn + ffn + ffn * h + h) * F32  # dim 0 of every tensor divisible by 4: no padding
    padded_vocab = -(-vocab // ws) * ws  # FSDP2 pads dim 0 to a multiple of the world size
    head = (padded_vocab * h + padded_vocab) * F32
    for label, bwd_gathers in (("fsdp_raf", [head, layer, layer]), ("fsdp_noraf", []),
                               ("fsdp_rootdefault", [layer, layer])):
        run = w4[label]
        for rank in range(ws):
            fwd = [(r["in_bytes"], r["out_bytes"]) for r in recs(run, rank, "step0.fwd", "all_gather")]
            assert fwd == [(head // ws, head), (layer // ws, layer), (layer // ws, layer)]  # root first
            bwd_ag = [r["out_bytes"] for r in recs(run, rank, "step0.bwd", "all_gather")]
            assert bwd_ag == bwd_gathers
            rs = [(r["in_bytes"], r["out_bytes"]) for r in recs(run, rank, "step0.bwd", "reduce_scatter")]
            assert sorted(rs) == sorted([(layer, layer // ws), (layer, layer // ws), (head, head // ws)])
            assert all(r["group_ranks"] == [0, 1, 2, 3] for r in run["ranks"][rank])
            assert not recs(run, rank, "step0.optim")  # optimizer works on local shards
            assert not recs(run, rank, "init")  # fully_shard itself communicates nothing


def test_fsdp2_mixed_precision_and_hsdp(w4: dict) -> None:
    h, ffn, vocab = 32, 64, 12  # vocab divisible by 4 and by 2: no padding in either layout
    layer_elems, head_elems = h * ffn + ffn + ffn * h + h, vocab * h + vocab
    # bf16 params: all-gathers move bf16 (2 bytes), fp32 reduce_dtype: reduce-scatters move fp32
    for rank in range(4):
        ag = [(r["dtype"], r["out_bytes"]) for r in recs(w4["fsdp_bf16"], rank, "step0.fwd", "all_gather")]
        assert ag == [("bfloat16", head_elems * 2), ("bfloat16", layer_elems * 2), ("bfloat16", layer_elems * 2)]
        rs = sorted((r["dtype"], r["in_bytes"]) for r in recs(w4["fsdp_bf16"], rank, "step0.bwd", "reduce_scatter"))
        assert rs == sorted([("float32", layer_elems * F32)] * 2 + [("float32", head_elems * F32)])
    # HSDP on a (2 replicate, 2 shard) mesh: AG/RS within the shard pair, then all-reduce of the shard
    for rank in range(4):
        shard_group = [rank - rank % 2, rank - rank % 2 + 1]
        rep_group = [rank % 2, rank % 2 + 2]
        run = w4["hsdp"]
        ag = {tuple(r["group_ranks"]) for r in recs(run, rank, "step0", "all_gather")}
        assert ag == {tuple(shard_group)}
        rs = [(r["in_bytes"], r["group_ranks"]) for r in recs(run, rank, "step0.bwd", "reduce_scatter")]
        assert sorted(b for b, _ in rs) == sorted([layer_elems * F32] * 2 + [head_elems * F32])
        assert all(g == shard_group for _, g in rs)
        ar = [(r["size_bytes"], r["group_ranks"]) for r in recs(run, rank, "step0.bwd", "all_reduce")]
        assert sorted(b for b, _ in ar) == sorted([layer_elems * F32 // 2] * 2 + [head_elems * F32 // 2])
        assert all(g == rep_group for _, g in ar)


def megatron_interleaved(rank: int, pp: int, v: int, mbs: int) -> list[str]:
    """Megatron's interleaved 1F1B order for one rank, as '<stage>F<mb>'/'<stage>B<mb>' (mbs % pp == 0)."""
    total = mbs * v
    warm = min((pp - rank - 1) * 2 + (v - 1) * pp, total)

    def fwd(k: int) -> str:
        return f"{rank + ((k // pp) % v) * pp}F{(k // (pp * v)) * pp + k % pp}"

    def bwd(k: int) -> str:
        return f"{rank + (v - 1 - (k // pp) % v) * pp}B{(k // (pp * v)) * pp + k % pp}"

    order = [fwd(k) for k in range(warm)]
    for i in range(total - warm):
        order += [fwd(warm + i), bwd(i)]
    return order + [bwd(k) for k in range(total - warm, total)]


def test_pp_interleaved_matches_megatron_order(w4: dict) -> None:
    pp, v, mbs, act = 4, 2, 8, 2 * 16 * F32
    run = w4["pp_interleaved"]
    n_stages = pp * v
    for rank in range(pp):
        acts = [f"{a['stage']}{a['action']}{a['mb']}" for a in run["info"][rank]["actions"]]
        assert acts == megatron_interleaved(rank, pp, v, mbs)
        planned = [a for a in run["info"][rank]["pipeline_order"][str(rank)] if a is not None]
        assert planned == acts  # multi-stage schedules execute their published pipeline_order
        my_stages = [rank + i * pp for i in range(v)]
        sends = {p: 0 for p in range(pp)}
        for s in my_stages:
            if s < n_stages - 1:
                sends[(s + 1) % pp] += mbs  # activations forward
            if s > 0:
                sends[(s - 1) % pp] += mbs  # input grads backward
        got = {}
        for r in recs(run, rank, "step0", "send"):
            if r["dtype"] == "float32":
                assert r["size_bytes"] == act
                got[r["peer"]] = got.get(r["peer"], 0) + 1
        assert got == {p: n for p, n in sends.items() if n}


def test_pp_zero_bubble_splits_backward(w2: dict) -> None:
    mbs = 4
    run = w2["pp_zb"]
    for rank in range(2):
        acts = [f"{a['stage']}{a['action']}{a['mb']}" for a in run["info"][rank]["actions"]]
        planned = [a for a in run["info"][rank]["pipeline_order"][str(rank)] if a is not None]
        assert acts == planned
        for stage in (rank, rank + 2):  # every microbatch gets one F, one I (input grad) and one W
            for kind in "FIW":
                assert sorted(a for a in acts if a.startswith(f"{stage}{kind}")) == \
                    sorted(f"{stage}{kind}{m}" for m in range(mbs))


def test_ddp_bucket_dtype_is_param_dtype(w2: dict) -> None:
    elems = sum(mlp_param_bytes_reverse(32, 64, 2)) // F32
    for rank in range(2):
        ar = [(r["dtype"], r["size_bytes"]) for r in recs(w2["ddp_bf16"], rank, "step0.bwd", "all_reduce")]
        assert ar == [("bfloat16", elems * 2)]


def test_ddp_no_sync_accumulation_reduces_once_per_step(w2: dict) -> None:
    sizes = mlp_param_bytes_reverse(32, 64, 2)
    cap = int(0.005 * 2**20)
    for rank in range(2):
        run = w2["ddp_accum"]
        for mb in (0, 1):  # no_sync microbatches: no gradient communication at all
            assert not recs(run, rank, f"step0.mb{mb}") and not recs(run, rank, f"step1.mb{mb}.bwd")
        assert [r["size_bytes"] for r in recs(run, rank, "step0.mb2.bwd")] == [sum(sizes)]
        assert [r["size_bytes"] for r in recs(run, rank, "step1.mb2.bwd")] == expected_buckets(sizes, cap, cap)


@pytest.mark.parametrize("sp", [False, True])
def test_tp_vocab_parallel_embedding_head_and_loss(w2: dict, sp: bool) -> None:
    ws, b, s, h = 2, 2, 8, 32
    full, shard, rows = b * s * h * F32, b * s * h * F32 // ws, b * s * F32
    run = w2["lm_sp" if sp else "lm"]
    for rank in range(ws):
        fwd = [(r["op"], r["in_bytes"], r["out_bytes"]) for r in recs(run, rank, "fwd")]
        bwd = [(r["op"], r["in_bytes"], r["out_bytes"]) for r in recs(run, rank, "bwd")]
        if sp:
            ag, rs = ("all_gather", shard, full), ("reduce_scatter", full, shard)
            # embedding RS; per sublayer AG + RS; AG before the vocab-parallel head
            assert fwd == [rs, ag, rs, ag, rs, ag]
            assert bwd == [rs, ag, rs, ag, rs, ag]  # mirror: head RS, sublayers, embedding AG
        else:
            ar = ("all_reduce", full, full)
            assert fwd == [ar] * 3  # embedding (row-parallel) + wo + w2
            assert bwd == [ar] * 5  # head input grad + w1 + wq/wk/wv separately (no PrepareModuleInput)
        # vocab-parallel cross-entropy: max, sum-exp and target-logit all-reduces of one fp32 per token
        loss = [(r["op"], r["size_bytes"]) for r in recs(run, rank, "loss")]
        assert loss == [("all_reduce", rows)] * 3


def test_runs_are_deterministic(w2: dict) -> None:
    for rank in range(2):
        assert w2["ep"]["ranks"][rank] == w2["ep_again"]["ranks"][rank]
        assert w2["ep"]["info"][rank] == w2["ep_again"]["info"][rank]


def test_ddp_find_unused_and_static_graph(w2: dict) -> None:
    rev = mlp_param_bytes_reverse(256, 1024, 2)
    n_params = len(rev)
    # find_unused_parameters: buckets are cut over *registration* order with a 1 MiB first bucket, issued
    # in reverse (so the small bucket goes last), never rebuilt, plus an int32 used-parameter bitmap
    # all-reduce (one int32 per parameter) every iteration
    fwd_order_buckets = expected_buckets(rev[::-1], 2**20, 25 * 2**20)
    for rank in range(2):
        run = w2["ddp_unused"]
        for step in (0, 1):
            ar = [(r["dtype"], r["size_bytes"]) for r in recs(run, rank, f"step{step}.bwd", "all_reduce")]
            assert ar == [("float32", b) for b in fwd_order_buckets[::-1]] + [("int32", 4 * n_params)]
        # static_graph: bitmap only in the first iteration; buckets rebuilt after the second
        run = w2["ddp_static"]
        assert [(r["dtype"], r["size_bytes"]) for r in recs(run, rank, "step0.bwd")] == [
            ("int32", 4 * n_params), ("float32", sum(rev))]
        assert [r["size_bytes"] for r in recs(run, rank, "step1.bwd")] == [sum(rev)]
        assert [r["size_bytes"] for r in recs(run, rank, "step2.bwd")] == expected_buckets(rev, 2**20, 25 * 2**20)


@pytest.mark.parametrize("sp", [False, True])
def test_fsdp2_with_tp_2d(w4: dict, sp: bool) -> None:
    tp, b, s, h, ffn = 2, 2, 8, 32, 64
    # TP-local parameter bytes: q/k/v/wo and w1/w2 split by tp, the two LayerNorms replicated
    local = (4 * h * h // tp + 2 * h * ffn // tp + 4 * h) * F32
    act = b * s * h * F32
    run = w4["fsdp_tp_sp" if sp else "fsdp_tp"]
    for rank in range(4):
        dp_group, tp_group = [rank % tp, rank % tp + tp], [rank - rank % tp, rank - rank % tp + 1]
        fsdp = [(r["phase"], r["op"], r["in_bytes"], r["out_bytes"]) for r in run["ranks"][rank]
                if r["group_ranks"] == dp_group]
        assert fsdp == [("fwd", "all_gather", local // 2, local), ("bwd", "all_gather", local // 2, local),
                        ("bwd", "reduce_scatter", local, local // 2)]
        tpr = [(r["phase"], r["op"], r["size_bytes"]) for r in run["ranks"][rank]
               if r["group_ranks"] == tp_group and r["phase"] != "init"]
        if not sp:
            assert tpr == [("fwd", "all_reduce", act)] * 2 + [("bwd", "all_reduce", act)] * 2
        else:
            pair = [("all_gather", act // tp), ("reduce_scatter", act)]
            assert tpr == [("fwd", *p) for p in pair * 2] + [("bwd", *p) for p in pair * 2] + \
                [("bwd", "all_reduce", h * F32)] * 4  # Partial norm grads resolved before FSDP's RS


def test_pp_with_data_parallel(w4: dict) -> None:
    h, mbs, act = 16, 3, 2 * 16 * F32
    layer = (h * h + h) * F32
    for rank in range(4):
        pp_rank, dp_group = rank // 2, [rank - rank % 2, rank - rank % 2 + 1]
        peer = (1 - pp_rank) * 2 + rank % 2  # same dp index on the other stage
        # DDP per stage: gradients all-reduced once per step, after the last microbatch's backward
        run = w4["pp_ddp"]
        for step in ("step0", "step1"):
            rs = recs(run, rank, step)
            ar = [(r["size_bytes"], r["group_ranks"]) for r in rs if r["op"] == "all_reduce"]
            assert ar == [(2 * layer, dp_group)]
            # issued inside the last backward (stage 1 then still sends that microbatch's input grad)
            step_actions = [a for a in run["info"][rank]["actions"] if a["comm_seq"] >= rs[0]["seq"]]
            last_b = [a for a in step_actions if a["action"] == "B"][mbs - 1]
            ar_seq = next(r["seq"] for r in rs if r["op"] == "all_reduce")
            assert ar_seq >= last_b["comm_seq"] and all(r["op"] in ("send", "recv") for r in rs[ar_seq - rs[0]["seq"] + 1:])
            assert {r["peer"] for r in rs if r["op"] in ("send", "recv")} == {peer}
            assert sum(r["size_bytes"] for r in rs if r["op"] == "send" and r["dtype"] == "float32") == mbs * act
        # FSDP2 per block inside the stage: params resharded after every forward but kept after
        # non-final backwards; gradients reduce-scattered once per unit at the end of the step
        run = w4["pp_fsdp"]
        acts = [a["action"] for a in run["info"][rank]["actions"]]
        sharded, gathers = [True, True], 0
        for i, a in enumerate(acts):
            last_b = a == "B" and "B" not in acts[i + 1:]
            for u in range(2):
                gathers += sharded[u]
                sharded[u] = a == "F" or last_b
        ag = [(r["in_bytes"], r["out_bytes"], r["group_ranks"]) for r in recs(run, rank, "step0", "all_gather")]
        assert ag == [(layer // 2, layer, dp_group)] * gathers
        rs_seq = [r["seq"] for r in recs(run, rank, "step0", "reduce_scatter")]
        last_b_seq = max(a["comm_seq"] for a in run["info"][rank]["actions"] if a["action"] == "B")
        assert len(rs_seq) == 2 and min(rs_seq) >= last_b_seq
        assert [r["in_bytes"] for r in recs(run, rank, "step0", "reduce_scatter")] == [layer, layer]
