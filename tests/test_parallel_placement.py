"""Placements -> collectives: the redistribution table, ring volumes (F-COLLECTIVES), Megatron TP
per-layer volume derived from placements (F-TP-COMM), ZeRO/FSDP/HSDP, EP, padding."""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.parallel import apply
from tensorstage.parallel.placement import (
    Collective,
    Partial,
    Replicate,
    Shard,
    TensorLayout,
    contract,
    redistribute,
    ring_wire_bytes,
)
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.schedule.program import CollKind
from tests.support import public_cases

AR, AG, RS, A2A = CollKind.ALL_REDUCE, CollKind.ALL_GATHER, CollKind.REDUCE_SCATTER, CollKind.ALL_TO_ALL


def layout(shape, placements, sizes, dims=None, elem=2):
    return TensorLayout(tuple(shape), elem, tuple(placements.items()), tuple(sizes.items()), dims)


# --- the redistribution table -----------------------------------------------------------------------
B, S, H, N = 2, 8, 16, 4
FULL = B * S * H * 2


@pytest.mark.parametrize(
    "src,dst,kind,comm",
    [
        (Partial(), Replicate(), AR, FULL),  # buffer
        (Partial(), Shard(1), RS, FULL),  # full input
        (Shard(1), Replicate(), AG, FULL // N),  # per-rank input shard
        (Shard(1), Shard(2), A2A, FULL // N),  # per-rank buffer
        (Replicate(), Shard(1), None, 0),  # local slice
        (Replicate(), Partial(), None, 0),  # zeroing
        (Shard(0), Shard(0), None, 0),
    ],
)
def test_redistribution_rules(src, dst, kind, comm) -> None:
    colls = redistribute(layout((B, S, H), {"tp": src}, {"tp": N}), {"tp": dst})
    if kind is None:
        assert colls == []
    else:
        assert [(c.kind, c.axes, c.comm_bytes, c.group_size) for c in colls] == [(kind, ("tp",), comm, N)]


def test_partial_to_other_partial_rejected() -> None:
    with pytest.raises(SpecError) as exc:
        redistribute(layout((4,), {"tp": Partial("sum")}, {"tp": 2}), {"tp": Partial("max")})
    assert exc.value.field == "placement" and "P(sum) -> P(max)" in str(exc.value)


def test_named_dims_and_local_bytes() -> None:
    t = layout((B, S, H), {"tp": Shard("h"), "dp": Shard("b")}, {"tp": 4, "dp": 2}, dims=("b", "s", "h"))
    assert t.local_shape == (1, S, H // 4)
    assert t.local_bytes == B * S * H * 2 // 8
    with pytest.raises(SpecError) as exc:
        layout((B, S, H), {"tp": Shard("x")}, {"tp": 4}, dims=("b", "s", "h"))
    assert exc.value.field == "dim" and exc.value.allowed == ("b", "s", "h")


def test_uneven_shards_pad_like_fsdp2() -> None:
    # 10 rows over 4 ranks: ceil-div 3 rows per rank (torch.chunk sizes 3,3,3,1, padded to 3 for comm).
    t = layout((10, 6), {"dp": Shard(0)}, {"dp": 4})
    assert t.local_shape == (3, 6)
    (ag,) = redistribute(t, {})
    assert ag.kind == AG and ag.comm_bytes == 3 * 6 * 2
    (rs,) = redistribute(layout((10, 6), {"dp": Partial()}, {"dp": 4}), {"dp": Shard(0)})
    assert rs.kind == RS and rs.comm_bytes == 12 * 6 * 2  # padded full input = n * padded shard


def test_same_change_on_several_axes_is_one_collective() -> None:
    # FSDP over cp x dp (Megatron's dp-cp group): one all-gather over both axes.
    t = layout((64, 8), {"cp": Shard(0), "dp": Shard(0)}, {"cp": 2, "dp": 4})
    (ag,) = redistribute(t, {})
    assert (ag.kind, ag.axes, ag.group_size, ag.comm_bytes) == (AG, ("cp", "dp"), 8, 64 * 8 * 2 // 8)


def test_reduce_before_gather_ordering() -> None:
    # Partial on tp and Shard on dp -> Replicate everywhere: all-reduce the small shard, then gather.
    t = layout((8, 8), {"tp": Partial(), "dp": Shard(0)}, {"tp": 2, "dp": 4})
    ar, ag = redistribute(t, {})
    assert (ar.kind, ar.comm_bytes) == (AR, 8 * 8 * 2 // 4)
    assert (ag.kind, ag.comm_bytes) == (AG, 8 * 8 * 2 // 4)


# --- ring volumes (F-COLLECTIVES) -------------------------------------------------------------------
def simulate_ring_bytes_sent(kind: CollKind, full_bytes: int, n: int) -> int:
    """Bytes rank 0 sends running the ring algorithm step by step on n chunks of full_bytes / n."""
    chunk = full_bytes // n
    sent = 0
    phases = {AR: 2, RS: 1, AG: 1}[kind]
    for _ in range(phases):  # reduce-scatter phase then (for AR) all-gather phase
        for _step in range(n - 1):  # each step: send one chunk to the right neighbour
            sent += chunk
    return sent


def test_f_collectives_statement_present() -> None:
    cases = {c["id"]: c for c in public_cases()["formulas"]}
    stmt = cases["F-COLLECTIVES"]["statement"]
    assert "2(n-1)/n*S" in stmt and "(n-1)/n*S" in stmt


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_ring_volumes_match_formula_and_step_simulation(n: int) -> None:
    full = 48 * 1024 * n  # S, divisible by n
    # all-reduce: comm_bytes = buffer S
    assert ring_wire_bytes(AR, full, n) == 2 * (n - 1) * full // n == simulate_ring_bytes_sent(AR, full, n)
    # reduce-scatter: comm_bytes = full input S
    assert ring_wire_bytes(RS, full, n) == (n - 1) * full // n == simulate_ring_bytes_sent(RS, full, n)
    # all-gather: comm_bytes = shard S/n, wire (n-1)/n * S
    assert ring_wire_bytes(AG, full // n, n) == (n - 1) * full // n == simulate_ring_bytes_sent(AG, full, n)
    # all-to-all: per-rank buffer S, each rank keeps 1/n and sends the rest
    assert ring_wire_bytes(A2A, full, n) == (n - 1) * full // n
    assert ring_wire_bytes(AR, full, 1) == 0


# --- Megatron TP per-layer volume (F-TP-COMM) derived from placements --------------------------------
def tp_layer_collectives(
    b: int, s: int, h: int, f: int, tp: int, sp: bool, elem: int = 2, blocks: tuple[str, ...] = ("nh", "f")
) -> dict[str, list[Collective]]:
    """Forward and backward collectives of one transformer layer (attention as QKV-column + out-row,
    MLP as up-column + down-row), found only from placements: contract() gives op outputs,
    redistribute() the collectives. Attention's core is head-local, so its output keeps Shard(q)."""
    sizes = {"tp": tp}
    act = ("b", "s", "h")
    residual = apply.tp_residual(sp)
    fwd: list[Collective] = []
    bwd: list[Collective] = []
    for inner in blocks:  # attention block "nh" (QKV-column, out-row), MLP block "f"
        w_in = apply.tp_column(("h", inner))
        w_out = apply.tp_row((inner, "h"))
        width = h if inner == "nh" else f
        # forward: residual -> column input
        x = layout((b, s, h), residual, sizes, act, elem)
        fwd += redistribute(x, apply.tp_column_input())
        y_pl = contract(act, apply.tp_column_input(), ("h", inner), w_in, ("b", "s", inner))
        assert y_pl == {"tp": Shard(inner)}
        z_pl = contract(("b", "s", inner), y_pl, (inner, "h"), w_out, act)
        assert z_pl == apply.tp_row_output()
        fwd += redistribute(layout((b, s, h), z_pl, sizes, act, elem), residual)
        # backward: dZ arrives with the residual's placement; row matmul needs it whole
        dz = layout((b, s, h), residual, sizes, act, elem)
        bwd += redistribute(dz, {})
        dy_pl = contract(act, {}, (inner, "h"), w_out, ("b", "s", inner))
        assert dy_pl == {"tp": Shard(inner)}
        dx_pl = contract(("b", "s", inner), dy_pl, ("h", inner), w_in, act)
        bwd += redistribute(layout((b, s, h), dx_pl, sizes, act, elem), residual)
        assert width  # shapes of inner dims never enter the TP activation volume
    return {"fwd": fwd, "bwd": bwd}


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_megatron_tp_layer_volume(tp: int) -> None:
    b, s, h, f, elem = 2, 64, 256, 1024, 2
    sbh = s * b * h * elem
    plain = tp_layer_collectives(b, s, h, f, tp, sp=False)
    for phase in ("fwd", "bwd"):  # 2 all-reduces of s*b*h per layer, forward and backward
        assert [(c.kind, c.comm_bytes) for c in plain[phase]] == [(AR, sbh), (AR, sbh)]
    sp = tp_layer_collectives(b, s, h, f, tp, sp=True)
    # SP forward: all-gather into each block, reduce-scatter out; backward mirrored.
    assert [c.kind for c in sp["fwd"]] == [AG, RS, AG, RS]
    assert [c.kind for c in sp["bwd"]] == [AG, RS, AG, RS]
    for phase in ("fwd", "bwd"):
        # same total bytes on the wire as the all-reduces they replace
        assert sum(c.wire_bytes_per_rank for c in sp[phase]) == sum(
            c.wire_bytes_per_rank for c in plain[phase]
        )
        assert sum(c.wire_bytes_per_rank for c in plain[phase]) == 2 * 2 * (tp - 1) * sbh // tp
    assert sp["fwd"][0].comm_bytes == sbh // tp and sp["fwd"][1].comm_bytes == sbh


def test_graph_ir_weights_get_megatron_tp_dims() -> None:
    # GQA: Megatron shards query groups (nkv); the projections keep heads local to a rank.
    q_w, o_w = ("h", "nkv", "g", "dh"), ("nkv", "g", "dh", "h")
    assert apply.tp_column(q_w) == {"tp": Shard("nkv")} and apply.tp_row(o_w) == {"tp": Shard("nkv")}
    q = contract(("b", "s", "h"), {}, q_w, apply.tp_column(q_w), ("b", "s", "nkv", "g", "dh"))
    assert q == apply.attention_heads(("b", "s", "nkv", "g", "dh")) == {"tp": Shard("nkv")}
    out = contract(("b", "s", "nkv", "g", "dh"), q, o_w, apply.tp_row(o_w), ("b", "s", "h"))
    assert out == apply.tp_row_output()
    # MLA: per-head up-projections split nh; low-rank down-projections replicated (Megatron MLA).
    assert apply.tp_column(("kvl", "nh", "dn")) == {"tp": Shard("nh")}
    assert apply.tp_column(("h", "kvr")) == {} and apply.tp_column(("h", "ql")) == {}
    # MoE: router replicated, experts split fe over tp and e over ep.
    assert apply.tp_column(("h", "e")) == {}
    assert apply.tp_column(("e", "h", "fe")) | apply.expert_parallel(("e", "h", "fe")) == {
        "tp": Shard("fe"),
        "ep": Shard("e"),
    }
    assert apply.tp_column(("h", "f"), dim="h") == {"tp": Shard("h")}
    with pytest.raises(SpecError):
        apply.tp_column(("h", "f"), dim="x")
    assert apply.context_parallel(("b", "s", "h")) == {"cp": Shard("s")}
    assert apply.context_parallel(("b", "c", "nkv", "dh")) == {"cp": Shard("c")}


def test_weight_grad_placement_is_partial_over_dp() -> None:
    # dW1 = X^T dY summed over the batch: X and dY both Shard("b") on dp -> Partial on dp; Shard("f") on tp.
    x = {"dp": Shard("b")}
    dy = {"dp": Shard("b"), "tp": Shard("f")}
    dw = contract(("b", "s", "h"), x, ("b", "s", "f"), dy, ("h", "f"))
    assert dw == {"dp": Partial(), "tp": Shard("f")}
    ps = apply.param_sharding(("h", "f"), 0, ("dp",), model_parallel=apply.tp_column(("h", "f")))
    assert ps.grad == dw


def test_contract_rejects_inconsistent_shards() -> None:
    with pytest.raises(SpecError) as exc:
        contract(("b", "h"), {"tp": Shard("h")}, ("h", "f"), {}, ("b", "f"))
    assert exc.value.field == "placement" and "summed dim 'h' sharded on one side only" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        contract(("b", "h"), {"tp": Partial()}, ("h", "f"), {"tp": Partial()}, ("b", "f"))
    assert exc.value.field == "placement" and "P(sum) x P(sum) on tp: reduce before contracting" in str(exc.value)


# --- vocab parallel ------------------------------------------------------------------------------------
def test_vocab_parallel_embedding_and_head() -> None:
    b, s, h, tp = 2, 16, 64, 4
    table = apply.vocab_parallel_embedding(("v", "h"))
    assert table == {"tp": Shard("v")}
    out = layout((b, s, h), apply.vocab_parallel_embedding_output(), {"tp": tp}, ("b", "s", "h"))
    (ar,) = redistribute(out, {})
    assert (ar.kind, ar.comm_bytes) == (AR, b * s * h * 2)
    (rs,) = redistribute(out, apply.tp_residual(True))
    assert rs.kind == RS
    head = apply.vocab_parallel_head(("h", "v"))
    logits = contract(("b", "s", "h"), {}, ("h", "v"), head, ("b", "s", "v"))
    assert logits == {"tp": Shard("v")}
    ce = apply.vocab_parallel_cross_entropy(b * s, tp)
    assert [(c.kind, c.comm_bytes) for c in ce] == [(AR, b * s * 4)] * 3  # max, target logit, exp-sum
    fused = apply.vocab_parallel_cross_entropy(b * s, tp, fused=True)  # target logit + exp-sum concatenated
    assert [(c.kind, c.comm_bytes) for c in fused] == [(AR, b * s * 4), (AR, 2 * b * s * 4)]
    assert apply.vocab_parallel_cross_entropy(b * s, 1) == []


# --- data parallel: DDP, ZeRO, FSDP, HSDP ---------------------------------------------------------------
SHAPE, DIMS = (256, 128), ("h", "f")
P_BYTES = 256 * 128 * 2


def zero_step(zero: int, mesh_sizes: dict[str, int], shard: tuple[str, ...], rep: tuple[str, ...] = ()):
    mesh = _Sizes(mesh_sizes)
    ps = apply.param_sharding(DIMS, zero, shard, rep)
    return ps.step_collectives(mesh, SHAPE, DIMS, 2)


class _Sizes:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def size(self, axis: str) -> int:
        return self.sizes[axis]


@pytest.mark.parametrize("n", [2, 8])
def test_zero_stages_collectives(n: int) -> None:
    z0 = zero_step(0, {"dp": n}, ("dp",))
    assert [(c.kind, c.comm_bytes) for c in z0["grad_reduce"]] == [(AR, P_BYTES)]
    assert z0["param_gather"] == [] and z0["param_update_gather"] == []
    for zero in (1, 2):  # Megatron distributed optimizer: RS grads, AG updated params
        z = zero_step(zero, {"dp": n}, ("dp",))
        assert [(c.kind, c.comm_bytes) for c in z["grad_reduce"]] == [(RS, P_BYTES)]
        assert [(c.kind, c.comm_bytes) for c in z["param_update_gather"]] == [(AG, P_BYTES // n)]
        assert z["param_gather"] == []
    z3 = zero_step(3, {"dp": n}, ("dp",))
    assert [(c.kind, c.comm_bytes) for c in z3["param_gather"]] == [(AG, P_BYTES // n)]
    assert [(c.kind, c.comm_bytes) for c in z3["grad_reduce"]] == [(RS, P_BYTES)]
    assert z3["param_update_gather"] == []
    # DDP all-reduce wire bytes == ZeRO RS + AG wire bytes (same volume, as ZeRO paper sec. 7)
    z1 = zero_step(1, {"dp": n}, ("dp",))
    assert z0["grad_reduce"][0].wire_bytes_per_rank == sum(
        c.wire_bytes_per_rank for c in z1["grad_reduce"] + z1["param_update_gather"]
    )


def test_hybrid_sharding_reduce_scatter_then_all_reduce() -> None:
    # torch FSDP2 HSDP: reduce-scatter within the shard group, all-reduce the shard across replicas.
    plan = ParallelPlan.parse(dict(dp=8, zero=3, zero_shard_size=4))
    mesh = plan.mesh()
    assert mesh.size("dp_shard") == 4 and mesh.size("dp_replicate") == 2
    ps = apply.param_sharding(DIMS, 3, ("dp_shard",), ("dp_replicate",))
    step = ps.step_collectives(mesh, SHAPE, DIMS, 2)
    assert [(c.kind, c.axes, c.comm_bytes) for c in step["grad_reduce"]] == [
        (RS, ("dp_shard",), P_BYTES),
        (AR, ("dp_replicate",), P_BYTES // 4),
    ]
    assert [(c.kind, c.axes, c.comm_bytes) for c in step["param_gather"]] == [
        (AG, ("dp_shard",), P_BYTES // 4)
    ]


def test_fsdp_with_tp_shards_the_tp_shard() -> None:
    ps = apply.param_sharding(DIMS, 3, ("dp",), model_parallel=apply.tp_column(DIMS))
    t = TensorLayout.on(_Sizes({"tp": 4, "dp": 2}), SHAPE, 2, ps.stored, DIMS)
    assert t.local_bytes == P_BYTES // 8
    (ag,) = redistribute(t, ps.compute)
    assert (ag.kind, ag.axes, ag.comm_bytes) == (AG, ("dp",), P_BYTES // 8)


# --- expert parallel --------------------------------------------------------------------------------------
def test_expert_parallel_placement_and_alltoall() -> None:
    assert apply.expert_parallel(("e", "h", "f")) == {"ep": Shard("e")}
    tokens, h, k, ep = 512, 64, 2, 4
    dispatch, combine = apply.ep_alltoall(tokens, h, k, 2, ep)
    buf = tokens * k * h * 2  # every routed copy leaves the rank once (dropless, balanced)
    assert (dispatch.kind, dispatch.axes, dispatch.comm_bytes) == (A2A, ("ep",), buf)
    assert dispatch.wire_bytes_per_rank == (ep - 1) * buf // ep
    assert combine.comm_bytes == buf
    skewed, _ = apply.ep_alltoall(tokens, h, k, 2, ep, routing_skew=1.5)
    assert skewed.comm_bytes == int(tokens * k * 1.5) * h * 2  # busiest rank: 1.5x the mean
    capped, _ = apply.ep_alltoall(tokens, h, k, 2, ep, capacity_factor=1.25, routing_skew=3.0)
    assert capped.comm_bytes == tokens * k * 1.25 * h * 2
    assert apply.ep_alltoall(tokens, h, k, 2, 1) == []
