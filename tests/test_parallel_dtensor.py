"""redistribute() and param_sharding() against PyTorch DTensor / FSDP2: the collectives DTensor actually issues for the same
placement change, recorded at the dispatcher on a single-process fake process group (no data moves:
only op kinds and buffer shapes matter). Checks kinds, ASTRA-sim comm bytes, padding of uneven
shards, ordering (reduce before gather) and DTensor's one-collective-per-mesh-dim (merge=False).

Known, intended divergences (not in CASES): Shard(i) -> Shard(j) is an all-to-all here (DTensor's GPU
path; on CPU it falls back to all-gather, see the test below); and a change that moves a shard from
one axis to another (dp: S(0) -> R while tp: R -> S(0)) slices before gathering here, so it gathers
less than DTensor (which gathers over dp first): the result is a strided shard, equal in bytes to a
contiguous one up to a local permutation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial as TPartial
from torch.distributed.tensor import Replicate as TReplicate
from torch.distributed.tensor import Shard as TShard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils._python_dispatch import TorchDispatchMode

from tensorstage.parallel.placement import Partial, Replicate, Shard, TensorLayout, redistribute
from tensorstage.schedule.program import CollKind

KINDS = {
    "all_gather_into_tensor": CollKind.ALL_GATHER,
    "reduce_scatter_tensor": CollKind.REDUCE_SCATTER,
    "all_reduce": CollKind.ALL_REDUCE,
    "all_to_all_single": CollKind.ALL_TO_ALL,
}
C10D_KINDS = {"_allgather_base_": CollKind.ALL_GATHER, "_reduce_scatter_base_": CollKind.REDUCE_SCATTER}
DP, TP = 2, 4


class _Record(TorchDispatchMode):
    """(kind, input bytes) of every functional collective, in issue order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[CollKind, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in KINDS:
            t = args[0]
            self.ops.append((KINDS[name], t.numel() * t.element_size()))
        elif func.namespace == "c10d" and name in C10D_KINDS:  # FSDP2 calls the c10d ops: (out, in, pg)
            t = args[1]
            self.ops.append((C10D_KINDS[name], t.numel() * t.element_size()))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def mesh():  # type: ignore[no-untyped-def]
    assert not dist.is_initialized(), "a test left a process group initialised in this process"
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=DP * TP)
    try:
        yield init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    finally:
        dist.destroy_process_group()


def _torch(p):  # type: ignore[no-untyped-def]
    if isinstance(p, Shard):
        return TShard(p.dim)
    return TPartial() if isinstance(p, Partial) else TReplicate()


def dtensor_ops(mesh, shape, src, dst):  # type: ignore[no-untyped-def]
    src_t = [_torch(p) for p in src]
    local, _ = compute_local_shape_and_global_offset(shape, mesh, src_t)
    stride = tuple(int(torch.tensor(shape[i + 1 :]).prod()) for i in range(len(shape)))
    d = DTensor.from_local(torch.zeros(*local), mesh, src_t, run_check=False, shape=shape, stride=stride)
    rec = _Record()
    with rec:
        d.redistribute(mesh, [_torch(p) for p in dst])
    return rec.ops


R, P = Replicate(), Partial()
CASES = [
    ((R, Shard(0)), (R, R)),
    ((R, P), (R, Shard(0))),
    ((R, P), (R, R)),
    ((Shard(0), P), (R, R)),
    ((Shard(0), Shard(0)), (R, R)),
    ((P, P), (R, R)),
    ((P, R), (Shard(1), R)),
    ((R, R), (Shard(0), Shard(1))),
    ((Shard(1), P), (Shard(1), Shard(0))),
]


@pytest.mark.parametrize("shape", [(8, 12), (10, 6)])
@pytest.mark.parametrize("src,dst", CASES)
def test_redistribute_matches_dtensor(mesh, shape, src, dst) -> None:  # type: ignore[no-untyped-def]
    ours = redistribute(
        TensorLayout.on(mesh_sizes(), shape, 4, dict(zip(("dp", "tp"), src, strict=True))),
        dict(zip(("dp", "tp"), dst, strict=True)),
        merge=False,
    )
    assert [(c.kind, c.comm_bytes) for c in ours] == dtensor_ops(mesh, shape, src, dst)


def mesh_sizes():  # type: ignore[no-untyped-def]
    class _M:
        def size(self, axis: str) -> int:
            return {"dp": DP, "tp": TP}[axis]

    return _M()


@pytest.mark.parametrize("src,dst", [((R, Shard(0)), (R, Shard(1))), ((Shard(0), R), (Shard(1), R))])
def test_shard_to_shard_is_all_to_all_of_the_per_rank_buffer(mesh, src, dst) -> None:  # type: ignore[no-untyped-def]
    # On GPUs DTensor issues shard_dim_alltoall; on CPU process groups it falls back to all-gather + chunk
    # ("Gloo does not support alltoall", torch/distributed/tensor/_collective_utils.py). Either way the
    # per-rank input buffer is the local shard - our ALL_TO_ALL comm_bytes.
    shape = (8, 12)
    (ours,) = redistribute(
        TensorLayout.on(mesh_sizes(), shape, 4, dict(zip(("dp", "tp"), src, strict=True))),
        dict(zip(("dp", "tp"), dst, strict=True)),
    )
    ((kind, in_bytes),) = dtensor_ops(mesh, shape, src, dst)
    assert ours.kind == CollKind.ALL_TO_ALL and kind == CollKind.ALL_GATHER  # CPU fallback
    assert ours.comm_bytes == in_bytes


def test_merged_axes_move_the_same_wire_bytes_as_dtensor_per_dim(mesh) -> None:  # type: ignore[no-untyped-def]
    # FSDP over two axes: merge=True is one all-gather over dp x tp; DTensor does one per mesh dim.
    shape = (16, 6)
    layout = TensorLayout.on(mesh_sizes(), shape, 4, {"dp": Shard(0), "tp": Shard(0)})
    (merged,) = redistribute(layout, {})
    per_dim = redistribute(layout, {}, merge=False)
    assert [(c.kind, c.comm_bytes) for c in per_dim] == dtensor_ops(mesh, shape, (Shard(0), Shard(0)), (R, R))
    assert merged.group_size == DP * TP
    assert merged.wire_bytes_per_rank == sum(c.wire_bytes_per_rank for c in per_dim)


class _MLPBlock(torch.nn.Module):
    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(h)
        self.up = torch.nn.Linear(h, f, bias=False)
        self.down = torch.nn.Linear(f, h, bias=False)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return x + self.down(torch.relu(self.up(self.norm(x))))


@pytest.mark.parametrize("sp", [False, True])
def test_tp_block_matches_dtensor_colwise_rowwise(mesh, sp: bool) -> None:  # type: ignore[no-untyped-def]
    """One Megatron MLP block under DTensor ColwiseParallel/RowwiseParallel(/SequenceParallel), forward
    and backward, against the collectives derived from placements in test_parallel_placement."""
    from test_parallel_placement import tp_layer_collectives
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    b, s, h, f = 2, 8, 16, 32
    block = _MLPBlock(h, f)
    if sp:
        tp_plan = {
            "norm": SequenceParallel(),
            "up": ColwiseParallel(input_layouts=TShard(1)),
            "down": RowwiseParallel(output_layouts=TShard(1)),
        }
    else:
        tp_plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    parallelize_module(block, mesh["tp"], tp_plan)
    x = torch.randn(b, s // TP if sp else s, h, requires_grad=True)  # the rank's local input
    rec = _Record()
    with rec:
        y = block(x)
        n_fwd = len(rec.ops)
        y.sum().backward()
    ours = tp_layer_collectives(b, s, h, f, TP, sp, elem=4, blocks=("f",))
    assert rec.ops[:n_fwd] == [(c.kind, c.comm_bytes) for c in ours["fwd"]]
    assert rec.ops[n_fwd:] == [(c.kind, c.comm_bytes) for c in ours["bwd"]]


def test_zero3_param_sharding_matches_fsdp2(mesh) -> None:  # type: ignore[no-untyped-def]
    """torch FSDP2 ``fully_shard`` per layer: one all-gather of the unit's padded dim-0 shards before
    forward and again before backward, one reduce-scatter of the padded full gradients - the sums over
    the unit's parameters of ParamSharding(zero=3) collectives (ceil-div padding included)."""
    from torch.distributed.fsdp import fully_shard

    from tensorstage.parallel import apply

    dp_mesh = mesh["tp"]  # any 1-D group of TP ranks serves as the FSDP group here
    layers = [torch.nn.Linear(6, 10), torch.nn.Linear(10, 7)]  # uneven dim 0 over 4 ranks
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    expected = []
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh)
        gather = reduce = 0
        for p in layer.parameters():
            dims = tuple(f"d{i}" for i in range(p.ndim))
            ps = apply.param_sharding(dims, 3, ("dp",))
            step = ps.step_collectives(_OneAxis(TP), tuple(p.shape), dims, p.element_size())
            (ag,) = step["param_gather"]
            (rs,) = step["grad_reduce"]
            assert (ag.kind, rs.kind) == (CollKind.ALL_GATHER, CollKind.REDUCE_SCATTER)
            gather += ag.comm_bytes
            reduce += rs.comm_bytes
        expected.append((gather, reduce))
    fully_shard(model, mesh=dp_mesh)
    rec = _Record()
    with rec:
        y = model(torch.randn(3, 6))
        n_fwd = len(rec.ops)
        y.sum().backward()
    (g0, r0), (g1, r1) = expected
    ag, rs = CollKind.ALL_GATHER, CollKind.REDUCE_SCATTER
    assert rec.ops[:n_fwd] == [(ag, g0), (ag, g1)]
    assert rec.ops[n_fwd:] == [(ag, g1), (ag, g0), (rs, r1), (rs, r0)]


class _OneAxis:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self, axis: str) -> int:
        return self.n
